"""The geometric resampling of EDM's augmentation pipeline (:mod:`sims.data.augment`).

:func:`warp` executes per-image inverse maps G⁻¹ as EDM's ``AugmentPipe`` does: batch-wide reflect
padding (:func:`_margins`), 2× upsampling with the Symlet-6 filter :data:`SYM6`, bilinear
``grid_sample`` on a 2× canvas with a 3-pixel border, 2× downsampling and cropping. The facts,
their sources and what is exact or approximate (:data:`SYM6_OFFSET`) are listed in the docstring of
:mod:`sims.data.augment`. No code from NVlabs/edm or NVlabs/stylegan2-ada-pytorch is copied.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["SYM6", "SYM6_OFFSET", "warp"]

# Symlet-6 scaling (low-pass) filter, 12 taps; the same numbers as PyWavelets' ``sym6`` rec_lo and
# the 'sym6' entry of EDM's/StyleGAN2-ADA's wavelet table (a mathematical constant).
SYM6 = (0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
        0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
        -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148)
_HZ_PAD = len(SYM6) // 4  # 3: canvas border (output pixels) and half the padding slack
# Sub-pixel offset of the effective transform centre (pixels, both axes; see sims.data.augment).
SYM6_OFFSET = (sum(i * h for i, h in enumerate(SYM6)) / sum(SYM6) - 5.0) / 2.0


def _rot(theta: torch.Tensor) -> torch.Tensor:
    """[N] angles → [N, 2, 2] rotation matrices [[cos, −sin], [sin, cos]]."""
    c, s = torch.cos(theta), torch.sin(theta)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def _diag(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    z = torch.zeros_like(a)
    return torch.stack([torch.stack([a, z], -1), torch.stack([z, b], -1)], -2)


def _margins(g_inv: torch.Tensor, height: int, width: int) -> Tuple[int, int, int, int]:
    """Reflect padding (left, right, top, bottom) that covers every image's source region.

    g_inv: [N, 2, 3] inverse maps (centred pixel coordinates). The output corners (±cx, ±cy) are
    mapped to the input; each side gets the largest extent beyond the image over the batch plus
    2·Hz_pad pixels, clipped to [0, size − 1] (``reflect`` needs pad < size) and rounded up.
    """
    cx, cy = (width - 1) / 2, (height - 1) / 2
    corners = torch.tensor([[-cx, -cy], [cx, -cy], [cx, cy], [-cx, cy]], dtype=torch.float32, device=g_inv.device)
    q = torch.einsum("nij,kj->nki", g_inv[:, :, :2], corners) + g_inv[:, None, :, 2]  # [N, 4, 2]
    ext = torch.stack([(-q[..., 0]).amax(), q[..., 0].amax(), (-q[..., 1]).amax(), q[..., 1].amax()])
    centre = torch.tensor([cx, cx, cy, cy], dtype=torch.float32, device=g_inv.device)
    hi = torch.tensor([width - 1, width - 1, height - 1, height - 1], dtype=torch.float32, device=g_inv.device)
    m = torch.minimum((ext + 2 * _HZ_PAD - centre).clamp(min=0), hi).ceil()
    left, right, top, bottom = (int(v) for v in m.tolist())
    return left, right, top, bottom


def _filter(device: torch.device) -> torch.Tensor:
    return torch.tensor(SYM6, dtype=torch.float32, device=device)


def warp(images: torch.Tensor, g_inv: torch.Tensor, pad: Optional[Tuple[int, int, int, int]] = None) -> torch.Tensor:
    """EDM's geometric resampling of images with given inverse maps.

    Args:
        images: [K, C, H, W] float.
        g_inv: [K, 2, 3] float: output → input map in centred pixel coordinates (x right, y down,
            origin at ((W−1)/2, (H−1)/2)); [:, :, :2] linear part, [:, :, 2] offset.
        pad: reflect padding (left, right, top, bottom); default: computed from ``g_inv`` as EDM does
            (``AugmentPipe.apply`` passes the padding of the whole batch).
    Returns:
        [K, C, H, W] float32: reflect-pad, 2× sym6 upsampling, bilinear ``grid_sample`` (zeros
        outside, align_corners=False) on a 2× canvas with a 3-pixel border, sym6 downsampling, crop.
    """
    k, c, height, width = images.shape
    dev = images.device
    x = images.to(torch.float32)
    g_inv = g_inv.to(device=dev, dtype=torch.float32)
    left, right, top, bottom = _margins(g_inv, height, width) if pad is None else pad
    x = F.pad(x, [left, right, top, bottom], mode="reflect")
    x = x.reshape(k * c, 1, height + top + bottom, width + left + right)
    hp, wp = x.shape[2], x.shape[3]
    h = _filter(dev)
    taps = h.numel()
    # 2x upsampling, u[n] = sum_k h[n + 5 - 2k] c[k]: transposed convolution (stride 2), then crop.
    lo = taps // 2 - 1
    x = F.conv_transpose2d(x, h.view(1, 1, 1, taps), stride=(1, 2))[:, :, :, lo:lo + 2 * wp]
    x = F.conv_transpose2d(x, h.view(1, 1, taps, 1), stride=(2, 1))[:, :, lo:lo + 2 * hp, :]
    x = x.reshape(k, c, 2 * hp, 2 * wp)
    # Canvas sample m sits at output coordinate m/2 - Hz_pad - (size-1)/2; its source is
    # G^-1 of that, which in the upsampled input is index 2 * (coordinate + pad_before + (size-1)/2).
    cx, cy = (width - 1) / 2, (height - 1) / 2
    xs = torch.arange(2 * (width + 2 * _HZ_PAD), device=dev, dtype=torch.float32) / 2 - _HZ_PAD - cx
    ys = torch.arange(2 * (height + 2 * _HZ_PAD), device=dev, dtype=torch.float32) / 2 - _HZ_PAD - cy
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    pts = torch.stack([gx, gy], dim=-1)  # [Hc, Wc, 2]
    src = torch.einsum("nij,hwj->nhwi", g_inv[:, :, :2], pts) + g_inv[:, None, None, :, 2]
    nx = 2 * (src[..., 0] + left + cx)
    ny = 2 * (src[..., 1] + top + cy)
    grid = torch.stack([(2 * nx + 1) / (2 * wp) - 1, (2 * ny + 1) / (2 * hp) - 1], dim=-1)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # 2x downsampling with the adjoint filter, d[i] = sum_j h[j] v[2i + 1 + j] (crops the border).
    x = x.reshape(k * c, 1, x.shape[2], x.shape[3])[:, :, 1:, 1:]
    x = F.conv2d(x, h.view(1, 1, 1, taps), stride=(1, 2))
    x = F.conv2d(x, h.view(1, 1, taps, 1), stride=(2, 1))
    return x.reshape(k, c, height, width)
