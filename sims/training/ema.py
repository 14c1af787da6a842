"""Exponential moving average of the weights with EDM's half-life parametrisation
(Karras et al. 2022, Appendix F / Table 7: "EMA half-life 0.5 Mimg, ramp-up ratio 0.05")."""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn


def ema_beta(batch_size: int, cur_nimg: float, halflife_kimg: float, rampup_ratio: Optional[float]) -> float:
    """Per-step decay β = 0.5^(batch / half-life), half-life in images.

    half-life = min(halflife_kimg·1000, rampup_ratio·cur_nimg) when a ramp-up ratio is given
    (EDM: the average covers at most 5% of training so far at the start).

    Args:
        batch_size: images per optimizer step (global, over all ranks).
        cur_nimg: images seen so far (after this step).
        halflife_kimg: the nominal half-life in kimg.
        rampup_ratio: ramp-up ratio or None.
    Returns:
        β in [0, 1).
    """
    halflife_nimg = halflife_kimg * 1000.0
    if rampup_ratio is not None:
        halflife_nimg = min(halflife_nimg, cur_nimg * rampup_ratio)
    return 0.5 ** (batch_size / max(halflife_nimg, 1e-8))


class EMA(nn.Module):
    """A separate copy of a network's weights, averaged after each optimizer step.

    The averaged copy is never swapped into the live model: sample from ``ema.module``.
    Buffers are copied, not averaged.

    Args:
        model: the live network; a deep copy with ``requires_grad=False`` is kept.
        halflife_kimg, rampup_ratio: see :func:`ema_beta`.
    """

    def __init__(self, model: nn.Module, halflife_kimg: float = 500.0, rampup_ratio: Optional[float] = 0.05):
        super().__init__()
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.halflife_kimg = float(halflife_kimg)
        self.rampup_ratio = rampup_ratio

    @torch.no_grad()
    def update(self, model: nn.Module, batch_size: int, cur_nimg: float) -> float:
        """Blend ``model``'s weights into the average: p_ema ← β·p_ema + (1−β)·p. Returns β."""
        beta = ema_beta(batch_size, cur_nimg, self.halflife_kimg, self.rampup_ratio)
        ema_params = list(self.module.parameters())
        params = [p.detach() for p in model.parameters()]
        if len(ema_params) != len(params):
            raise ValueError("EMA and model have different parameter lists")
        torch._foreach_lerp_(ema_params, params, 1.0 - beta)
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            b_ema.copy_(b)
        return beta

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
