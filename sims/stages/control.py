"""SIMS distribution control: compose the auxiliary's synthetic set so that guidance moves the
sampled class shares toward a target (Alemohammad et al., "Self-Improving Diffusion Models with
Synthetic Data", arXiv 2408.16333, distribution control; SPEC §1).

The paper gives the principle: fine-tune the auxiliary model on synthetic samples that
over-represent what should be *reduced*; negative guidance D = (1+ω)·D_base − ω·D_aux then pushes
samples away from it. It gives no composition rule; the one here (:func:`compose_aux_shares`) is a
documented choice derived from the first-order argument of SPEC §1. Pieces, all independent of
training (the SIMS stages wire them in):

- composition: :func:`full_target`, :func:`compose_aux_shares`, :func:`predicted_shares`,
  :func:`group_counts`, :func:`shares_from_labels`;
- selection of the auxiliary's set by a judge: :func:`judge_labels`, :func:`select_synthetic`,
  :func:`pool_size_needed`, :func:`shortfall_error`;
- judges (:mod:`sims.stages.control_judges`): :func:`~sims.stages.control_judges.load_judge`
  (``"digits"``, ``"pixel-digits"`` or a user's entry point),
  :func:`~sims.stages.control_judges.pixel_digits_judge` (the independent judge of the report);
- bad input (:mod:`sims.stages.control_config`): :func:`~sims.stages.control_config.parse_target`,
  :func:`~sims.stages.control_config.check_control` (for ``validate()``);
- report (:mod:`sims.stages.control_report`): :func:`~sims.stages.control_report.wilson_interval`,
  :func:`~sims.stages.control_report.share_intervals`,
  :func:`~sims.stages.control_report.reweighted_moments`.

Groups are integer class ids ``0..K−1``; share arguments are mappings ``{group: share}`` or
sequences indexed by group; share results are plain ``dict``\\ s ordered by group.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from sims.errors import ConfigError, InputError
from sims.stages.evaluate import Judge

DEFAULT_FLOOR = 0.005

Shares = Union[Mapping[int, float], Sequence[float]]
Shortfall = Tuple[int, int, int]  # (group, count available, count needed)

__all__ = [
    "DEFAULT_FLOOR", "full_target", "compose_aux_shares", "predicted_shares", "group_counts",
    "shares_from_labels", "judge_labels", "Selection", "select_synthetic", "pool_size_needed",
    "shortfall_error",
]


# ----------------------------------------------------------------------------------- composition
def _as_shares(x: Shares, what: str) -> Dict[int, float]:
    """{group: share} from a mapping or a sequence indexed by group; refuses negative/non-finite."""
    items = x.items() if isinstance(x, Mapping) else enumerate(x)
    out: Dict[int, float] = {}
    for g, v in items:
        if isinstance(g, bool) or not isinstance(g, (int, np.integer, str)) or not str(g).lstrip("-").isdigit():
            raise InputError(f"{what}: group {g!r} is not an integer class id")
        v = float(v)
        if not math.isfinite(v) or v < 0:
            raise InputError(f"{what}: share of group {int(g)} is {v}, not a finite number ≥ 0")
        out[int(g)] = v
    return dict(sorted(out.items()))


def _normalised(x: Dict[int, float], what: str) -> Dict[int, float]:
    total = sum(x.values())
    if total <= 0:
        raise InputError(f"{what}: shares sum to {total}, need a positive total")
    return {g: v / total for g, v in x.items()}


def full_target(target: Shares, base: Shares) -> Dict[int, float]:
    """The target share of every group of the base: listed groups get ``target[g]``, unlisted ones
    share the rest, 1 − Σ_listed t_g, in proportion to their base shares.

    Args:
        target: {group: t_g} for some groups, each in [0, 1], Σ ≤ 1.
        base: the base model's measured shares b_g of every group (normalised here).
    Returns:
        {group: t_g} over the groups of ``base`` (plus any listed group), summing to 1.
    Raises:
        InputError: a share outside [0, 1], Σ t > 1, every group listed but Σ t ≠ 1, or a remainder
            to share among unlisted groups whose base shares are all 0.
    """
    t = _as_shares(target, "target shares")
    b = _normalised(_as_shares(base, "base shares"), "base shares")
    if any(v > 1 for v in t.values()):
        raise InputError(f"target shares must lie in [0, 1], got {t}")
    listed = sum(t.values())
    if listed > 1 + 1e-9:
        raise InputError(f"target shares sum to {listed:.6g} > 1")
    rest = max(0.0, 1.0 - listed)
    unlisted = {g: bg for g, bg in b.items() if g not in t}
    mass = sum(unlisted.values())
    if not unlisted and abs(listed - 1) > 1e-6:
        raise InputError(f"every group has a target share but they sum to {listed:.6g}, not 1")
    if rest > 1e-12 and mass <= 0:
        raise InputError(f"target shares sum to {listed:.6g} and the unlisted groups {sorted(unlisted)} have base "
                         "share 0, so the rest cannot be shared among them")
    out = dict(t)
    for g, bg in unlisted.items():
        out[g] = rest * bg / mass if mass > 0 else 0.0
    return _normalised(dict(sorted(out.items())), "target shares")


def _apply_floor(a: Dict[int, float], floor: float, eligible) -> Dict[int, float]:
    """Raise the shares of ``eligible`` groups below ``floor`` to it and scale the others down so
    Σ = 1 (repeated until stable: scaling can push another group under the floor)."""
    fixed: set = set()
    while True:
        free = {g: v for g, v in a.items() if g not in fixed}
        if sum(free.values()) <= 0:  # everything floored (floor = 1/K): the floor is the answer
            return _normalised({g: (floor if g in fixed else 0.0) for g in a}, "auxiliary shares")
        scale = (1.0 - floor * len(fixed)) / sum(free.values())
        low = {g for g, v in free.items() if g in eligible and v * scale < floor}
        if not low:
            return {g: (floor if g in fixed else v * scale) for g, v in a.items()}
        fixed |= low


def compose_aux_shares(target: Shares, base: Shares, omega: float, floor: float = DEFAULT_FLOOR) -> Dict[int, float]:
    """Shares a_g of the auxiliary's synthetic set that put the guided shares on ``target`` at ω*.

    Reasoning (SPEC §1, first order): SIMS samples the density ∝ p_base^(1+ω) / p_aux^ω. If the base
    gives group g the share b_g and the auxiliary (fine-tuned on a set with shares a_g) gives it a_g,
    with the shape of each group's density unchanged, the guided share of g is

        p_g ∝ b_g^(1+ω) / a_g^ω = b_g·(b_g/a_g)^ω        (renormalised over g).

    Asking p_g ∝ t_g at ω = ω*:  b_g^(1+ω*) / a_g^ω* = t_g / c  ⇒  a_g ∝ b_g·(b_g/t_g)^(1/ω*),
    then Σ_g a_g = 1. Groups to *raise* (t_g > b_g) get a_g < b_g, groups to *reduce* get a_g > b_g:
    the auxiliary's set over-represents what should be reduced, as the paper prescribes. Without a
    floor, :func:`predicted_shares` (b, a, ω*) returns t exactly.

    Floor: every a_g is raised to at least ``floor`` and the other groups are scaled down by one
    common factor to keep Σ a = 1 (repeated if that pushes another group under the floor). Why: an
    auxiliary that never sees a group has no meaningful density there (p_aux → 0 makes the first-
    order ratio blow up), and the count a_g·n_s must stay ≥ 1 to have any sample. Effect on the
    prediction at ω*: a floored group has a larger a_g than the rule asked, so its predicted share
    falls *below* t_g; the unfloored groups keep exactly the target's ratios among themselves and
    share the freed mass (each a bit above t_g).

    Zero targets: t_g = 0 cannot be met at finite ω; taking t_g → 0 the groups with t_g = 0 take the
    whole set, in proportion to b_g^(1+1/ω*) among themselves, and every other group is floored.
    Groups with b_g = 0 get a_g = 0 and no floor (the judged pool has none of them to select;
    guidance cannot create what the base never makes, so a positive target for such a group is refused).

    Caveat: the auxiliary is fine-tuned *from the base*, so its real share lies between b_g and the
    set's share a_g; the realised movement is weaker than predicted, and the rule is first order.

    Args:
        target: {group: t_g} (unlisted groups: see :func:`full_target`).
        base: the base's measured shares {group: b_g} (every group; normalised here).
        omega: the design guidance weight ω* > 0 (the ω at which the target should be met).
        floor: least a_g, in [0, 1/K] for K groups (default 0.005).
    Returns:
        {group: a_g} over the groups of ``base``, Σ = 1, each ≥ floor (0 where b_g = 0).
    Raises:
        InputError: ω* ≤ 0 or not finite, a floor outside [0, 1/K], a positive target for a group the
            base never made, and the errors of :func:`full_target`.
    """
    omega = float(omega)
    if not math.isfinite(omega) or omega <= 0:
        raise InputError(f"distribution control needs a design guidance weight omega > 0, got {omega}")
    t = full_target(target, base)
    b = _normalised(_as_shares(base, "base shares"), "base shares")
    b = {g: b.get(g, 0.0) for g in t}
    floor = float(floor)
    if not (0 <= floor <= 1.0 / len(t)):
        raise InputError(f"floor={floor} must lie in [0, 1/{len(t)}] for {len(t)} groups")
    missing = [g for g in t if b[g] == 0 and t[g] > 0]
    if missing:
        raise InputError(f"the base model made no samples of group(s) {missing}, which have a target share > 0: "
                         "guidance cannot create them")
    zero = [g for g in t if t[g] == 0 and b[g] > 0]
    if zero:  # the limit t_g → 0 of the rule
        raw = {g: (b[g] ** (1 + 1 / omega) if g in zero else 0.0) for g in t}
    else:
        raw = {g: (b[g] * (b[g] / t[g]) ** (1 / omega) if b[g] > 0 else 0.0) for g in t}
    a = _normalised(raw, "auxiliary shares")
    return _apply_floor(a, floor, {g for g in t if b[g] > 0}) if floor > 0 else a


def predicted_shares(base: Shares, aux: Shares, omega: float) -> Dict[int, float]:
    """First-order guided shares p_g ∝ b_g·(b_g/a_g)^ω, renormalised (SPEC §1; density
    ∝ p_base^(1+ω)/p_aux^ω of SIMS, arXiv 2408.16333).

    SPEC's example: b_0 = 0.10, a_0 = 0.02, the 9 others b = 0.10, a = 0.98/9 ≈ 0.109: ω = 0.5
    gives p_0 ≈ 0.206 (≈ 21%), ω = 1 gives ≈ 0.377 (≈ 38%).

    Args:
        base: {group: b_g}; aux: {group: a_g} (each normalised here); omega: ω ≥ 0.
    Returns:
        {group: p_g} over the groups of ``base``, Σ = 1 (groups with b_g = 0 get 0).
    Raises:
        InputError: ω < 0, or a_g = 0 for a group with b_g > 0 and ω > 0 (undefined: use a floor).
    """
    omega = float(omega)
    if not math.isfinite(omega) or omega < 0:
        raise InputError(f"omega must be a finite number ≥ 0, got {omega}")
    b = _normalised(_as_shares(base, "base shares"), "base shares")
    a = _normalised(_as_shares(aux, "auxiliary shares"), "auxiliary shares")
    bad = [g for g in b if b[g] > 0 and a.get(g, 0.0) == 0 and omega > 0]
    if bad:
        raise InputError(f"auxiliary share 0 for group(s) {bad} with base share > 0: the first-order prediction is "
                         "undefined (apply a floor)")
    # in logs: log p_g = (1+ω) log b_g − ω log a_g, stabilised before exponentiating
    logs = {g: (1 + omega) * math.log(b[g]) - (omega * math.log(a[g]) if omega > 0 else 0.0)
            for g in b if b[g] > 0}
    top = max(logs.values())
    p = {g: (math.exp(logs[g] - top) if g in logs else 0.0) for g in b}
    return _normalised(p, "predicted shares")


def group_counts(shares: Shares, n: int) -> Dict[int, int]:
    """Integer counts per group summing to ``n``, by largest-remainder (Hamilton) rounding.

    Each group gets ⌊a_g·n⌋; the n − Σ⌊a_g·n⌋ left over go one each to the largest remainders
    a_g·n − ⌊a_g·n⌋ (remainders rounded to 1e-9 first, so float noise cannot reorder ties; ties go
    to the smaller group id). Every count is within 1 of a_g·n.

    Args:
        shares: {group: a_g} (normalised here); n: total ≥ 0.
    Returns:
        {group: count}, Σ = n.
    Raises:
        InputError: n < 0 or not an integer; shares that sum to 0.
    """
    if isinstance(n, bool) or int(n) != n or n < 0:
        raise InputError(f"a number of samples must be an integer ≥ 0, got {n}")
    n = int(n)
    a = _normalised(_as_shares(shares, "shares"), "shares")
    exact = {g: v * n for g, v in a.items()}
    counts = {g: int(math.floor(v + 1e-9)) for g, v in exact.items()}
    left = n - sum(counts.values())
    order = sorted(a, key=lambda g: (-round(exact[g] - counts[g], 9), g))
    for g in order[:max(left, 0)]:
        counts[g] += 1
    return counts


def shares_from_labels(labels, num_classes: int) -> Dict[int, float]:
    """Measured shares {g: count_g / N} of judged labels [N] (labels < 0, i.e. rejected, are not counted).

    Raises:
        InputError: no usable label, or a label ≥ num_classes.
    """
    lab = np.asarray(labels, dtype=np.int64).reshape(-1)
    lab = lab[lab >= 0]
    if lab.size == 0:
        raise InputError("no judged sample to measure shares from")
    if lab.max() >= num_classes:
        raise InputError(f"label {int(lab.max())} outside the {num_classes} classes")
    counts = np.bincount(lab, minlength=num_classes)
    return {g: float(c) / lab.size for g, c in enumerate(counts)}


# ------------------------------------------------------------------------------------- selection
@torch.no_grad()
def judge_labels(judge: Judge, images: torch.Tensor, *, device=None, batch_size: int = 1000,
                 min_confidence: Optional[float] = None) -> np.ndarray:
    """The judge's predicted class of each sample, as used to select the auxiliary's set.

    Args:
        judge: a :class:`Judge`; images: samples [N, C, H, W] in [−1, 1] (quantised here to 8 bits,
            as written to PNG, before judging); device: where the judge runs (default: the images').
        min_confidence: samples whose top probability is below it get label −1 (never selected);
            None keeps every sample (pass ``judge.threshold`` to keep only confident ones).
    Returns:
        int64 [N]: class ids in 0..K−1, or −1.
    """
    from sims.data.images import quantize

    dev = torch.device(device) if device is not None else images.device
    out = []
    for i in range(0, len(images), batch_size):
        conf, pred = judge.probabilities(quantize(images[i:i + batch_size]).to(dev)).float().cpu().max(dim=1)
        if min_confidence is not None:
            pred = torch.where(conf >= float(min_confidence), pred, torch.full_like(pred, -1))
        out.append(pred)
    return (torch.cat(out) if out else torch.zeros(0, dtype=torch.long)).numpy().astype(np.int64)


@dataclass
class Selection:
    """Result of :func:`select_synthetic`.

    Attributes:
        indices: int64 [Σ counts], ascending pool positions of the chosen samples (None when short).
        shortfalls: [(group, count available, count needed)] for every group the pool cannot fill.
    """

    indices: Optional[np.ndarray]
    shortfalls: List[Shortfall] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every group was filled."""
        return not self.shortfalls


def select_synthetic(labels, counts: Mapping[int, int]) -> Selection:
    """Pick the auxiliary's synthetic set from a judged pool of base samples.

    Deterministic: the pool is in seed order, and each group takes its *first* ``counts[g]`` samples
    judged as g (so a larger pool drawn later keeps every earlier choice).

    Args:
        labels: judged class per pool sample [P] (int; −1 = rejected), in seed order.
        counts: {group: samples needed} (e.g. :func:`group_counts` of :func:`compose_aux_shares`).
    Returns:
        :class:`Selection`: the chosen pool positions, or the shortfalls (group, available, needed).
    Raises:
        InputError: a negative count.
    """
    lab = np.asarray(labels, dtype=np.int64).reshape(-1)
    chosen, short = [], []
    for g, need in sorted((int(g), int(c)) for g, c in counts.items()):
        if need < 0:
            raise InputError(f"group {g}: a count of samples must be ≥ 0, got {need}")
        idx = np.flatnonzero(lab == g)
        if len(idx) < need:
            short.append((g, int(len(idx)), need))
        else:
            chosen.append(idx[:need])
    if short:
        return Selection(None, short)
    return Selection(np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64), [])


def pool_size_needed(shortfalls: Sequence[Shortfall], pool_size: int) -> int:
    """Estimated pool size that fills every short group, at the rates seen so far:
    max_g ⌈needed_g · P / max(available_g, 1)⌉ (a group never seen counts as seen once)."""
    return max([int(pool_size)] + [math.ceil(need * pool_size / max(avail, 1)) for _, avail, need in shortfalls])


def shortfall_error(shortfalls: Sequence[Shortfall], pool_size: int, max_synthetic: int) -> ConfigError:
    """The one-line error the stage raises, before the fine-tune, when even ``max_synthetic`` judged
    base samples cannot fill the auxiliary's set: it names the worst group, its count and the count
    needed (then the other short groups)."""
    worst = sorted(shortfalls, key=lambda s: (s[1] / max(s[2], 1), s[0]))
    g, avail, need = worst[0]
    others = ", ".join(f"group {o} {a}/{n}" for o, a, n in worst[1:])
    return ConfigError(
        f"sims.control: the auxiliary's set needs {need} samples judged as group {g} but only {avail} of "
        f"{pool_size} base samples are (sims.control.max_synthetic={max_synthetic}); raise "
        "sims.control.max_synthetic, lower sims.num_synthetic, or choose a milder sims.control.target or a larger "
        f"sims.control.omega" + (f" (also short: {others})" if others else ""))
