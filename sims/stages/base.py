"""SIMS Algorithm 1 step 1: the base model — trained on the real data (EDM), or taken from another
run directory (``sims.base``, e.g. an EDM network written by ``sims-import``)."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Callable, Dict, Optional

from omegaconf import DictConfig

from sims.config import to_container
from sims.dist import DistContext, single_process
from sims.errors import ConfigError, WeightsError
from sims.figures import save_sample_figure
from sims.generation import generate
from sims.training.callbacks import FDEvalCallback
from sims.training.export import load_denoiser, read_metadata, weights_sha256
from sims.training.fit import fit_stage, stage_done
from sims.training.module import EDMModule, steps_for_kimg
from sims.utils import atomic_write_json, atomic_write_text

log = logging.getLogger("sims")


def data_label_dim(cfg: DictConfig, dataset) -> int:
    """Classes the model is conditioned on: the data set's when ``data.use_labels``, else 0."""
    return int(dataset.label_dim) if cfg.data.use_labels else 0


def train_base(ctx: DistContext, cfg: DictConfig, run_dir: Path, dataset,
               evaluate: Optional[Callable] = None) -> Path:
    """The base model of the run (collective). Trains it on ``dataset`` with EDM's loss unless
    ``sims.base`` names a completed run to take it from; writes ``base/grid.png``.

    Args:
        evaluate: ``evaluate(denoiser) -> metrics`` for the FD callback (``train.eval_every_kimg`` > 0).
    Returns:
        ``run_dir/base/ema.safetensors``.
    Raises:
        ConfigError / WeightsError: an unusable ``sims.base``; PreemptedError: stopped by a signal.
    """
    stage_dir = Path(run_dir) / "base"
    label_dim = data_label_dim(cfg, dataset)
    if cfg.sims.base:
        weights = adopt_base(ctx, Path(cfg.sims.base), stage_dir, dataset.item_shape, label_dim)
        write_grid(ctx, cfg, load_denoiser(weights, ctx.device)[0], stage_dir / "grid.png", dataset.item_shape,
                   label_dim)
        return weights
    if stage_done(stage_dir):
        weights = stage_dir / "ema.safetensors"
        if ctx.is_main and not (stage_dir / "grid.png").exists():
            write_grid(ctx, cfg, load_denoiser(weights, ctx.device)[0], stage_dir / "grid.png", dataset.item_shape,
                       label_dim, dataset)
        return weights
    module = EDMModule(to_container(cfg.network), to_container(cfg.train), dataset.item_shape, label_dim)
    if ctx.is_main:
        n = sum(p.numel() for p in module.net.parameters())
        print(f"[sims] base: {n / 1e6:.3f} M parameters, {cfg.train.total_kimg} kimg "
              f"({steps_for_kimg(cfg.train.total_kimg, cfg.train.batch_size)} steps of {cfg.train.batch_size})",
              flush=True)
    callbacks = []
    if cfg.train.eval_every_kimg > 0 and evaluate is not None:
        callbacks.append(FDEvalCallback(float(cfg.train.eval_every_kimg), evaluate))
    weights = fit_stage(ctx, stage_dir, module, dataset, total_kimg=float(cfg.train.total_kimg),
                        train=to_container(cfg.train), num_workers=int(cfg.data.num_workers), callbacks=callbacks,
                        progress=bool(cfg.train.progress_bar))
    write_grid(ctx, cfg, module.ema.module.eval(), stage_dir / "grid.png", dataset.item_shape, label_dim, dataset)
    return weights


def write_grid(ctx: DistContext, cfg: DictConfig, denoiser, path: Path, data_shape, label_dim: int,
               dataset=None) -> Optional[Path]:
    """Sample ``train.grid_seeds`` seeds (0, 1, ...) and save a picture (rank 0; vectors: a scatter of
    2,000 over the real points)."""
    if not ctx.is_main or path.exists():
        return None
    is_image = len(data_shape) == 3
    seeds = list(range(cfg.train.grid_seeds if is_image else 2000))
    parts = [x for _, x, _ in generate(single_process(ctx.device), denoiser.to(ctx.device), seeds, data_shape,
                                       label_dim=label_dim, sampler=to_container(cfg.sampler),
                                       batch_size=int(cfg.sampler.batch_size))]
    import torch

    ref = dataset.data[:2000] if dataset is not None and not is_image and hasattr(dataset, "data") else None
    return save_sample_figure(torch.cat(parts), path, reference=ref, title=path.parent.name)


def check_base_fits(meta: Dict, data_shape, label_dim: int, source: Path) -> None:
    """A base taken from elsewhere must fit this run's data.

    Raises:
        ConfigError: another data shape or number of classes, naming both.
    """
    if list(meta["data_shape"]) != list(data_shape):
        raise ConfigError(f"sims.base={source} was trained on samples of shape {meta['data_shape']}, "
                          f"but this run's data has {list(data_shape)} (check data.resolution / data.channels)")
    if int(meta["label_dim"]) != int(label_dim):
        raise ConfigError(f"sims.base={source} has label_dim={meta['label_dim']} but this run's data gives "
                          f"{label_dim} (check data.use_labels)")


def base_weights_of(source: Path) -> Path:
    """The main EMA weights of a completed run directory ``source`` (or ``source`` itself if it is a file).

    Raises:
        ConfigError: no such run, or its base is not complete.
    """
    source = Path(source)
    if source.is_file():
        return source
    weights = source / "base" / "ema.safetensors"
    if not ((source / "base" / "DONE").exists() and weights.is_file()):
        raise ConfigError(f"sims.base={source}: no completed base model there (expected {weights} and base/DONE; "
                          "make it with sims-import or sims-train)")
    return weights


def import_record_of(weights: Path, meta: dict) -> Optional[dict]:
    """The ``IMPORT.json`` of the ``sims-import`` run that wrote ``weights``, or None.

    Only a run's own layout counts (``RUN/base/<file>`` beside ``RUN/IMPORT.json``), and only when the
    record describes these weights (its pickle SHA-256 equals the weights' ``source_sha256``): a loose
    weights file never picks up an unrelated record from a folder above it.
    """
    record = Path(weights).parent.parent / "IMPORT.json"
    if Path(weights).parent.name != "base" or not record.is_file():
        return None
    data = json.loads(record.read_text())
    return data if data.get("sha256") is not None and data.get("sha256") == meta.get("source_sha256") else None


def adopt_base(ctx: DistContext, source: Path, stage_dir: Path, data_shape, label_dim: int) -> Path:
    """Copy another run's base weights into ``stage_dir`` (rank 0) and record where they came from
    (``SOURCE.json``: path and SHA-256); nothing is trained.

    Raises:
        ConfigError: ``source`` is not a completed run, or its model does not fit the data.
        WeightsError: this run's base already came from a different file.
    """
    weights = base_weights_of(source)
    meta = read_metadata(weights)
    check_base_fits(meta, data_shape, label_dim, source)
    digest = weights_sha256(weights)
    record = stage_dir / "SOURCE.json"
    if ctx.is_main:
        if record.exists():
            old = json.loads(record.read_text())
            if old.get("sha256") != digest:
                raise WeightsError(f"{stage_dir} already holds a base from {old.get('path')} "
                                   f"(sha256 {old.get('sha256', '')[:12]}…), not {weights}; use a new run_dir")
        if not stage_done(stage_dir):
            stage_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(weights, stage_dir / "ema.safetensors")  # whatever the source file's name
            if weights.name == "ema.safetensors":  # a run's main EMA (its directory or that file): its other EMAs too
                for f in sorted(weights.parent.glob("ema-*.safetensors")):
                    shutil.copyfile(f, stage_dir / f.name)
            atomic_write_json(record, {"path": str(weights), "sha256": digest, "kimg": meta.get("kimg"),
                                       "import": import_record_of(weights, meta)})
            atomic_write_text(stage_dir / "DONE", f"adopted={weights}\n")
            log.info("base: taken from %s (sha256 %s)", weights, digest[:12])
    ctx.barrier()
    return stage_dir / "ema.safetensors"
