"""One resumable training stage: a Lightning Trainer over the sampler stream, atomic checkpoints,
pre-emption, export of the EMA weights.

Resume contract: killing a stage at any point (between steps, while a checkpoint is written) and
re-running the same command ends with the same exported EMA weights as an uninterrupted run — on
CPU bit for bit at the same world size: the data position and every random draw are functions of
the step (:mod:`sims.training.sampler`, :mod:`sims.training.module`), and ``last.ckpt`` is written
atomically after the step's EMA update.

SIGTERM / SIGUSR1 (SLURM pre-emption) make every rank save ``last.ckpt`` at the end of the current
step and stop; the command then exits with :class:`~sims.errors.PreemptedError`, and re-running it
(e.g. the requeued job) resumes.
"""
from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from sims.dist import DistContext
from sims.errors import IncompleteStageError, PreemptedError
from sims.training.export import export_module
from sims.training.module import EDMModule, steps_for_kimg
from sims.training.sampler import TrainingSampler, TrainingStream, accumulation_steps
from sims.utils import atomic_write_text, fault_point, quiet_lightning

log = logging.getLogger("sims")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written to a temporary file and renamed: a kill mid-write leaves the
    previous ``last.ckpt`` intact."""

    def save_checkpoint(self, checkpoint: Dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save(checkpoint, tmp)
        fault_point("ckpt_write")  # tests: killed while the checkpoint is being written
        os.replace(tmp, path)
        fault_point("ckpt_saved")


class PreemptionCallback(L.Callback):
    """On SIGTERM/SIGUSR1 every rank saves ``last.ckpt`` after the current step and the fit stops.

    The flag is all-reduced every step, so ranks that did not receive the signal stop at the same step.
    """

    def __init__(self, ctx: DistContext, last: Path):
        self.ctx, self.last = ctx, Path(last)
        self.requested = False
        self.preempted = False
        self._previous: Dict[int, Any] = {}
        self._last_step = -1

    def _handler(self, signum, frame):  # pragma: no cover - exercised through a subprocess test
        self.requested = True

    def on_train_start(self, trainer, pl_module):
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass

    def on_train_end(self, trainer, pl_module):
        for sig, old in self._previous.items():
            signal.signal(sig, old)
        self._previous.clear()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self._last_step:  # a further micro-batch of the same optimizer step
            return
        self._last_step = trainer.global_step
        fault_point("train_step")  # tests: killed between checkpoints
        flag = torch.tensor([1.0 if self.requested else 0.0])
        if self.ctx.distributed:
            flag = self.ctx.all_reduce(flag, op="max")
        if flag.item() > 0 and not self.preempted:
            self.preempted = True
            trainer.save_checkpoint(str(self.last))
            trainer.should_stop = True


class ProgressCallback(L.Callback):
    """A step counter on rank 0: steps done / total, steps/s, kimg and the loss."""

    def __init__(self, ctx: DistContext, name: str, max_steps: int, enabled: bool = True):
        self.ctx, self.name, self.max_steps, self.enabled = ctx, name, max_steps, enabled
        self.bar = None
        self.start_step, self.t0 = 0, 0.0

    def on_train_start(self, trainer, pl_module):
        self.start_step, self.t0 = trainer.global_step, time.time()
        if self.enabled and self.ctx.is_main:
            from tqdm import tqdm

            self.bar = tqdm(total=self.max_steps, initial=trainer.global_step, desc=self.name, unit="step",
                            dynamic_ncols=True, mininterval=2.0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.bar is not None and trainer.global_step > self.bar.n:
            loss = outputs["loss"].item() if isinstance(outputs, dict) and "loss" in outputs else float("nan")
            self.bar.set_postfix(kimg=f"{pl_module.cur_nimg / 1000:.1f}", loss=f"{loss:.4f}", refresh=False)
            self.bar.update(trainer.global_step - self.bar.n)

    def steps_per_second(self, trainer) -> float:
        dt = time.time() - self.t0
        return (trainer.global_step - self.start_step) / dt if dt > 0 else 0.0

    def on_train_end(self, trainer, pl_module):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class TrainingDataModule(L.LightningDataModule):
    """Serves :class:`TrainingStream` micro-batches from the trainer's (possibly resumed) global step.

    Args:
        ctx: the job's distributed context.
        dataset: map-style training set.
        global_batch: B; batch_gpu: b (None: B / world).
        seed: the training seed (data order).
        num_workers: DataLoader workers (each reads its own items; the order does not depend on it).
    """

    def __init__(self, ctx: DistContext, dataset, *, global_batch: int, batch_gpu: Optional[int], seed: int,
                 num_workers: int = 0):
        super().__init__()
        self.ctx, self.dataset, self.seed, self.num_workers = ctx, dataset, int(seed), int(num_workers)
        self.global_batch = int(global_batch)
        self.batch_gpu = int(batch_gpu) if batch_gpu else self.global_batch // max(ctx.world_size, 1)

    def sampler(self) -> TrainingSampler:
        return TrainingSampler(len(self.dataset), global_batch=self.global_batch, batch_gpu=self.batch_gpu,
                               rank=self.ctx.rank, world_size=self.ctx.world_size, seed=self.seed)

    def train_dataloader(self):
        start = self.trainer.global_step if self.trainer is not None else 0  # restored before this is called
        stream = TrainingStream(self.dataset, self.sampler(), start_step=start)
        extra = {"prefetch_factor": 2} if self.num_workers > 0 else {}
        return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=self.num_workers,
                                           pin_memory=self.ctx.device.type == "cuda", **extra)


def make_trainer(ctx: DistContext, stage_dir: Path, *, max_steps: int, train: Dict[str, Any], accumulate: int,
                 callbacks: Iterable[L.Callback] = ()) -> L.Trainer:
    """A Lightning Trainer for one stage on this job's processes: CSV (and optional offline wandb)
    logging, ``last.ckpt`` every ``train.ckpt_every_kimg`` (atomic), fp32 outside the backbone."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    if not os.environ.get("SIMS_DEBUG"):
        quiet_lightning()
    loggers = [CSVLogger(str(stage_dir), name="logs", version="")]
    if train.get("wandb"):
        os.environ.setdefault("WANDB_MODE", "offline")
        from lightning.pytorch.loggers import WandbLogger

        loggers.append(WandbLogger(save_dir=str(stage_dir), project="sims", offline=True, name=stage_dir.name))
    ckpt_steps = steps_for_kimg(float(train["ckpt_every_kimg"]), int(train["batch_size"]))
    checkpoint = ModelCheckpoint(dirpath=str(stage_dir / "checkpoints"), save_last=True, save_top_k=0,
                                 every_n_train_steps=ckpt_steps)
    return L.Trainer(
        default_root_dir=str(stage_dir), max_steps=max_steps, max_epochs=-1, **ctx.trainer_kwargs(),
        precision="32-true", logger=loggers, callbacks=[checkpoint, *callbacks], plugins=[AtomicCheckpointIO()],
        enable_progress_bar=False, enable_model_summary=False, accumulate_grad_batches=accumulate,
        log_every_n_steps=max(1, min(int(train.get("log_every_steps", 50)), max_steps)),
        gradient_clip_val=train.get("grad_clip"), num_sanity_val_steps=0, limit_val_batches=0,
        use_distributed_sampler=False)


def stage_done(stage_dir: Path) -> bool:
    """True when ``stage_dir`` holds a finished training (``DONE`` and ``ema.safetensors``)."""
    return (Path(stage_dir) / "DONE").exists() and (Path(stage_dir) / "ema.safetensors").exists()


def fit_stage(ctx: DistContext, stage_dir: Path, module: EDMModule, dataset, *, total_kimg: float,
              train: Dict[str, Any], num_workers: int = 0, callbacks: Iterable[L.Callback] = (),
              progress: bool = True, export_meta: Optional[Dict[str, Any]] = None) -> Path:
    """Train ``module`` for ``total_kimg`` on ``dataset`` (all ranks), resuming from
    ``stage_dir/checkpoints/last.ckpt``; export the EMA weights (rank 0) and mark the stage ``DONE``.

    Args:
        ctx: the job's distributed context (every rank calls this).
        stage_dir: the stage's folder (``checkpoints/``, ``logs/``, ``ema*.safetensors``, ``DONE``).
        module: the :class:`EDMModule` to train (ignored when the stage is already done).
        dataset: map-style training set.
        total_kimg: training length in thousands of images.
        train: ``TrainConfig`` dict (batch_size, batch_gpu, seed, ckpt_every_kimg, ...).
        num_workers: DataLoader workers.
        callbacks: further Lightning callbacks (e.g. the FD evaluation).
        export_meta: extra metadata for the exported weights.
    Returns:
        The path of the exported main EMA weights, ``stage_dir/ema.safetensors``.
    Raises:
        PreemptedError: SIGTERM/SIGUSR1 arrived; ``last.ckpt`` was saved.
        IncompleteStageError: the fit ended short of its step count.
        ConfigError: the batch does not divide over the ranks.
    """
    stage_dir = Path(stage_dir)
    weights = stage_dir / "ema.safetensors"
    if stage_done(stage_dir):
        if ctx.is_main:
            log.info("%s: complete, skipping (delete %s to retrain)", stage_dir.name, stage_dir / "DONE")
        return weights
    if ctx.device.type == "cpu":
        torch.set_flush_denormal(True)  # subnormal Adam moments of near-zero-init layers make CPU steps 3x slower
    B = int(train["batch_size"])
    dm = TrainingDataModule(ctx, dataset, global_batch=B, batch_gpu=train.get("batch_gpu"), seed=int(train["seed"]),
                            num_workers=num_workers)
    accumulate = accumulation_steps(B, dm.batch_gpu, ctx.world_size)
    max_steps = steps_for_kimg(total_kimg, B)
    last = stage_dir / "checkpoints" / "last.ckpt"
    if ctx.is_main:  # a checkpoint write killed half-way leaves its temporary file behind
        for stale in last.parent.glob(".last.ckpt.*.tmp"):
            stale.unlink()
    preemption = PreemptionCallback(ctx, last)
    bar = ProgressCallback(ctx, stage_dir.name, max_steps, enabled=progress)
    trainer = make_trainer(ctx, stage_dir, max_steps=max_steps, train=train, accumulate=accumulate,
                           callbacks=[preemption, bar, *callbacks])
    ckpt_path = str(last) if last.exists() else None
    if ckpt_path and ctx.is_main:
        print(f"[sims] resuming {stage_dir.name} from {last}", flush=True)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    if preemption.preempted:
        raise PreemptedError(f"{stage_dir.name}: stopped by a signal at step {trainer.global_step} of {max_steps}; "
                             f"checkpoint saved to {last}; re-run the same command to resume")
    if trainer.global_step < max_steps:
        raise IncompleteStageError(f"{stage_dir.name}: training stopped at step {trainer.global_step} of {max_steps}; "
                                   "re-run the same command to resume")
    rate = bar.steps_per_second(trainer)
    trainer.save_checkpoint(str(last))  # collective: every rank calls it, rank 0 writes
    if ctx.is_main:
        export_module(module, stage_dir, stage=stage_dir.name, **(export_meta or {}))
        atomic_write_text(stage_dir / "DONE", f"steps={trainer.global_step}\nsteps_per_second={rate:.3f}\n")
        print(f"[sims] {stage_dir.name}: {trainer.global_step} steps ({rate:.2f} steps/s this run)", flush=True)
    ctx.barrier()
    return weights
