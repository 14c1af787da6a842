"""``sims-train`` without a loop: the base model, then (``sims.enabled``) the SIMS stages."""
from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Callable, Optional

from omegaconf import DictConfig

from sims.config import to_container
from sims.data import load_real_dataset
from sims.dist import DistContext
from sims.stages.base import data_label_dim, train_base
from sims.stages.evaluate import build_reference, evaluate_denoiser, feature_name, make_extractor
from sims.stages.sims import run_sims


def fd_callback_evaluator(ctx: DistContext, cfg: DictConfig, dataset) -> Callable:
    """``evaluate(denoiser)`` for the FD callback: ``train.eval_num_samples`` samples at the fixed seeds
    ``train.eval_seed_offset + i`` (inside no report set), against the real data's statistics."""
    fname = feature_name(cfg.sims.features, cfg.data.name, dataset.is_image)
    extractor = make_extractor(fname, data_dim=int(dataset.dim), inception_weights=cfg.sims.inception_weights,
                               device=ctx.device)
    reference = build_reference(ctx, extractor, fname, dataset, reference_path=cfg.sims.reference,
                                pr_size=int(cfg.train.eval_num_samples))
    seeds = range(int(cfg.train.eval_seed_offset), int(cfg.train.eval_seed_offset) + int(cfg.train.eval_num_samples))
    run = partial(evaluate_denoiser, ctx, seeds=seeds, data_shape=dataset.item_shape,
                  label_dim=data_label_dim(cfg, dataset), sampler=to_container(cfg.sampler),
                  batch_size=int(cfg.sampler.batch_size), extractor=extractor, reference=reference)
    return lambda denoiser: run(denoiser)


def run_training(ctx: DistContext, cfg: DictConfig, run_dir: Path) -> Optional[Path]:
    """Base model (trained, or adopted from ``sims.base``), then the SIMS stages if enabled (collective).

    Returns:
        ``eval/report.json`` when SIMS ran, else None.
    """
    start = time.time()
    dataset = load_real_dataset(cfg.data)
    evaluate = fd_callback_evaluator(ctx, cfg, dataset) if cfg.train.eval_every_kimg > 0 and not cfg.sims.base else None
    weights = train_base(ctx, cfg, run_dir, dataset, evaluate)
    if ctx.is_main:
        print(f"[sims] base model: {weights} ({(time.time() - start) / 60:.1f} min)", flush=True)
    if not cfg.sims.enabled:
        return None
    report = run_sims(ctx, cfg, run_dir, dataset, weights)
    if ctx.is_main:
        print(f"[sims] report: {report} ({(time.time() - start) / 60:.1f} min in all)", flush=True)
    return report
