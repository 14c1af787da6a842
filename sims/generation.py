"""Seeds → samples, sharded over ranks, one random stream per seed (SPEC §4, "Generation").

Every sample is a pure function of (weights, seed, sampler settings): its latent, its class label
and its churn noise come from a ``torch.Generator`` seeded by its integer seed
(:class:`sims.diffusion.SeedNoise`). Seeds are split into contiguous batches that are dealt
round-robin to ranks, so the batches — and therefore the outputs, bit for bit — do not depend on
the number of processes. Images are written as ``{seed:06d}.png`` with
pixel = clip(round(127.5·x + 127.5), 0, 255).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from sims.diffusion import SeedNoise, edm_sampler
from sims.utils import atomic_write

SAMPLER_KEYS = ("num_steps", "sigma_min", "sigma_max", "rho", "S_churn", "S_min", "S_max", "S_noise", "solver")


def dist_info() -> Tuple[int, int]:
    """(rank, world_size) of the initialised ``torch.distributed`` group, else (launcher rank, 1).

    Before the process group exists (Lightning's DDP launcher re-runs the command for ranks ≥ 1,
    which join at their first ``fit``), the rank comes from the launcher's environment (``RANK``, or
    ``NODE_RANK``/``LOCAL_RANK``) so that only rank 0 writes; the world size is 1 until then.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    env = os.environ
    if "RANK" in env:
        return int(env["RANK"]), 1
    return int(env.get("NODE_RANK", 0)) * 1000 + int(env.get("LOCAL_RANK", 0)), 1


def barrier() -> None:
    """``torch.distributed.barrier()`` when a process group is initialised; no-op otherwise."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def seed_batches(seeds: Sequence[int], batch_size: int, rank: int = 0, world_size: int = 1) -> List[List[int]]:
    """Split ``seeds`` into contiguous batches of ``batch_size`` and return this rank's share
    (batches rank, rank + world_size, ...).

    Raises:
        ValueError: batch_size < 1 or rank outside [0, world_size).
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of size {world_size}")
    seeds = list(seeds)
    batches = [seeds[i:i + batch_size] for i in range(0, len(seeds), batch_size)]
    return batches[rank::world_size]


def sampler_kwargs(sampler: Dict[str, Any]) -> Dict[str, Any]:
    """The :func:`edm_sampler` keyword arguments from a ``SamplerConfig`` dict."""
    return {k: sampler[k] for k in SAMPLER_KEYS if k in sampler}


@torch.no_grad()
def sample_seeds(denoiser: Callable, seeds: Sequence[int], data_shape: Sequence[int], *, label_dim: int = 0,
                 sampler: Optional[Dict[str, Any]] = None, device: str | torch.device = "cpu",
                 class_labels: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Sample one batch: latents, labels and churn noise all drawn per seed.

    Args:
        denoiser: D(x, sigma, class_labels).
        seeds: one integer per sample.
        data_shape: one sample's shape, (C, H, W) or (d,).
        label_dim: classes; > 0 draws a uniform class per seed unless ``class_labels`` is given.
        sampler: ``SamplerConfig`` dict (EDM Algorithm 2 settings).
    Returns:
        (samples [len(seeds), *data_shape] float32 on CPU, one-hot labels [len(seeds), label_dim] or None).
    """
    noise = SeedNoise(seeds, device=device)
    latents = noise.randn(*data_shape)
    labels = None
    if label_dim > 0:
        if class_labels is None:
            idx = noise.randint(label_dim)
            class_labels = torch.nn.functional.one_hot(idx, label_dim).float()
        labels = class_labels.to(device)
    x = edm_sampler(denoiser, latents, class_labels=labels, randn_like=noise.randn_like,
                    **sampler_kwargs(sampler or {}))
    return x.cpu(), (labels.cpu() if labels is not None else None)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] images [N, C, H, W] → uint8 [N, H, W, C]: clip(round(127.5·x + 127.5), 0, 255)."""
    return (images * 127.5 + 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def png_path(out_dir: Path, seed: int) -> Path:
    return Path(out_dir) / f"{seed:06d}.png"


def write_pngs(out_dir: str | Path, seeds: Sequence[int], images: torch.Tensor) -> None:
    """Write ``{seed:06d}.png`` for each image ([N, C, H, W] in [-1, 1]), each atomically."""
    from PIL import Image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for seed, img in zip(seeds, to_uint8(images)):
        pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
        atomic_write(png_path(out_dir, seed), lambda p, pil=pil: pil.save(p, format="PNG"))


def generate_to_folder(denoiser: Callable, seeds: Sequence[int], out_dir: str | Path, data_shape: Sequence[int], *,
                       label_dim: int = 0, sampler: Optional[Dict[str, Any]] = None, batch_size: int = 256,
                       device: str | torch.device = "cpu", skip_existing: bool = True,
                       progress: bool = False) -> int:
    """Generate this rank's share of ``seeds`` into ``out_dir`` as PNGs (images) or ``.npy`` (vectors).

    A batch whose files all exist is skipped (re-running resumes). Returns the number of samples written
    by this rank. Vectors are written as ``{seed:06d}.npy`` ([d] float32).
    """
    rank, world = dist_info()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    is_image = len(data_shape) == 3
    batches = seed_batches(seeds, batch_size, rank, world)
    written = 0
    iterator = batches
    if progress and rank == 0:
        from tqdm import tqdm

        iterator = tqdm(batches, desc=f"sampling ({world} proc)", unit="batch")
    for batch in iterator:
        suffix = ".png" if is_image else ".npy"
        if skip_existing and all((out_dir / f"{s:06d}{suffix}").exists() for s in batch):
            continue
        x, _ = sample_seeds(denoiser, batch, data_shape, label_dim=label_dim, sampler=sampler, device=device)
        if is_image:
            write_pngs(out_dir, batch, x)
        else:
            for s, v in zip(batch, x.numpy()):
                atomic_write(out_dir / f"{s:06d}.npy", lambda p, v=v: np.save(open(p, "wb"), v))
        written += len(batch)
    return written


def make_grid(images: np.ndarray, ncol: Optional[int] = None, pad: int = 1):
    """Tile uint8 images [N, H, W, C] into one PIL image (pad pixels of white between)."""
    from PIL import Image

    n, h, w, c = images.shape
    ncol = ncol or int(math.ceil(math.sqrt(n)))
    nrow = int(math.ceil(n / ncol))
    canvas = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, ncol)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = img
    return Image.fromarray(canvas[..., 0] if c == 1 else canvas)


def save_sample_figure(samples: torch.Tensor, path: str | Path, *, upscale: int = 4,
                       reference: Optional[torch.Tensor] = None, title: str = "") -> Path:
    """Save a picture of samples: an image grid for [N, C, H, W], a scatter plot for [N, d] (d ≥ 2).

    For vector data ``reference`` (real points) is drawn underneath in grey.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if samples.ndim == 4:
        grid = make_grid(to_uint8(samples))
        if upscale > 1:
            from PIL import Image

            grid = grid.resize((grid.width * upscale, grid.height * upscale), Image.NEAREST)
        atomic_write(path, lambda p: grid.save(p, format="PNG"))
        return path
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    if reference is not None:
        ax.scatter(reference[:, 0], reference[:, 1], s=2, c="0.7", label="real")
    ax.scatter(samples[:, 0], samples[:, 1], s=2, c="C0", label="samples")
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)
    return path
