"""SIMS negative guidance (Alemohammad et al. 2024, arXiv 2408.16333, section 3, eq. for s_SIMS)."""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

from sims.errors import InputError

Denoiser = Callable[..., torch.Tensor]


class CountedDenoiser:
    """A denoiser that counts its evaluations: ``rows`` = Σ batch size over calls, so after sampling
    N images NFE = rows / N (EDM §3's network evaluations per image, σ-interval savings included).

    Args:
        denoiser: D(x, sigma, class_labels).
    """

    def __init__(self, denoiser: Denoiser):
        self.denoiser = denoiser
        self.rows = 0

    def __call__(self, x: torch.Tensor, sigma, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        self.rows += int(x.shape[0])
        return self.denoiser(x, sigma, class_labels)


class SIMSGuidance:
    """Guided denoiser D = D_aux + (1+ω)(D_base − D_aux) = (1+ω)·D_base − ω·D_aux.

    Because the weights sum to one this is the score extrapolation s = (1+ω)s_base − ω s_aux of
    SIMS (Alemohammad et al. 2024) and Karras et al.'s autoguidance (arXiv 2406.02507) with
    w = 1+ω. With ``sigma_interval=(lo, hi)`` guidance is applied only for σ ∈ (lo, hi]
    (Kynkäänniemi et al. 2024, arXiv 2404.07724); outside it the base output is returned and the
    auxiliary model is not evaluated.

    Args:
        base: denoiser trained on real data, D(x, sigma, class_labels).
        aux: auxiliary denoiser fine-tuned on the base model's samples (same signature).
        omega: guidance weight ω ≥ 0; ω = 0 returns the base output exactly, no auxiliary call.
        sigma_interval: optional (lo, hi) with 0 ≤ lo < hi, in data units.
        allow_negative: accept ω < 0 (positive guidance toward the auxiliary model).
    Raises:
        ValueError: ω not finite, ω < 0 without ``allow_negative``, or a malformed interval.

    ``__call__(x, sigma, class_labels=None)``: x [N, ...], sigma scalar or [N]; returns the shape of x.
    ``aux_calls`` counts auxiliary evaluations (for NFE accounting).
    """

    def __init__(self, base: Denoiser, aux: Denoiser, omega: float,
                 sigma_interval: Optional[Sequence[float]] = None, allow_negative: bool = False):
        omega = self.check_omega(omega, allow_negative)
        sigma_interval = self.check_interval(sigma_interval)
        self.base, self.aux, self.omega = base, aux, omega
        self.sigma_interval = sigma_interval
        self.aux_calls = 0

    @staticmethod
    def check_omega(omega, allow_negative: bool = False) -> float:
        """ω as a float. Raises InputError: not finite, or negative without ``allow_negative``."""
        omega = float(omega)
        if not math.isfinite(omega):
            raise InputError(f"guidance weight omega must be finite, got {omega}")
        if omega < 0 and not allow_negative:
            raise InputError(f"guidance weight omega must be >= 0 (SIMS is negative guidance), got {omega}; "
                             "pass allow_negative=True to guide toward the auxiliary model")
        return omega

    @staticmethod
    def check_interval(sigma_interval) -> Optional[tuple]:
        """(lo, hi) as floats, or None. Raises InputError: not two values with 0 <= lo < hi."""
        if sigma_interval is None:
            return None
        if len(sigma_interval) != 2:
            raise InputError(f"sigma_interval must be (lo, hi), got {list(sigma_interval)!r}")
        lo, hi = float(sigma_interval[0]), float(sigma_interval[1])
        if not (0 <= lo < hi):
            raise InputError(f"sigma_interval needs 0 <= lo < hi, got ({lo}, {hi})")
        return lo, hi

    def __call__(self, x: torch.Tensor, sigma, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        d_base = self.base(x, sigma, class_labels)
        if self.omega == 0:
            return d_base
        sigma_t = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).flatten()
        if sigma_t.numel() == 1:
            sigma_t = sigma_t.expand(x.shape[0])
        if self.sigma_interval is None:
            mask = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        else:
            lo, hi = self.sigma_interval
            mask = (sigma_t > lo) & (sigma_t <= hi)
        if not bool(mask.any()):
            return d_base
        if bool(mask.all()):
            d_aux = self.aux(x, sigma_t, class_labels)
            self.aux_calls += 1
            return d_aux + (1 + self.omega) * (d_base - d_aux)
        labels = class_labels[mask] if class_labels is not None else None
        d_aux = self.aux(x[mask], sigma_t[mask], labels)
        self.aux_calls += 1
        out = d_base.clone()
        out[mask] = d_aux + (1 + self.omega) * (d_base[mask] - d_aux)
        return out
