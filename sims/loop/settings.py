"""The loop's settings (checked) and the hash of the config entries its results depend on."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf

from sims.config import RESUME_KEYS
from sims.data.workflows import WORKFLOWS, check_workflow
from sims.errors import LoopError, WorkflowError
from sims.loop.protocol import INITS, METHODS
from sims.utils import flatten_dict

AUX_DATA: Tuple[str, ...] = ("own", "synthetic", "both")
"""``loop.aux_data``: what a SIMS stream's auxiliary learns from (see :mod:`sims.loop.models.diffusion`)."""


@dataclass(frozen=True)
class Settings:
    model: str
    workflows: Tuple[str, ...]
    methods: Tuple[str, ...]
    generations: int
    num_real: int
    num_synthetic: int
    seeds: Tuple[int, ...]
    init: str
    subsample_size: Optional[int]
    num_eval: Optional[int]


def settings(cfg: DictConfig) -> Settings:
    lp = cfg.loop

    def positive(key: str) -> int:
        value = lp.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise LoopError(f"loop.{key} must be a positive integer, got {value!r}")
        return value

    workflows = tuple(lp.workflows)
    if not workflows:
        raise LoopError(f"loop.workflows is empty; choose from: {', '.join(WORKFLOWS)}")
    for w in workflows:
        try:
            check_workflow(w)
        except WorkflowError as exc:
            raise LoopError(f"loop.workflows: {exc}") from None
    methods = tuple(lp.methods)
    if not methods:
        raise LoopError(f"loop.methods is empty; choose from: {', '.join(METHODS)}")
    for m in methods:
        if m not in METHODS:
            raise LoopError(f"loop.methods: unknown method {m!r}; choose one of: {', '.join(METHODS)}")
    seeds = tuple(int(s) for s in lp.seeds)
    if not seeds or min(seeds) < 0:
        raise LoopError(f"loop.seeds must be a non-empty list of integers >= 0, got {list(lp.seeds)}")
    for name, items in (("workflows", workflows), ("methods", methods), ("seeds", seeds)):
        if len(set(items)) != len(items):
            raise LoopError(f"loop.{name} has duplicates: {list(items)}")
    if lp.init not in INITS:
        raise LoopError(f"loop.init must be one of {', '.join(INITS)}, got {lp.init!r}")
    sub = lp.get("subsample_size", None)
    if sub is not None and (not isinstance(sub, int) or sub < 1):
        raise LoopError(f"loop.subsample_size must be a positive integer or null, got {sub!r}")
    num_eval = lp.get("num_eval", None)
    if num_eval is not None:
        num_eval = positive("num_eval")
    return Settings(str(lp.model), workflows, methods, positive("generations"), positive("num_real"),
                     positive("num_synthetic"), seeds, str(lp.init), sub, num_eval)


def hashed_config(cfg: DictConfig, config_keys: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """The flattened config entries a run's results depend on (dotted key -> value).

    ``config_keys`` selects sections/keys (None: all); the keys that may change on resume
    (:data:`sims.config.RESUME_KEYS`: run directory, devices, logging, ...) are always left out.
    """
    flat = flatten_dict(OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg))
    keep = {}
    for key, value in flat.items():
        if key in RESUME_KEYS:
            continue
        if config_keys is None or any(key == k or key.startswith(k + ".") for k in config_keys):
            keep[key] = value
    return dict(sorted(keep.items()))


def config_hash(entries: Mapping[str, Any]) -> str:
    """SHA-256 (hex, first 16 chars) of the canonical JSON of :func:`hashed_config` entries."""
    blob = json.dumps(entries, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]
