"""SIMS Algorithm 1 step 3: the auxiliary model, fine-tuned from the base on the synthetic set."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

from omegaconf import DictConfig

from sims.config import to_container
from sims.dist import DistContext
from sims.training.callbacks import SnapshotCallback
from sims.training.export import load_state, read_metadata, weights_sha256
from sims.training.fit import fit_stage, stage_done
from sims.training.module import EDMModule
from sims.utils import derive_seed


def aux_train_config(cfg: DictConfig, seed: Optional[int] = None) -> Dict[str, Any]:
    """The auxiliary fine-tune's ``train`` settings: the base's hyper-parameters (SPEC §1) with SIMS's
    own learning rate, ramp-up, EMA and length, and a seed of its own (derived from ``seed``,
    default ``train.seed``).

    SPEC §1: a 10-Mimg ramp-up on a few-Mimg fine-tune would never reach the nominal learning rate,
    so the ramp is ``sims.aux_lr_rampup_kimg``; the EMA ramp-up is off unless
    ``sims.aux_ema_rampup_ratio`` is set (EDM's ``--transfer`` switches it off).
    """
    t = to_container(cfg.train)
    s = cfg.sims
    if s.aux_lr is not None:
        t["lr"] = float(s.aux_lr)
    t["lr_rampup_kimg"] = float(s.aux_lr_rampup_kimg)
    if s.aux_ema_halflife_kimg is not None:
        t["ema_halflife_kimg"] = float(s.aux_ema_halflife_kimg)
    t["ema_rampup_ratio"] = None if s.aux_ema_rampup_ratio is None else float(s.aux_ema_rampup_ratio)
    t["ema_halflives_kimg"] = [float(h) for h in s.aux_ema_halflives_kimg]
    t["seed"] = derive_seed(int(cfg.train.seed if seed is None else seed), "aux") % (2 ** 31)
    return t


def finetune_aux(ctx: DistContext, cfg: DictConfig, base_weights: Path, synthetic, stage_dir: Path,
                 seed: Optional[int] = None) -> Path:
    """Fine-tune the auxiliary model from ``base_weights`` on ``synthetic`` for ``sims.aux_kimg``
    (collective, resumable; snapshots every ``sims.aux_snapshot_every_kimg``).

    The base weights are read once, into the one module that is trained (its live network and every
    EMA start from them).

    Returns:
        ``stage_dir/ema.safetensors``.
    Raises:
        WeightsError: the base weights do not fit the network they describe.
    """
    stage_dir = Path(stage_dir)
    if stage_done(stage_dir):
        return stage_dir / "ema.safetensors"
    meta = read_metadata(base_weights)
    train = aux_train_config(cfg, seed)
    module = EDMModule.from_state(load_state(base_weights), meta["network"], train, meta["data_shape"],
                                  int(meta["label_dim"]))
    callbacks = []
    every = cfg.sims.aux_snapshot_every_kimg
    if every:
        callbacks.append(SnapshotCallback(float(every), stage_dir, float(cfg.sims.aux_kimg), is_main=ctx.is_main))
    return fit_stage(ctx, stage_dir, module, synthetic, total_kimg=float(cfg.sims.aux_kimg), train=train,
                     num_workers=int(cfg.data.num_workers), callbacks=callbacks, progress=bool(cfg.train.progress_bar),
                     export_meta={"base_sha256": weights_sha256(base_weights)})
