"""Lightning callbacks: periodic evaluation of the EMA model during training."""
from __future__ import annotations

from typing import Any, Callable, Dict, List

import lightning as L
import torch


class FDEvalCallback(L.Callback):
    """Every ``every_kimg`` thousand training images, call ``evaluate(ema_denoiser)`` on every rank
    and log what it returns (e.g. ``fd``, ``precision``, ``recall``).

    The callback does not know how evaluation works: the stage that builds it passes
    :func:`sims.stages.evaluate.evaluate_denoiser` bound to the real data's reference statistics and
    to fixed seeds in the selection range, so the curve is comparable across evaluations and never
    touches the report seed sets. Training is unchanged by it: training randomness is a function of
    (seed, slice, step) (:mod:`sims.training.module`), not of the global generators' state.

    Args:
        every_kimg: evaluation period in kimg (> 0).
        evaluate: ``evaluate(denoiser) -> {metric: float}``; collective (called on every rank).
    Raises:
        ValueError: every_kimg <= 0.
    """

    def __init__(self, every_kimg: float, evaluate: Callable[[Any], Dict[str, float]]):
        if every_kimg <= 0:
            raise ValueError("FDEvalCallback needs every_kimg > 0")
        self.every_nimg = every_kimg * 1000.0
        self.evaluate = evaluate
        self.history: List[Dict[str, float]] = []
        self._last_step = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.global_step == self._last_step:  # a further micro-batch of the same optimizer step
            return
        self._last_step = pl_module.global_step
        prev = (pl_module.global_step - 1) * pl_module.batch_size
        if int(pl_module.cur_nimg // self.every_nimg) == int(prev // self.every_nimg):
            return
        with torch.no_grad():
            result = {k: float(v) for k, v in self.evaluate(pl_module.ema.module).items()
                      if isinstance(v, (int, float))}
        pl_module.log_dict(result, on_step=True, on_epoch=False, sync_dist=False)
        self.history.append({"kimg": pl_module.cur_nimg / 1000.0, **result})


def snapshot_name(kimg: float) -> str:
    """Folder name of a snapshot taken at ``kimg`` thousand images, e.g. ``kimg38.4``."""
    return f"kimg{float(kimg):g}"


def snapshot_kimg(name: str) -> float:
    """The kimg of a :func:`snapshot_name` folder."""
    return float(name[len("kimg"):])


class SnapshotCallback(L.Callback):
    """Export every EMA of the module to ``stage_dir/snapshots/kimg<K>/`` each time training passes a
    multiple of ``every_kimg`` (rank 0), before the final step — the auxiliary snapshots the SIMS
    evaluation sweeps (its best fine-tune length is not known in advance).

    Args:
        every_kimg: period in kimg (> 0).
        stage_dir: the stage's folder.
        total_kimg: the stage's length; no snapshot is taken at or after it (the final export is the last).
        is_main: True on global rank 0 (the only one that writes).
    """

    def __init__(self, every_kimg: float, stage_dir, total_kimg: float, is_main: bool = True):
        if every_kimg <= 0:
            raise ValueError("SnapshotCallback needs every_kimg > 0")
        from pathlib import Path

        self.every_nimg, self.total_nimg = every_kimg * 1000.0, total_kimg * 1000.0
        self.root = Path(stage_dir) / "snapshots"
        self.is_main = is_main
        self._last_step = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.global_step == self._last_step:
            return
        self._last_step = pl_module.global_step
        nimg, prev = pl_module.cur_nimg, (pl_module.global_step - 1) * pl_module.batch_size
        if nimg >= self.total_nimg or int(nimg // self.every_nimg) == int(prev // self.every_nimg):
            return
        if self.is_main:
            from sims.training.export import export_module

            export_module(pl_module, self.root / snapshot_name(nimg / 1000.0), stage="snapshot")
