"""The denoiser a network config describes: backbone + EDM preconditioning (Karras et al. 2022, Table 1),
and the training precisions. Lightning-free, so that ``validate`` can build a config's network on the
meta device without importing Lightning (seconds to a config error)."""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch

from sims.diffusion import EDMPrecond
from sims.errors import ConfigError
from sims.networks import build_backbone

PRECISIONS = {"32-true": None, "32": None, "bf16-mixed": torch.bfloat16, "bf16": torch.bfloat16}


def autocast_dtype(precision: str) -> Optional[torch.dtype]:
    """Map ``train.precision`` to the backbone's autocast dtype (mixed precision only inside F).

    Raises:
        ConfigError: a precision other than 32-true / bf16-mixed.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"train.precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    return PRECISIONS[precision]


def build_denoiser(network: Dict[str, Any], data_shape: Sequence[int], label_dim: int,
                   sigma_data: float = 0.5, precision: str = "32-true") -> EDMPrecond:
    """Backbone from the network config + EDM preconditioning.

    Args:
        network: a ``NetworkConfig`` as a dict (missing keys take the schema's defaults).
        data_shape: one sample's shape, (C, H, W) for images or (d,) for vectors.
        label_dim: number of classes (0: unconditional).
    Raises:
        ConfigError: a data shape that is neither (C, H, W) nor (d,).
    """
    from omegaconf import OmegaConf

    from sims.config import NetworkConfig

    net_cfg = OmegaConf.merge(OmegaConf.structured(NetworkConfig), network)
    if len(data_shape) == 3:
        channels, resolution = data_shape[0], data_shape[1]
    elif len(data_shape) == 1:
        channels, resolution = data_shape[0], 1
    else:
        raise ConfigError(f"data_shape must be (C, H, W) or (d,), got {tuple(data_shape)}")
    backbone = build_backbone(net_cfg, img_resolution=resolution, img_channels=channels, label_dim=label_dim)
    return EDMPrecond(backbone, sigma_data=sigma_data, autocast_dtype=autocast_dtype(precision), label_dim=label_dim)
