"""Judges of SIMS distribution control (arXiv 2408.16333; SPEC §1): the classifiers whose predicted
classes select the auxiliary's synthetic set (:mod:`sims.stages.control`) and measure the shares
of the report.

:func:`load_judge` builds a :class:`~sims.stages.evaluate.Judge` from a config value: ``"digits"``
(the shipped CNN), ``"pixel-digits"`` (:func:`pixel_digits_judge`, the independent judge) or a
user's ``'package.module:function'`` (:func:`import_entry_point`) with safetensors weights; every
output of a user's judge is checked to be probabilities.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from sims.errors import ConfigError, InputError, MissingFileError, SimsError, WeightsError
from sims.stages.evaluate import Judge, digits_judge

BUILTIN_JUDGES = ("digits", "pixel-digits")

__all__ = ["BUILTIN_JUDGES", "import_entry_point", "load_judge", "pixel_digits_judge"]


def pixel_digits_judge(device) -> Judge:
    """The independent digits judge (logistic regression on raw pixels,
    :mod:`sims.metrics.pixel_judge`; held-out accuracy in ``pixel_digits.json``) as a :class:`Judge`
    named ``pixel-digits``, confident at top probability ≥ 0.5. For reports only: never for
    composition or selection, so the CNN judge's errors cannot pass for control."""
    from sims.metrics.pixel_judge import load_pixel_digits_classifier

    clf = load_pixel_digits_classifier().to(device)
    return Judge("pixel-digits", clf.probabilities, 10, 0.5)


def import_entry_point(spec: str, key: str = "sims.control.judge") -> Callable:
    """The callable named by ``'package.module:function'`` (``function`` may be dotted: ``Class.method``).

    Raises:
        ConfigError: not of that form, a module that cannot be imported, a missing or non-callable name.
    """
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ConfigError(f"{key}={spec!r}: give a judge as 'package.module:function' (or one of "
                          f"{', '.join(BUILTIN_JUDGES)})")
    mod_name, attr = spec.split(":")
    try:
        obj = importlib.import_module(mod_name)
    except ModuleNotFoundError as exc:
        if exc.name and (mod_name == exc.name or mod_name.startswith(exc.name + ".")):
            raise ConfigError(f"{key}={spec!r}: no module named {exc.name!r} "
                              "(is it installed / on PYTHONPATH?)") from exc
        raise ConfigError(f"{key}={spec!r}: importing {mod_name} failed: {type(exc).__name__}: {exc}") from exc
    except Exception as exc:  # the user's module raised while importing
        raise ConfigError(f"{key}={spec!r}: importing {mod_name} failed: {type(exc).__name__}: {exc}") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{key}={spec!r}: module {mod_name} has no {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{key}={spec!r}: {attr} is a {type(obj).__name__}, not a function")
    return obj


def _check_safetensors(path, key: str) -> Path:
    """An existing safetensors file (header parsed, no tensor read); pickles are refused."""
    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise MissingFileError(f"{key}={path}: no such file")
    try:
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as fh:
            list(fh.keys())
    except Exception as exc:
        raise WeightsError(f"{key}={path}: not a safetensors file ({type(exc).__name__}); judge weights must be "
                           "safetensors, never a pickle") from exc
    return p


def _checked(fn: Callable, name: str, num_classes: int, key: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Wrap a judge's callable: outputs must be probabilities [B, num_classes]."""

    @torch.no_grad()
    def probabilities(x: torch.Tensor) -> torch.Tensor:
        try:
            p = fn(x)
        except SimsError:
            raise
        except Exception as exc:
            raise InputError(f"{key}: judge {name!r} failed on images {tuple(x.shape)}: "
                             f"{type(exc).__name__}: {exc}") from exc
        if isinstance(p, np.ndarray):
            p = torch.from_numpy(p)
        if not torch.is_tensor(p) or p.ndim != 2 or p.shape[0] != x.shape[0]:
            shape = tuple(p.shape) if hasattr(p, "shape") else type(p).__name__
            raise InputError(f"{key}: judge {name!r} returned {shape} for {x.shape[0]} images; "
                             f"want probabilities [{x.shape[0]}, {num_classes}]")
        if p.shape[1] != num_classes:
            raise InputError(f"{key}: judge {name!r} has {p.shape[1]} classes, the data has {num_classes}")
        q = p.detach().double()
        if q.numel() and (not torch.isfinite(q).all() or q.min() < -1e-6 or q.max() > 1 + 1e-6
                          or (q.sum(1) - 1).abs().max() > 1e-3):
            raise InputError(f"{key}: judge {name!r} returned values that are not probabilities (min "
                             f"{float(q.min()):.3g}, max {float(q.max()):.3g}, row sums "
                             f"{float(q.sum(1).min()):.3g}..{float(q.sum(1).max()):.3g}); return softmax outputs")
        return p.float()

    return probabilities


def load_judge(spec: str, *, device, num_classes: int, weights: Optional[str] = None, name: Optional[str] = None,
               threshold: float = 0.5, key: str = "sims.control.judge") -> Judge:
    """A :class:`Judge` from a config value: ``"digits"`` (the shipped CNN), ``"pixel-digits"``
    (:func:`pixel_digits_judge`) or a user's classifier ``'package.module:function'``.

    Calling convention of a user's judge — ``function`` is a *factory*, called once::

        def make_judge(weights: dict[str, torch.Tensor] | None, device: torch.device):
            model = MyNet(); model.load_state_dict(weights); return model.to(device).eval()

    ``weights`` is the content of ``sims.control.judge_weights`` read by sims with
    ``safetensors.torch.load_file`` (CPU tensors; a pickle is never opened), or None when no file is
    given. The factory returns a callable ``images -> probabilities``: images float [N, C, H, W] in
    [−1, 1] (8-bit quantised, as written to PNG) on ``device``; probabilities [N, K], rows summing
    to 1 (softmax outputs, not logits). Every call's output is checked.

    Args:
        spec: the judge; device: where it runs; num_classes: the data's K.
        weights: a safetensors file for a user's judge (refused for the built-in ones).
        name: the Judge's name (result keys ``<name>_class_share``); default the built-in name or the
            function's name. threshold: top probability counted as confident.
        key: the config key named in errors.
    Raises:
        ConfigError: bad entry point, weights given to a built-in judge, a built-in digits judge for
            data without 10 classes. MissingFileError / WeightsError: weights file missing or not
            safetensors. InputError: (at construction or on a call) the factory or the callable failed,
            or outputs that are not probabilities [N, num_classes].
    """
    if spec in BUILTIN_JUDGES:
        if weights:
            raise ConfigError(f"{key}_weights is only for a judge given as 'package.module:function', not {spec!r}")
        if int(num_classes) != 10:
            raise ConfigError(f"{key}={spec!r} judges the 10 digit classes, but the data has {num_classes}")
        j = digits_judge(device) if spec == "digits" else pixel_digits_judge(device)
        j.threshold = float(threshold)
        if name:
            j.name = name
        return j
    factory = import_entry_point(spec, key)
    state = None
    if weights:
        from safetensors.torch import load_file

        state = load_file(str(_check_safetensors(weights, f"{key}_weights")))
    try:
        fn = factory(state, torch.device(device))
    except SimsError:
        raise
    except Exception as exc:
        raise InputError(f"{key}={spec!r}: the judge factory failed: {type(exc).__name__}: {exc}") from exc
    if not callable(fn):
        raise ConfigError(f"{key}={spec!r} returned a {type(fn).__name__}; the factory must return a callable "
                          "images -> probabilities")
    k = getattr(fn, "num_classes", None)
    if isinstance(k, int) and k != int(num_classes):
        raise InputError(f"{key}={spec!r}: judge has {k} classes, the data has {num_classes}")
    label = name or spec.split(":")[1].split(".")[-1]
    return Judge(label, _checked(fn, spec, int(num_classes), key), int(num_classes), float(threshold))
