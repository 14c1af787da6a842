"""Checks of the ``sims.control`` config section (SIMS distribution control, SPEC §1), run by
``validate()`` before any training: :func:`parse_target` and :func:`check_control` refuse bad input
with a one-line error naming the key.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional, Sequence

import torch

from sims.errors import ConfigError
from sims.stages.control import DEFAULT_FLOOR
from sims.stages.control_judges import BUILTIN_JUDGES, _check_safetensors, import_entry_point, load_judge

DIGITS_SHAPES = ((1, 8, 8), (1, 16, 16))

__all__ = ["check_control", "parse_target"]


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if cfg is None:
        return default
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def parse_target(target: Any, num_classes: int, key: str = "sims.control.target") -> Dict[int, float]:
    """``sims.control.target`` as {group: share}, checked: a non-empty mapping of class ids in
    range(num_classes) (ints, or digit strings from overrides) to shares in [0, 1] with Σ ≤ 1 (= 1
    when every group is listed).

    Raises:
        ConfigError: naming the key and the offending group.
    """
    if target is None or not hasattr(target, "items") or len(target) == 0:
        raise ConfigError(f"{key} must map class ids to target shares, e.g. {{0: 0.3}}; got {target!r}")
    out: Dict[int, float] = {}
    for g, v in target.items():
        if isinstance(g, bool) or not str(g).strip().isdigit():
            raise ConfigError(f"{key}: group {g!r} is not a class id")
        gi = int(str(g).strip())
        if gi >= num_classes:
            raise ConfigError(f"{key}.{gi}: unknown group, the data has classes 0..{num_classes - 1}")
        try:
            share = float(v)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}.{gi}={v!r} is not a number") from None
        if not (math.isfinite(share) and 0 <= share <= 1):
            raise ConfigError(f"{key}.{gi}={v}: a target share must lie in [0, 1]")
        out[gi] = share
    total = sum(out.values())
    if total > 1 + 1e-9:
        raise ConfigError(f"{key}: target shares sum to {total:.6g} > 1")
    if len(out) == num_classes and abs(total - 1) > 1e-6:
        raise ConfigError(f"{key}: every class has a target share but they sum to {total:.6g}, not 1")
    return dict(sorted(out.items()))


def _check_judge_spec(spec: Any, weights: Any, key: str, num_classes: int, data_shape) -> None:
    if spec in BUILTIN_JUDGES:
        if weights:
            raise ConfigError(f"{key}_weights is only for a judge given as 'package.module:function', not {spec!r}")
        if num_classes != 10:
            raise ConfigError(f"{key}={spec!r} judges the 10 digit classes, but the data has {num_classes}")
        if data_shape is not None and tuple(int(s) for s in data_shape) not in DIGITS_SHAPES:
            raise ConfigError(f"{key}={spec!r} judges 8x8 or 16x16 grayscale digits, not data of shape "
                              f"{tuple(data_shape)}")
        return
    import_entry_point(spec, key)
    if weights:
        _check_safetensors(weights, f"{key}_weights")
    if data_shape is not None:  # probe on CPU: classes and probability outputs, before any training
        judge = load_judge(spec, device="cpu", num_classes=num_classes, weights=weights, key=key)
        judge.probabilities(torch.zeros(2, *[int(s) for s in data_shape]))


def check_control(cfg: Any, num_classes: int, *, data_shape: Optional[Sequence[int]] = None,
                  num_synthetic: Optional[int] = None) -> None:
    """Refuse a bad ``sims.control`` section with a one-line error, before any training.

    ``cfg`` is the ``sims.control`` section as a dict, an OmegaConf node or any object with the
    attributes ``enabled``, ``target``, ``omega``, ``floor``, ``judge``, ``judge_weights``,
    ``max_synthetic``, ``independent_judge`` (and optionally ``independent_judge_weights``).
    Nothing is checked when ``enabled`` is false.

    Checks: target (:func:`parse_target`); ω* finite and > 0; floor in [0, 1/K]; judge ``"digits"``,
    ``"pixel-digits"`` or an importable ``'package.module:function'``, its weights an existing
    safetensors file (built-in judges take none; the digits judges need 10 classes and 8×8/16×16
    grayscale data); max_synthetic an integer ≥ 1 (≥ ``num_synthetic`` when given); the independent
    judge null, built-in or an importable entry point, and not the same as the judge. With
    ``data_shape`` (C, H, W) an entry-point judge is built on CPU and probed with two blank images, so
    a judge with other classes than the data, or non-probability outputs, fail here.

    Args:
        num_classes: the data's K (classes of the labels the judges must produce).
    Raises:
        ConfigError / MissingFileError / WeightsError / InputError: one line naming the key.
    """
    if not bool(_get(cfg, "enabled", False)):
        return
    num_classes = int(num_classes)
    if num_classes < 2:
        raise ConfigError(f"sims.control needs a data set with at least 2 classes, got {num_classes}")
    parse_target(_get(cfg, "target"), num_classes)
    omega = _get(cfg, "omega")
    try:
        omega_f = float(omega)
    except (TypeError, ValueError):
        raise ConfigError(f"sims.control.omega={omega!r}: give the design guidance weight ω* > 0") from None
    if not math.isfinite(omega_f) or omega_f <= 0:
        raise ConfigError(f"sims.control.omega={omega}: the design guidance weight must be > 0")
    floor = _get(cfg, "floor", DEFAULT_FLOOR)
    floor = DEFAULT_FLOOR if floor is None else floor
    if not isinstance(floor, (int, float)) or isinstance(floor, bool) or not (0 <= floor <= 1.0 / num_classes):
        raise ConfigError(f"sims.control.floor={floor}: must lie in [0, 1/{num_classes}]")
    judge = _get(cfg, "judge", "digits")
    _check_judge_spec(judge, _get(cfg, "judge_weights"), "sims.control.judge", num_classes, data_shape)
    max_syn = _get(cfg, "max_synthetic")
    if isinstance(max_syn, bool) or not isinstance(max_syn, int) or max_syn < 1:
        raise ConfigError(f"sims.control.max_synthetic={max_syn!r}: must be an integer ≥ 1")
    if num_synthetic is not None and max_syn < int(num_synthetic):
        raise ConfigError(f"sims.control.max_synthetic={max_syn} is below sims.num_synthetic={num_synthetic}: "
                          "the judged pool must be at least the auxiliary's set")
    ind = _get(cfg, "independent_judge")
    if ind is not None:
        if ind == judge:
            raise ConfigError(f"sims.control.independent_judge={ind!r} is the judge that composes the set; "
                              "choose another (e.g. pixel-digits) or null")
        _check_judge_spec(ind, _get(cfg, "independent_judge_weights"), "sims.control.independent_judge",
                          num_classes, data_shape)
