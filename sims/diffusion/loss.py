"""EDM training loss (Karras et al. 2022, section 5 and Table 1, "Training")."""
from __future__ import annotations

from typing import Callable, Optional

import torch

Denoiser = Callable[..., torch.Tensor]


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """λ(σ) = (σ² + σ_d²)/(σ·σ_d)² (EDM Table 1): makes the effective backbone target unit-variance."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


class EDMLoss:
    """L = E_{σ,y,n}[λ(σ)·‖D(y + σn; σ) − y‖²] with ln σ ~ N(P_mean, P_std²) (EDM Table 1, eq. 2/8).

    Equal, element for element, to the unweighted MSE of the backbone output F against the target
    (y − c_skip·(y + σn))/c_out, since λ(σ) = 1/c_out².

    ``__call__(denoiser, images, class_labels=None, generator=None, augment_labels=None)``:
        denoiser: D(x, sigma, class_labels[, augment_labels]) (e.g. :class:`EDMPrecond`).
        images: clean data y, [N, C, H, W] or [N, d], in data units ([-1, 1] for images).
        generator: the source of σ and n (a per-(seed, slice, step) generator in training).
        augment_labels: [N, augment_dim] labels of EDM's non-leaky augmentation, or None.
        Returns the per-element weighted squared error, the shape of ``images`` (reduce it yourself;
        EDM sums over elements and averages over the batch).
    """

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5):
        if P_std <= 0:
            raise ValueError(f"P_std must be > 0, got {P_std}")
        self.P_mean = float(P_mean)
        self.P_std = float(P_std)
        self.sigma_data = float(sigma_data)

    def sample_sigma(self, n: int, device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """σ = exp(P_mean + P_std·ξ), ξ ~ N(0, 1); shape [n] (EDM Table 1, p_train)."""
        xi = torch.randn(n, device=device, generator=generator)
        return (xi * self.P_std + self.P_mean).exp()

    def __call__(self, denoiser: Denoiser, images: torch.Tensor,
                 class_labels: Optional[torch.Tensor] = None,
                 generator: Optional[torch.Generator] = None,
                 augment_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        y = images.to(torch.float32)
        sigma = self.sample_sigma(y.shape[0], y.device, generator)
        sigma_b = sigma.reshape(-1, *([1] * (y.ndim - 1)))
        noise = torch.randn(y.shape, device=y.device, generator=generator) * sigma_b
        if augment_labels is None:
            D = denoiser(y + noise, sigma, class_labels)
        else:
            D = denoiser(y + noise, sigma, class_labels, augment_labels=augment_labels)
        return edm_loss_weight(sigma_b, self.sigma_data) * (D - y) ** 2
