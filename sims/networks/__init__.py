"""Backbones F(x_in, c_noise, class_labels, augment_labels) for the EDM denoiser (Karras et al. 2022, Table 1).

Every backbone has ``forward(x, noise_labels, class_labels=None, augment_labels=None) -> Tensor`` of
x's shape, where noise_labels is c_noise = ln(sigma)/4 of shape [N], class_labels is one-hot/soft
[N, label_dim], integer [N] or None (None for a conditional network = the all-zero label; labels for
an unconditional one raise ValueError), and augment_labels is [N, augment_dim] or None. Wrap one in
:class:`sims.diffusion.EDMPrecond` to get a denoiser D(x; sigma).

- ``ddpmpp``: EDM's SongUNet with the DDPM++ settings (:mod:`sims.networks.ddpmpp`; EDM_FORMAT §2.3).
- ``adm``: EDM's DhariwalUNet, the ImageNet-64 network (:mod:`sims.networks.adm`; EDM_FORMAT §2.5).
- ``mlp``: residual MLP for vector data [N, d] (:mod:`sims.networks.mlp`).
- ``diffusers_unet``: diffusers' UNet2DModel behind the same signature (:mod:`sims.networks.diffusers_unet`).

Module/parameter names of ``ddpmpp`` and ``adm`` equal EDM's (``map_layer0``, ``enc['32x32_block0']``,
…), so an EDM network's state dict loads after dropping ``model.`` and the ``resample_filter`` buffers.
Shared layers live in :mod:`sims.networks.layers`.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from sims.networks.adm import ADM
from sims.networks.ddpmpp import DDPMpp
from sims.networks.layers import PositionalEmbedding, UNetBlock
from sims.networks.mlp import MLPBackbone

ARCHS = ("ddpmpp", "adm", "mlp", "diffusers_unet")


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (scalars) in ``module`` (only those with requires_grad if ``trainable_only``)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def build_backbone(cfg: Any, img_resolution: int, img_channels: int, label_dim: int = 0) -> nn.Module:
    """Build the backbone F named by ``cfg.arch`` from a :class:`sims.config.NetworkConfig`.

    Args:
        cfg: NetworkConfig (dataclass or OmegaConf node) with EDM's key names: arch, model_channels,
            channel_mult, channel_mult_emb, num_blocks, attn_resolutions, dropout, adaptive_scale
            (ddpmpp only; False = EDM's additive injection), augment_dim, label_dropout,
            channels_per_head (adm only), hidden_dim, num_layers (mlp only).
        img_resolution: image side in pixels (ignored for ``mlp``).
        img_channels: image channels; for ``mlp`` the data dimension d (data is [N, d]).
        label_dim: number of classes for conditioning (0: unconditional).
    Returns:
        an ``nn.Module`` with ``forward(x, noise_labels, class_labels=None, augment_labels=None)``.
    Raises:
        ValueError: unknown ``arch`` (the message lists the valid ones), an invalid geometry
            (resolution not divisible by 2**(levels-1), attention resolution not in the U-Net, a
            GroupNorm width EDM's group rule rejects), or ``augment_dim`` / ``label_dropout`` set
            for an arch that does not support them (mlp, diffusers_unet).
        ImportError: ``diffusers_unet`` without diffusers installed.
    """
    arch = str(cfg.arch).lower()
    augment_dim = int(getattr(cfg, "augment_dim", 0) or 0)
    label_dropout = float(getattr(cfg, "label_dropout", 0.0) or 0.0)
    if arch in ("ddpmpp", "adm"):
        common = dict(img_resolution=int(img_resolution), in_channels=int(img_channels), label_dim=int(label_dim),
                      augment_dim=augment_dim, model_channels=int(cfg.model_channels),
                      channel_mult=list(cfg.channel_mult), channel_mult_emb=int(cfg.channel_mult_emb),
                      num_blocks=int(cfg.num_blocks), attn_resolutions=list(cfg.attn_resolutions),
                      dropout=float(cfg.dropout), label_dropout=label_dropout)
        if arch == "ddpmpp":
            return DDPMpp(**common, adaptive_scale=bool(getattr(cfg, "adaptive_scale", False)))
        return ADM(**common, channels_per_head=int(getattr(cfg, "channels_per_head", 64)))
    if arch in ("mlp", "diffusers_unet") and (augment_dim or label_dropout):
        raise ValueError(f"arch {arch!r} supports neither augment_dim nor label_dropout "
                         f"(got augment_dim={augment_dim}, label_dropout={label_dropout}); use ddpmpp or adm")
    if arch == "mlp":
        return MLPBackbone(data_dim=int(img_channels), hidden_dim=int(cfg.hidden_dim),
                           num_layers=int(cfg.num_layers), label_dim=int(label_dim), dropout=float(cfg.dropout))
    if arch == "diffusers_unet":
        from sims.networks.diffusers_unet import DiffusersUNet, diffusers_unet_kwargs

        kwargs = diffusers_unet_kwargs(int(img_resolution), int(img_channels), int(cfg.model_channels),
                                       list(cfg.channel_mult), int(cfg.num_blocks), list(cfg.attn_resolutions),
                                       float(cfg.dropout), int(cfg.channel_mult_emb), int(label_dim),
                                       adaptive_scale=bool(getattr(cfg, "adaptive_scale", False)))
        return DiffusersUNet(kwargs)
    raise ValueError(f"unknown network arch {cfg.arch!r}; valid choices: {', '.join(ARCHS)}")


__all__ = ["ADM", "ARCHS", "DDPMpp", "MLPBackbone", "PositionalEmbedding", "UNetBlock", "build_backbone",
           "count_parameters"]
