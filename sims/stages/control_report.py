"""The report of SIMS distribution control (SPEC §1): class shares with Wilson intervals
(:func:`wilson_interval`, :func:`share_intervals`) and the moments of real features reweighted to
the target shares (:func:`reweighted_moments`, the reference for "FD to the target distribution").
"""
from __future__ import annotations

import math
from typing import Dict, Mapping, Sequence, Tuple, Union

import numpy as np
import torch

from sims.errors import InputError
from sims.stages.control import _as_shares

Z95 = 1.959963984540054  # standard normal 97.5% quantile

__all__ = ["Z95", "reweighted_moments", "share_intervals", "wilson_interval"]


def wilson_interval(k: int, n: int, z: float = Z95) -> Tuple[float, float]:
    """Wilson score interval for a binomial share k/n (Wilson 1927; E. B. Wilson, JASA 22:209):
    (p̂ + z²/2n ± z·√(p̂(1−p̂)/n + z²/4n²)) / (1 + z²/n); z = 1.96 gives 95%. Stays inside [0, 1]
    and is sensible at k = 0 or k = n, unlike the normal interval.

    Raises:
        InputError: n ≤ 0 or k outside [0, n].
    """
    if n <= 0 or not 0 <= k <= n:
        raise InputError(f"a binomial interval needs 0 ≤ k ≤ n and n > 0, got k={k}, n={n}")
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, centre - half), min(1.0, centre + half)


def share_intervals(counts: Union[Mapping[int, int], Sequence[int]], z: float = Z95) -> Dict[int, Dict[str, float]]:
    """Share of each group with its Wilson interval (95% by default), from counts per group.

    Returns:
        {group: {"count", "share", "low", "high"}}, n = Σ counts.
    Raises:
        InputError: no count in total.
    """
    c = {int(g): int(v) for g, v in (counts.items() if isinstance(counts, Mapping) else enumerate(counts))}
    n = sum(c.values())
    if n <= 0:
        raise InputError("share intervals need at least one counted sample")
    out = {}
    for g in sorted(c):
        lo, hi = wilson_interval(c[g], n, z)
        out[g] = {"count": c[g], "share": c[g] / n, "low": lo, "high": hi}
    return out


def reweighted_moments(features, labels, target: Mapping[int, float]) -> Tuple[np.ndarray, np.ndarray]:
    """Mean [D] and covariance [D, D] (float64) of real features reweighted to the target shares,
    the reference for "FD to the target distribution" (SPEC §1 measures control next to FID).

    Each real item of group g gets the weight w_i = t_g / count_g, normalised to Σ w = 1; then
    μ = Σ w_i x_i and Σ = Σ w_i (x_i − μ)(x_i − μ)ᵀ / (1 − Σ w_i²) (reliability-weights
    correction: with equal weights it is the usual N − 1 covariance of SPEC §4). The effective
    sample size is 1 / Σ w_i².

    Args:
        features: real features [N, D] (numpy or torch); labels: their groups [N] (ints).
        target: {group: t_g} over every group present in ``labels`` (complete it with
            :func:`full_target`), summing to 1; t_g = 0 drops a group.
    Returns:
        ``(mu, sigma)``.
    Raises:
        InputError: shapes disagree, a label without a target share, a target share > 0 for a group
            with no real item, targets not summing to 1, or a single effective item.
    """
    x = features.detach().cpu().double().numpy() if torch.is_tensor(features) else np.asarray(features, np.float64)
    lab = labels.detach().cpu().numpy() if torch.is_tensor(labels) else np.asarray(labels)
    lab = lab.astype(np.int64).reshape(-1)
    if x.ndim != 2 or len(x) != len(lab):
        raise InputError(f"reweighted moments need features [N, D] and labels [N], got {x.shape} and {lab.shape}")
    t = _as_shares(target, "target shares")
    if abs(sum(t.values()) - 1) > 1e-6:
        raise InputError(f"target shares sum to {sum(t.values()):.6g}, not 1 (complete them with full_target)")
    groups, counts = np.unique(lab, return_counts=True)
    missing = [int(g) for g in groups if int(g) not in t]
    if missing:
        raise InputError(f"real items of group(s) {missing} have no target share")
    present = dict(zip(groups.tolist(), counts.tolist()))
    empty = [g for g, v in t.items() if v > 0 and g not in present]
    if empty:
        raise InputError(f"group(s) {empty} have a target share but no real item")
    w = np.array([t[int(g)] / present[int(g)] for g in lab], dtype=np.float64)
    w /= w.sum()
    mu = w @ x
    d = x - mu
    denom = 1.0 - float(np.sum(w * w))
    if denom <= 1e-12:
        raise InputError("reweighted moments need more than one item with weight > 0")
    sigma = (d * w[:, None]).T @ d / denom
    return mu, sigma
