"""The loop's model registry: ``loop.model`` name → factory, with no name special-cased.

Built-in models are listed by import path (``"package.module:function"``), so the registry needs no
import of them (and no import circle): the factory is imported when a model is made. A factory is
called as ``factory(cfg, ctx)`` with the run config and the job's :class:`~sims.dist.DistContext`
and returns a :class:`~sims.loop.protocol.GenerativeModel`. ``config_keys`` are the config
keys/sections the model's results depend on (None: the whole config), which enter the config hash.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

from omegaconf import DictConfig

from sims.errors import LoopError

Factory = Callable[..., object]


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: its factory (a callable or a ``"module:function"`` path) and the config
    keys its results depend on (dotted keys or sections; None = the whole config)."""

    factory: Union[Factory, str]
    config_keys: Optional[Tuple[str, ...]] = None

    def load(self) -> Factory:
        if callable(self.factory):
            return self.factory
        module, _, attr = self.factory.partition(":")
        return getattr(importlib.import_module(module), attr)


_REGISTRY: Dict[str, ModelSpec] = {
    "gaussian": ModelSpec("sims.toy.gaussian:factory", ("loop",)),
    "kde": ModelSpec("sims.toy.kde:factory", ("loop", "data.noise")),
    "diffusion": ModelSpec("sims.loop.models.diffusion:factory", None),
}


def register_model(name: str, factory: Union[Factory, str], *, config_keys: Optional[Sequence[str]] = None) -> None:
    """Register (or replace) the loop model ``name`` (the value of ``loop.model``).

    Args:
        name: e.g. ``"my-vae"``.
        factory: ``factory(cfg, ctx) -> GenerativeModel``, or its ``"module:function"`` path.
        config_keys: config keys/sections the model's results depend on (``("loop",)`` for the
            toys); None hashes the whole config except the resume keys (safe for expensive models).
    Raises:
        LoopError: an empty name.
    """
    if not name or not isinstance(name, str):
        raise LoopError("model name must be a non-empty string")
    _REGISTRY[name] = ModelSpec(factory, tuple(config_keys) if config_keys is not None else None)


def available_models() -> List[str]:
    """Registered model names."""
    return sorted(_REGISTRY)


def model_spec(name: str) -> ModelSpec:
    """The registry entry of ``name``.

    Raises:
        LoopError: unknown name (lists the choices).
    """
    if name not in _REGISTRY:
        raise LoopError(f"unknown loop.model {name!r}; choose one of: {', '.join(available_models())}")
    return _REGISTRY[name]


def make_model(cfg: DictConfig, ctx=None):
    """Build the model named by ``cfg.loop.model`` (``ctx``: the job's DistContext, default one process)."""
    from sims.dist import single_process

    return model_spec(str(cfg.loop.model)).load()(cfg, ctx if ctx is not None else single_process())
