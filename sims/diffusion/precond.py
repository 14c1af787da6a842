"""EDM preconditioning (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models", Table 1, column "EDM")."""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch
from torch import nn

from sims.errors import InputError


def expand_sigma(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Broadcast σ (a scalar, shape [1] or shape [N]) to ``x``'s rank: [N, 1, ..., 1] in float32.

    Raises:
        InputError: if σ has more than one dimension or its length is neither N nor 1.
    """
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    if sigma.ndim == 0 or sigma.shape == (1,):
        sigma = sigma.reshape(()).expand(x.shape[0])
    if sigma.ndim != 1 or sigma.shape[0] != x.shape[0]:
        raise InputError(f"sigma must be a scalar or shape [N]={x.shape[0]}, got {tuple(sigma.shape)}")
    return sigma.reshape(-1, *([1] * (x.ndim - 1)))


def edm_coefficients(sigma: torch.Tensor, sigma_data: float = 0.5) -> Tuple[torch.Tensor, ...]:
    """EDM preconditioning coefficients (Karras et al. 2022, Table 1).

    c_skip = σ_d²/(σ²+σ_d²), c_out = σ·σ_d/√(σ²+σ_d²), c_in = 1/√(σ²+σ_d²), c_noise = ¼·ln σ.

    Args:
        sigma: noise level(s), any shape, σ > 0, in data units.
        sigma_data: standard deviation of the data distribution σ_d.
    Returns:
        (c_skip, c_out, c_in, c_noise), each the shape of ``sigma``.
    """
    sigma2 = sigma * sigma
    denom = sigma2 + sigma_data**2
    c_skip = sigma_data**2 / denom
    c_out = sigma * sigma_data / denom.sqrt()
    c_in = 1 / denom.sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


class EDMPrecond(nn.Module):
    """Denoiser D(x;σ) = c_skip·x + c_out·F(c_in·x; c_noise) around a backbone F (EDM Table 1).

    Args:
        backbone: F(x_in, c_noise, class_labels=None) -> Tensor of the shape of x_in;
            c_noise has shape [N].
        sigma_data: σ_d, the data's standard deviation (EDM uses 0.5 for images in [-1, 1]).
        autocast_dtype: if set (e.g. ``torch.bfloat16``), only the backbone call runs under
            autocast; the preconditioning and output stay in float32 (EDM's mixed-precision rule).
        label_dim: number of classes the backbone is conditioned on (0: unconditional).

    ``forward(x, sigma, class_labels=None, augment_labels=None)``: x [N, C, H, W] or [N, d] (float,
    data units), sigma scalar or [N] (σ > 0), class_labels one-hot [N, label_dim] or None,
    augment_labels [N, augment_dim] (EDM's non-leaky augmentation, training only) or None; returns
    D(x;σ), the shape of x, float32.
    """

    def __init__(self, backbone: nn.Module, sigma_data: float = 0.5,
                 autocast_dtype: Optional[torch.dtype] = None, label_dim: int = 0):
        super().__init__()
        self.backbone = backbone
        self.sigma_data = float(sigma_data)
        self.autocast_dtype = autocast_dtype
        self.label_dim = int(label_dim)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float,
                class_labels: Optional[torch.Tensor] = None,
                augment_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x.to(torch.float32)
        sigma = expand_sigma(sigma, x)
        c_skip, c_out, c_in, c_noise = edm_coefficients(sigma, self.sigma_data)
        if self.label_dim == 0 and class_labels is not None:
            raise InputError("class labels were given to an unconditional denoiser (label_dim=0)")
        ctx = (torch.autocast(device_type=x.device.type, dtype=self.autocast_dtype)
               if self.autocast_dtype is not None else contextlib.nullcontext())
        with ctx:
            if augment_labels is None:
                F_x = self.backbone(c_in * x, c_noise.flatten(), class_labels)
            else:
                F_x = self.backbone(c_in * x, c_noise.flatten(), class_labels, augment_labels=augment_labels)
        return c_skip * x + c_out * F_x.to(torch.float32)
