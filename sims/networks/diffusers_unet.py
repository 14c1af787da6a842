"""Adapter: diffusers' ``UNet2DModel`` as a backbone F(x_in, c_noise, class_labels).

For comparisons and benchmarks against the in-house DDPM++ (:mod:`sims.networks.ddpmpp`).
``UNet2DModel`` (von Platen et al., diffusers; the DDPM U-Net of Ho et al. 2020) is called with
c_noise as its (float) timestep, so its sinusoidal time embedding sees EDM's c_noise = ln(sigma)/4
exactly like DDPM++'s positional embedding does. diffusers is imported lazily.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn

from sims.networks.inputs import labels_to_onehot
from sims.networks.layers import group_norm_groups


def _import_unet2d():
    try:
        from diffusers import UNet2DModel
    except ImportError as exc:  # pragma: no cover - diffusers is a core dependency
        raise ImportError("arch='diffusers_unet' needs the 'diffusers' package: pip install 'diffusers>=0.27'") from exc
    return UNet2DModel


def diffusers_unet_kwargs(img_resolution: int, img_channels: int, model_channels: int = 128,
                          channel_mult: Sequence[int] = (2, 2, 2), num_blocks: int = 4,
                          attn_resolutions: Sequence[int] = (16,), dropout: float = 0.0,
                          channel_mult_emb: int = 4, label_dim: int = 0,
                          adaptive_scale: bool = True) -> Dict[str, Any]:
    """``UNet2DModel`` keyword arguments with the same layout as a DDPM++ configuration.

    Level l has ``model_channels * channel_mult[l]`` channels and ``num_blocks`` ResNet layers
    (``num_blocks + 1`` in the decoder), attention blocks (single head) at the resolutions in
    ``attn_resolutions``, a time embedding of width ``model_channels * channel_mult_emb``,
    GroupNorm groups that divide every width, and scale-shift time injection when
    ``adaptive_scale`` (``resnet_time_scale_shift='scale_shift'``, like DDPM++'s FiLM option; False is
    additive injection, like EDM's DDPM++). diffusers' layout differs in details (first conv to
    ``model_channels * channel_mult[0]``, strided-conv down-sampling, attention after every layer of
    an attention level), so the parameter counts differ; see :func:`diffusers_unet_kwargs_matching`.

    Raises:
        ValueError: img_resolution not divisible by 2**(len(channel_mult)-1).
    """
    factor = 2 ** (len(channel_mult) - 1)
    if img_resolution % factor:
        raise ValueError(f"img_resolution {img_resolution} is not divisible by {factor}")
    widths = [int(model_channels * m) for m in channel_mult]
    res = [img_resolution >> level for level in range(len(channel_mult))]
    down = tuple("AttnDownBlock2D" if r in attn_resolutions else "DownBlock2D" for r in res)
    up = tuple("AttnUpBlock2D" if r in attn_resolutions else "UpBlock2D" for r in reversed(res))
    kwargs: Dict[str, Any] = dict(
        sample_size=img_resolution, in_channels=img_channels, out_channels=img_channels,
        block_out_channels=tuple(widths), layers_per_block=int(num_blocks),
        down_block_types=down, up_block_types=up, dropout=float(dropout),
        time_embedding_dim=int(model_channels * channel_mult_emb),
        norm_num_groups=group_norm_groups(math.gcd(*widths)), attention_head_dim=None,
        flip_sin_to_cos=True, freq_shift=0,
        resnet_time_scale_shift="scale_shift" if adaptive_scale else "default",
    )
    if label_dim:
        kwargs["num_class_embeds"] = int(label_dim)
    return kwargs


def count_unet2d_parameters(kwargs: Dict[str, Any]) -> int:
    """Parameter count of ``UNet2DModel(**kwargs)``, built on the meta device (no memory, fast)."""
    UNet2DModel = _import_unet2d()
    with torch.device("meta"):
        model = UNet2DModel(**kwargs)
    return sum(p.numel() for p in model.parameters())


def diffusers_unet_kwargs_matching(target_params: int, img_resolution: int, img_channels: int,
                                   model_channels: int = 128, channel_mult: Sequence[int] = (2, 2, 2),
                                   step: int = 8, **kw) -> Dict[str, Any]:
    """Like :func:`diffusers_unet_kwargs`, with the base width chosen so the count is nearest ``target_params``.

    Searches base widths ``model_channels +- k*step`` (multiples of ``step``, which keeps GroupNorm
    groups valid) for the UNet2DModel whose parameter count is closest to ``target_params``
    (e.g. ``count_parameters(DDPMpp(...))``) — for per-parameter throughput comparisons.
    """
    best, best_err = None, float("inf")
    lo = max(step, (model_channels // 2) // step * step)
    hi = (model_channels * 3 // 2) // step * step + step
    for base in range(lo, hi + 1, step):
        kwargs = diffusers_unet_kwargs(img_resolution, img_channels, base, channel_mult, **kw)
        err = abs(count_unet2d_parameters(kwargs) - target_params)
        if err < best_err:
            best, best_err = kwargs, err
    assert best is not None
    return best


class DiffusersUNet(nn.Module):
    """diffusers ``UNet2DModel`` behind the backbone signature of :mod:`sims.networks`.

    ``forward(x, noise_labels, class_labels=None, augment_labels=None)``.

    Args:
        unet_kwargs: keyword arguments for ``UNet2DModel`` (see :func:`diffusers_unet_kwargs`).
            If ``num_class_embeds`` is set, the class embedding is a bias-free Linear on one-hot /
            soft labels (so the all-zero label means 'unconditional', as for DDPM++).
    forward: x [N, C, H, W]; noise_labels c_noise float [N] (passed as the timestep);
        class_labels float [N, label_dim], integer [N] or None; augment_labels None -> [N, C, H, W].
    Raises:
        ImportError: diffusers is not installed.
        ValueError: bad label or noise-label shapes; augment_labels that are not None.
    """

    def __init__(self, unet_kwargs: Dict[str, Any]):
        super().__init__()
        UNet2DModel = _import_unet2d()
        self.unet = UNet2DModel(**unet_kwargs)
        self.label_dim = int(unet_kwargs.get("num_class_embeds") or 0)
        if self.label_dim:
            emb_dim = self.unet.class_embedding.embedding_dim
            self.unet.class_embedding = nn.Linear(self.label_dim, emb_dim, bias=False)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor,
                class_labels: Optional[torch.Tensor] = None,
                augment_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        if augment_labels is not None:
            raise ValueError("DiffusersUNet has no augmentation conditioning; augment_labels must be None")
        noise_labels = torch.as_tensor(noise_labels, device=x.device, dtype=torch.float32)
        if noise_labels.ndim == 0:
            noise_labels = noise_labels.expand(x.shape[0])
        if noise_labels.shape != (x.shape[0],):
            raise ValueError(f"noise_labels must have shape [N]={x.shape[0]}, got {tuple(noise_labels.shape)}")
        labels = None
        if self.label_dim:
            labels = labels_to_onehot(class_labels, self.label_dim, x.shape[0], x.device, torch.float32)
            if labels is None:
                labels = torch.zeros(x.shape[0], self.label_dim, device=x.device)
        elif class_labels is not None:
            raise ValueError("class_labels were given to an unconditional backbone (label_dim=0)")
        return self.unet(x, noise_labels, class_labels=labels, return_dict=False)[0]
