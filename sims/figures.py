"""Pictures of samples (image grids, 2-D scatter plots) and small line plots, written atomically.

Matplotlib is used through its Agg canvas directly (no global backend switch).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from sims.data.images import to_hwc_uint8
from sims.utils import atomic_write


def new_figure(width: float, height: float, ncols: int = 1):
    """(figure, axes) on an Agg canvas; ``axes`` is a list when ``ncols`` > 1."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, (axes if ncols > 1 else axes[0])


def save_figure(fig, path: str | Path) -> Path:
    """Write a matplotlib figure as PNG, atomically."""
    path = Path(path)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png"))
    return path


def make_grid(images: np.ndarray, ncol: Optional[int] = None, pad: int = 1):
    """Tile uint8 images [N, H, W, C] into one PIL image (``pad`` white pixels between)."""
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
    """Save a picture of samples: an image grid for [N, C, H, W], a scatter plot for [N, d] (d ≥ 2,
    first two coordinates) with ``reference`` (real points) underneath in grey."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if samples.ndim == 4:
        grid = make_grid(to_hwc_uint8(samples))
        if upscale > 1:
            from PIL import Image

            grid = grid.resize((grid.width * upscale, grid.height * upscale), Image.NEAREST)
        atomic_write(path, lambda p: grid.save(p, format="PNG"))
        return path
    fig, ax = new_figure(4, 4)
    if reference is not None:
        ax.scatter(reference[:, 0], reference[:, 1], s=2, c="0.7", label="real")
    ax.scatter(samples[:, 0], samples[:, 1], s=2, c="C0", label="samples")
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=7)
    return save_figure(fig, path)


def save_side_by_side(path: str | Path, left: torch.Tensor, right: torch.Tensor, titles) -> Path:
    """Two sample pictures side by side (image grids of up to 100, or scatter plots)."""
    fig, axes = new_figure(8, 4.2, ncols=2)
    for ax, x, title in zip(axes, (left, right), titles):
        if x.ndim == 4:
            g = np.asarray(make_grid(to_hwc_uint8(x[:100])))
            ax.imshow(g, cmap="gray" if g.ndim == 2 else None, interpolation="nearest")
            ax.axis("off")
        else:
            ax.scatter(x[:, 0], x[:, 1], s=3)
        ax.set_title(title)
    return save_figure(fig, path)
