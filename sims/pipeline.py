"""The stages of a ``sims-train`` run, each resumable: base training, and (see :mod:`sims.sims_pipeline`)
SIMS synthetic data, auxiliary fine-tune and guided evaluation.

Run directory layout::

    RUN/config.yaml                  resolved config (a re-run with another config is refused)
    RUN/base/checkpoints/last.ckpt   Lightning checkpoint (resume by re-running the same command)
    RUN/base/logs/metrics.csv        loss / lr / kimg / EMA beta log
    RUN/base/ema.safetensors         exported EMA denoiser (inference, no pickle)
    RUN/base/grid.png                samples at the end of training
    RUN/base/DONE                    written last: the stage is complete
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from sims.config import ConfigError, save_config, to_container
from sims.generation import barrier, dist_info, sample_seeds, save_sample_figure
from sims.training.datamodule import ArrayDataModule
from sims.training.export import export_denoiser, load_denoiser
from sims.training.module import EDMModule, steps_for_kimg
from sims.utils import atomic_write_text, flatten_dict

log = logging.getLogger("sims")

# Keys that may differ between the first run and a resumed one without changing the result.
RUNTIME_KEYS = {"run_dir", "train.devices", "train.accelerator", "train.strategy", "train.num_nodes",
                "train.progress_bar", "train.wandb", "data.num_workers", "sampler.batch_size",
                # evaluation results are stored per ω, so the grid may grow or shrink between runs
                "sims.omegas", "sims.enabled"}
SIMS_STAGES = ("synthetic", "aux", "eval")


def prepare_run_dir(cfg: DictConfig) -> Path:
    """Create the run directory and save the resolved config, or check it matches a previous run's.

    Raises:
        ConfigError: the directory holds a run made with different settings (mixing them would
            corrupt results); the message lists the differing keys and how to start fresh.
    """
    run_dir = Path(cfg.run_dir)
    saved = run_dir / "config.yaml"
    if saved.exists():
        old = flatten_dict(OmegaConf.to_container(OmegaConf.load(saved), resolve=True))
        new = flatten_dict(to_container(cfg))
        # Before any SIMS stage has run, its settings may still change (e.g. sims.enabled=true on a base run).
        sims_free = not old.get("sims.enabled") and not any((run_dir / d).exists() for d in SIMS_STAGES)
        diff = sorted(k for k in set(old) | set(new) if k not in RUNTIME_KEYS and old.get(k) != new.get(k)
                      and not (sims_free and k.startswith("sims.")))
        if diff:
            shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:6])
            raise ConfigError(f"{run_dir} was made by a different config ({shown}); refusing to mix runs. "
                              f"Use a new run_dir=..., or delete {run_dir} to start fresh")
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"{run_dir} exists, is not empty and has no config.yaml: not a sims run directory. "
                          "Choose another run_dir=...")
    if dist_info()[0] == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, saved)
    return run_dir


def make_trainer(cfg: DictConfig, stage_dir: Path, max_steps: int, dataset=None) -> L.Trainer:
    """A Lightning Trainer for one stage: CSV (and optional offline wandb) logging, periodic
    ``last.ckpt`` checkpoints, progress bar, fp32 outside the backbone."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from sims.cli.common import quiet_lightning

    if not os.environ.get("SIMS_DEBUG"):
        quiet_lightning()

    t = cfg.train
    loggers = [CSVLogger(str(stage_dir), name="logs", version="")]
    if t.wandb:
        os.environ.setdefault("WANDB_MODE", "offline")
        from lightning.pytorch.loggers import WandbLogger

        loggers.append(WandbLogger(save_dir=str(stage_dir), project="sims", offline=True,
                                   name=f"{Path(cfg.run_dir).name}-{stage_dir.name}"))
    ckpt_steps = steps_for_kimg(t.ckpt_every_kimg, t.batch_size)
    checkpoint = ModelCheckpoint(dirpath=str(stage_dir / "checkpoints"), save_last=True, save_top_k=0,
                                 every_n_train_steps=ckpt_steps)
    callbacks = [checkpoint]
    if t.eval_every_kimg > 0 and dataset is not None:
        from sims.evaluation import make_extractor
        from sims.training.callbacks import FDEvalCallback

        _, extractor = make_extractor(cfg, dataset, torch.device("cpu"))
        callbacks.append(FDEvalCallback(t.eval_every_kimg, t.eval_num_samples, extractor, dataset.data,
                                        to_container(cfg.sampler), cfg.sampler.batch_size))
    strategy = t.strategy
    if strategy == "auto" and t.devices not in (1, "1") and t.accelerator == "cpu":
        strategy = "ddp"
    return L.Trainer(
        default_root_dir=str(stage_dir), max_steps=max_steps, max_epochs=-1, accelerator=t.accelerator,
        devices=t.devices, num_nodes=t.num_nodes, strategy=strategy, precision="32-true", logger=loggers,
        callbacks=callbacks, enable_progress_bar=t.progress_bar, enable_model_summary=False,
        log_every_n_steps=max(1, min(t.log_every_steps, max_steps)), gradient_clip_val=t.grad_clip,
        deterministic=t.deterministic, num_sanity_val_steps=0, limit_val_batches=0, use_distributed_sampler=True)


def fit_stage(cfg: DictConfig, stage_dir: Path, module: EDMModule, dataset, total_kimg: float) -> Path:
    """Train ``module`` for ``total_kimg`` on ``dataset``, resuming from ``stage_dir/checkpoints/last.ckpt``
    when present; export the EMA weights and mark the stage done. Returns the exported weights' path.

    A stage whose ``DONE`` marker exists is skipped.
    """
    weights = stage_dir / "ema.safetensors"
    if (stage_dir / "DONE").exists() and weights.exists():
        log.info("%s: complete, skipping (delete %s to retrain)", stage_dir.name, stage_dir / "DONE")
        return weights
    max_steps = steps_for_kimg(total_kimg, cfg.train.batch_size)
    trainer = make_trainer(cfg, stage_dir, max_steps, dataset)
    last = stage_dir / "checkpoints" / "last.ckpt"
    ckpt_path = str(last) if last.exists() else None
    if ckpt_path and trainer.is_global_zero:
        print(f"[sims] resuming {stage_dir.name} from {last}", flush=True)
    dm = ArrayDataModule(dataset, cfg.train.batch_size, cfg.data.num_workers, total_steps=max_steps)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    if trainer.global_step < max_steps:
        raise RuntimeError(f"{stage_dir.name}: training stopped at step {trainer.global_step} of {max_steps}; "
                           "re-run the same command to resume")
    trainer.save_checkpoint(str(last))  # collective: every rank calls it, rank 0 writes
    if trainer.is_global_zero:
        export_denoiser(module, weights, stage=stage_dir.name)
        atomic_write_text(stage_dir / "DONE", f"steps={trainer.global_step}\n")
    barrier()
    return weights


def train_base(cfg: DictConfig, run_dir: Path, dataset) -> Path:
    """SIMS Algorithm 1 step 1 (standard EDM training on the real data). Returns the EMA weights' path."""
    stage_dir = run_dir / "base"
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    module = EDMModule(to_container(cfg.network), to_container(cfg.train), dataset.data.shape[1:],
                       dataset.label_dim if cfg.data.use_labels else 0)
    if dist_info()[0] == 0:
        n = sum(p.numel() for p in module.net.parameters())
        print(f"[sims] base: {n / 1e6:.3f} M parameters, {cfg.train.total_kimg} kimg "
              f"({steps_for_kimg(cfg.train.total_kimg, cfg.train.batch_size)} steps of {cfg.train.batch_size})",
              flush=True)
    weights = fit_stage(cfg, stage_dir, module, dataset, cfg.train.total_kimg)
    write_grid(cfg, weights, stage_dir / "grid.png", dataset)
    return weights


def write_grid(cfg: DictConfig, weights: Path, path: Path, dataset=None) -> Optional[Path]:
    """Sample ``train.grid_seeds`` seeds (0, 1, ...) from exported weights and save a picture (rank 0)."""
    if dist_info()[0] != 0 or path.exists():
        return None
    denoiser, meta = load_denoiser(weights)
    is_image = len(meta["data_shape"]) == 3
    seeds = list(range(cfg.train.grid_seeds if is_image else 2000))  # vectors: a scatter plot of 2,000
    x, _ = sample_seeds(denoiser, seeds, meta["data_shape"], label_dim=int(meta["label_dim"]),
                        sampler=to_container(cfg.sampler))
    ref = dataset.data[:2000] if dataset is not None and not is_image else None
    return save_sample_figure(x, path, reference=ref, title=path.parent.name)

