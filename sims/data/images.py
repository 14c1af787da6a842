"""The one conversion pair between images in [-1, 1] and 8-bit pixels (SPEC section 4).

    pixel = clip(round(127.5·x + 127.5), 0, 255)        (:func:`to_uint8`)
    x     = pixel / 127.5 − 1                             (:func:`from_uint8`)

Everything that writes a PNG, stores synthetic images, feeds Inception or quantises samples
before features goes through these two functions; :func:`quantize` is their composition (what a
sample looks like after a round trip through a PNG file).
"""
from __future__ import annotations

from typing import Union

import numpy as np
import torch

ArrayLike = Union[torch.Tensor, np.ndarray]


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Quantise images in [-1, 1] to uint8 pixels: clip(round(127.5·x + 127.5), 0, 255).

    Args:
        x: float tensor of any shape and layout (typically [N, C, H, W]), nominally in [-1, 1].
    Returns:
        uint8 tensor of the same shape, on the same device. uint8 input is returned unchanged.
    """
    if x.dtype == torch.uint8:
        return x
    return (x.float() * 127.5 + 127.5).round().clamp(0, 255).to(torch.uint8)


def from_uint8(pixels: ArrayLike) -> torch.Tensor:
    """uint8 pixels p → float32 x = p / 127.5 − 1 in [-1, 1] (the inverse of :func:`to_uint8`).

    Args:
        pixels: uint8 array or tensor of any shape.
    Returns:
        float32 tensor of the same shape.
    Raises:
        TypeError: pixels are not uint8.
    """
    t = torch.as_tensor(pixels)
    if t.dtype != torch.uint8:
        raise TypeError(f"expected uint8 pixels, got {t.dtype}")
    return t.to(torch.float32).div_(127.5).sub_(1.0)


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Images [N, C, H, W] as they come back from a PNG: ``from_uint8(to_uint8(x))``; other ranks
    (vectors [N, d]) are returned unchanged."""
    if x.ndim != 4:
        return x
    return from_uint8(to_uint8(x)).to(x.device)


def to_hwc_uint8(x: torch.Tensor) -> np.ndarray:
    """Images [N, C, H, W] in [-1, 1] → uint8 numpy [N, H, W, C] (PNG/zip layout), via :func:`to_uint8`."""
    return to_uint8(x).permute(0, 2, 3, 1).cpu().numpy()


def from_hwc_uint8(pixels: ArrayLike) -> torch.Tensor:
    """uint8 [N, H, W, C] or [N, H, W] → float32 [N, C, H, W] in [-1, 1], via :func:`from_uint8`."""
    t = torch.as_tensor(np.asarray(pixels))
    if t.ndim == 3:
        t = t.unsqueeze(-1)
    return from_uint8(t).permute(0, 3, 1, 2).contiguous()
