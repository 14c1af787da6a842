"""Backbones F(x_in, c_noise, class_labels) for the EDM denoiser (Karras et al. 2022, Table 1).

Every backbone has ``forward(x, noise_labels, class_labels=None) -> Tensor`` of x's shape, where
noise_labels is c_noise = ln(sigma)/4 of shape [N] and class_labels is one-hot/soft
[N, label_dim], integer [N] or None. Wrap one in :class:`sims.diffusion.EDMPrecond` to get a
denoiser D(x; sigma).

- ``ddpmpp``: DDPM++ U-Net (Song et al. 2021) as configured in EDM (:mod:`sims.networks.ddpmpp`).
- ``mlp``: residual MLP for vector data [N, d] (:mod:`sims.networks.mlp`).
- ``diffusers_unet``: diffusers' UNet2DModel behind the same signature (:mod:`sims.networks.diffusers_unet`).
"""
from __future__ import annotations

from typing import Any

from torch import nn

from sims.networks.ddpmpp import DDPMpp, PositionalEmbedding
from sims.networks.mlp import MLPBackbone

ARCHS = ("ddpmpp", "mlp", "diffusers_unet")


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (scalars) in ``module`` (only those with requires_grad if ``trainable_only``)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def build_backbone(cfg: Any, img_resolution: int, img_channels: int, label_dim: int = 0) -> nn.Module:
    """Build the backbone F named by ``cfg.arch`` from a :class:`sims.config.NetworkConfig`.

    Args:
        cfg: NetworkConfig (dataclass or OmegaConf node) with arch, model_channels, channel_mult,
            num_blocks, attn_resolutions, dropout, embedding_dim_mult, hidden_dim, num_layers.
            An optional ``adaptive_scale`` (bool, default True) selects FiLM vs additive embedding
            injection in DDPM++ (False reproduces EDM's DDPM++ exactly: 55.7 M for CIFAR-10).
        img_resolution: image side in pixels (ignored for ``mlp``).
        img_channels: image channels; for ``mlp`` the data dimension d (data is [N, d]).
        label_dim: number of classes for conditioning (0: unconditional).
    Returns:
        an ``nn.Module`` with ``forward(x, noise_labels, class_labels=None)``.
    Raises:
        ValueError: unknown ``arch`` (the message lists the valid ones) or an invalid geometry
            (resolution not divisible by 2**(levels-1), attention resolution not in the U-Net).
        ImportError: ``diffusers_unet`` without diffusers installed.
    """
    arch = str(cfg.arch).lower()
    if arch == "ddpmpp":
        return DDPMpp(img_resolution=int(img_resolution), in_channels=int(img_channels), label_dim=int(label_dim),
                      model_channels=int(cfg.model_channels), channel_mult=list(cfg.channel_mult),
                      num_blocks=int(cfg.num_blocks), attn_resolutions=list(cfg.attn_resolutions),
                      dropout=float(cfg.dropout), embedding_dim_mult=int(cfg.embedding_dim_mult),
                      adaptive_scale=bool(getattr(cfg, "adaptive_scale", True)))
    if arch == "mlp":
        return MLPBackbone(data_dim=int(img_channels), hidden_dim=int(cfg.hidden_dim),
                           num_layers=int(cfg.num_layers), label_dim=int(label_dim), dropout=float(cfg.dropout))
    if arch == "diffusers_unet":
        from sims.networks.diffusers_unet import DiffusersUNet, diffusers_unet_kwargs

        kwargs = diffusers_unet_kwargs(int(img_resolution), int(img_channels), int(cfg.model_channels),
                                       list(cfg.channel_mult), int(cfg.num_blocks), list(cfg.attn_resolutions),
                                       float(cfg.dropout), int(cfg.embedding_dim_mult), int(label_dim),
                                       adaptive_scale=bool(getattr(cfg, "adaptive_scale", True)))
        return DiffusersUNet(kwargs)
    raise ValueError(f"unknown network arch {cfg.arch!r}; valid choices: {', '.join(ARCHS)}")


__all__ = ["ARCHS", "DDPMpp", "MLPBackbone", "PositionalEmbedding", "build_backbone", "count_parameters"]
