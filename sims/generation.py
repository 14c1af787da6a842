"""Seeds → samples, sharded over ranks, one random stream per seed (SPEC §4, "Generation").

Every sample is a function of (weights, seed, sampler settings): its latent, its class label and
its churn noise come from a ``torch.Generator`` seeded by its integer seed
(:class:`sims.diffusion.SeedNoise`). Seeds are split into contiguous batches that are dealt
round-robin to ranks, so which seeds are sampled together does not depend on the number of
processes. On CPU the same seed gives the same sample whatever the batch size to about 1e-6 (the
batched convolutions may round differently; tests allow ±1 grey level after quantisation);
across devices (CPU vs CUDA) samples differ at that level too.

:func:`generate` is the one sampling loop of the package: the synthetic store, evaluation,
``sims-sample``, ``sims-fid`` and the loop's diffusion model all draw their samples through it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from sims.data.images import to_hwc_uint8
from sims.diffusion import SeedNoise, edm_sampler
from sims.dist import DistContext
from sims.errors import InputError
from sims.utils import atomic_write

SAMPLER_KEYS = ("num_steps", "sigma_min", "sigma_max", "rho", "S_churn", "S_min", "S_max", "S_noise", "solver")


def seed_batches(seeds: Sequence[int], batch_size: int, rank: int = 0, world_size: int = 1) -> List[List[int]]:
    """Split ``seeds`` into contiguous batches of ``batch_size`` and return this rank's share
    (batches rank, rank + world_size, ...; a rank may get none).

    Raises:
        InputError: batch_size < 1.
    """
    if batch_size < 1:
        raise InputError(f"batch size must be >= 1, got {batch_size}")
    seeds = list(seeds)
    batches = [seeds[i:i + batch_size] for i in range(0, len(seeds), batch_size)]
    return batches[rank::world_size]


def rank_batches(ctx: DistContext, ids: Sequence[int], batch_size: int) -> List[List[int]]:
    """This rank's contiguous batches of ``ids`` (:func:`seed_batches` with the context's rank):
    how existing samples (a folder, a loop's synthetic array) are sharded like generated ones."""
    return seed_batches(ids, batch_size, ctx.rank, ctx.world_size)


def sampler_kwargs(sampler: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The :func:`edm_sampler` keyword arguments from a ``SamplerConfig`` dict."""
    return {k: sampler[k] for k in SAMPLER_KEYS if k in (sampler or {})}


@torch.no_grad()
def sample_batch(denoiser: Callable, seeds: Sequence[int], data_shape: Sequence[int], *, label_dim: int = 0,
                 sampler: Optional[Dict[str, Any]] = None, device: str | torch.device = "cpu",
                 class_label: Optional[int] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Sample one batch: latents, labels and churn noise all drawn per seed (EDM's order).

    Args:
        denoiser: D(x, sigma, class_labels).
        seeds: one integer per sample.
        data_shape: one sample's shape, (C, H, W) or (d,).
        label_dim: classes; > 0 draws a uniform class per seed, unless ``class_label`` fixes it.
        sampler: ``SamplerConfig`` dict (EDM Algorithm 2 settings).
        class_label: the class of every sample (``sims-sample --class K``), or None.
    Returns:
        (samples [len(seeds), *data_shape] float32 on CPU, one-hot labels [len(seeds), label_dim] or None).
    Raises:
        InputError: a class label outside [0, label_dim) or given to an unconditional model.
    """
    noise = SeedNoise(seeds, device=device)
    latents = noise.randn(*data_shape)
    labels = None
    if label_dim > 0:
        idx = noise.randint(label_dim)  # drawn even when fixed, so churn noise is the same either way
        if class_label is not None:
            if not 0 <= int(class_label) < label_dim:
                raise InputError(f"class {class_label} outside [0, {label_dim})")
            idx = torch.full_like(idx, int(class_label))
        labels = torch.nn.functional.one_hot(idx, label_dim).float().to(device)
    elif class_label is not None:
        raise InputError("a class label was given but the model is unconditional")
    x = edm_sampler(denoiser, latents, class_labels=labels, randn_like=noise.randn_like, **sampler_kwargs(sampler))
    return x.cpu(), (labels.cpu() if labels is not None else None)


def generate(ctx: DistContext, denoiser: Callable, seeds: Sequence[int], data_shape: Sequence[int], *,
             label_dim: int = 0, sampler: Optional[Dict[str, Any]] = None, batch_size: int = 256,
             class_label: Optional[int] = None, skip: Optional[Callable[[List[int]], List[int]]] = None,
             progress: bool = False) -> Iterator[Tuple[List[int], torch.Tensor, Optional[torch.Tensor]]]:
    """The sampling loop: this rank's seed batches of ``seeds``, sampled on ``ctx.device``.

    Args:
        ctx: the job's distributed context (batches are dealt round-robin to its ranks).
        denoiser, data_shape, label_dim, sampler, class_label: as :func:`sample_batch`.
        batch_size: seeds per batch.
        skip: ``skip(batch) -> the seeds of the batch still to make`` (resume: seeds already on
            disk are left out; an empty list skips the batch).
        progress: a progress bar on rank 0.
    Yields:
        (seeds of the batch, samples [B, *data_shape] float32 CPU, labels [B, label_dim] or None).
    """
    if ctx.device.type == "cpu":
        torch.set_flush_denormal(True)  # subnormal activations take the CPU's slow path
    batches = rank_batches(ctx, seeds, batch_size)
    iterator = batches
    if progress and ctx.is_main:
        from tqdm import tqdm

        iterator = tqdm(batches, desc=f"sampling ({ctx.world_size} proc)", unit="batch")
    for batch in iterator:
        todo = skip(batch) if skip is not None else batch
        if not todo:
            continue
        x, labels = sample_batch(denoiser, todo, data_shape, label_dim=label_dim, sampler=sampler, device=ctx.device,
                                 class_label=class_label)
        yield list(todo), x, labels


def sample_path(out_dir: Path, seed: int, is_image: bool) -> Path:
    """``{seed:06d}.png`` for an image, ``{seed:06d}.npy`` for a vector, in ``out_dir``."""
    return Path(out_dir) / f"{int(seed):06d}{'.png' if is_image else '.npy'}"


def write_samples(out_dir: str | Path, seeds: Sequence[int], x: torch.Tensor) -> None:
    """Write one file per seed, each atomically: PNG (pixels by :func:`sims.data.images.to_uint8`)
    for images [N, C, H, W], float32 ``.npy`` for vectors [N, d]."""
    from PIL import Image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if x.ndim == 4:
        for seed, img in zip(seeds, to_hwc_uint8(x)):
            pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
            atomic_write(sample_path(out_dir, seed, True), lambda p, pil=pil: pil.save(p, format="PNG"))
    else:
        for seed, v in zip(seeds, x.numpy().astype(np.float32)):
            def write(p, v=v):
                with open(p, "wb") as fh:
                    np.save(fh, v)
            atomic_write(sample_path(out_dir, seed, False), write)


def generate_to_folder(ctx: DistContext, denoiser: Callable, seeds: Sequence[int], out_dir: str | Path,
                       data_shape: Sequence[int], *, label_dim: int = 0, sampler: Optional[Dict[str, Any]] = None,
                       batch_size: int = 256, class_label: Optional[int] = None, progress: bool = False) -> int:
    """Generate this rank's share of ``seeds`` into ``out_dir`` (seeds whose file exists are skipped:
    re-running resumes). Returns the number of samples this rank wrote."""
    out_dir = Path(out_dir)
    is_image = len(data_shape) == 3
    written = 0

    def missing(batch: List[int]) -> List[int]:
        return [s for s in batch if not sample_path(out_dir, s, is_image).exists()]

    for batch, x, _ in generate(ctx, denoiser, seeds, data_shape, label_dim=label_dim, sampler=sampler,
                                batch_size=batch_size, class_label=class_label, skip=missing, progress=progress):
        write_samples(out_dir, batch, x)
        written += len(batch)
    return written


def gather_samples(ctx: DistContext, parts: Dict[int, np.ndarray]) -> np.ndarray:
    """Concatenate every rank's ``{first seed index: samples}`` in seed order, on every rank."""
    merged: Dict[int, np.ndarray] = {}
    for d in ctx.all_gather_object(parts):
        merged.update(d)
    return np.concatenate([merged[k] for k in sorted(merged)])
