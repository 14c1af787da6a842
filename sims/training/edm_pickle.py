"""Read NVlabs/edm network pickles without executing anything they contain.

EDM (Karras et al. 2022) writes ``network-snapshot-*.pkl`` with a plain ``pickle.dump`` of
``dict(ema=..., loss_fn=..., augment_pipe=..., dataset_kwargs=...)``; every network class is a
``torch_utils.persistence`` persistent class, which pickles as a call
``_reconstruct_persistent_obj(meta)`` whose ``meta['module_src']`` is Python source that NVIDIA's
loader ``exec``s. This module replaces every global such a file names by an inert stand-in
(/work/shared/EDM_FORMAT.md §1.8, §1.9), so a snapshot loads into plain data:

* :class:`PersistentStub` — one persistent object: ``class_name``, ``state`` (its ``__dict__``),
  ``init_args``/``init_kwargs`` (its constructor arguments), ``module_src_sha256`` (the embedded
  source is hashed, never kept, never run).
* :class:`ContainerStub` — ``torch.nn.ModuleDict`` / ``Sequential`` / ``ModuleList`` containers.
* tensors — rebuilt only from nested legacy ``torch.save`` storage blobs whose header was parsed and
  size-checked first (§1.5), then read with ``torch.load(weights_only=True)``.

The stand-ins live in :mod:`sims.training.edm_stubs` (objects) and :mod:`sims.training.edm_tensors`
(tensors and their storages); this module holds the allow-list, the unpickler and the walk of the
recovered tree.

Entry points: :func:`load_edm_pickle` (path → :class:`EDMSnapshot`), :func:`safe_load` (file object
→ the raw top-level object), :func:`flatten` and :func:`describe`. Everything the allow-list does not
name raises :class:`sims.errors.UnsafePickleError` before it can run.
"""
from __future__ import annotations

import collections
import hashlib
import os
import pickle
import struct
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, IO, List, NamedTuple, Optional, Tuple

import torch

from sims.errors import MissingFileError, SimsError, UnsafePickleError, WeightsError
from sims.training.edm_stubs import (PERSISTENCE_VERSION, ContainerStub, PersistentStub, _codecs_encode, _EasyDict,
                                     _ModuleDictStub, _ModuleListStub, _numpy_scalar, _NumpyDtypeStub, _ordered_dict,
                                     _reconstruct_persistent_obj, _SequentialStub, _set, _short)
from sims.training.edm_tensors import (LEGACY_MAGIC, _load_from_bytes, _rebuild_parameter,
                                       _rebuild_parameter_with_state, _rebuild_tensor_v2, check_tensor)

__all__ = ["ClassNode", "ContainerStub", "EDMSnapshot", "PersistentStub", "SafeEDMUnpickler", "describe",
           "flatten", "load_edm_pickle", "safe_load", "LEGACY_MAGIC", "PERSISTENCE_VERSION"]


# --------------------------------------------------------------------------------------------------
# The outer unpickler
# --------------------------------------------------------------------------------------------------

_ALLOWED: Dict[Tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch.nn.modules.container", "ModuleDict"): _ModuleDictStub,
    ("torch.nn.modules.container", "Sequential"): _SequentialStub,
    ("torch.nn.modules.container", "ModuleList"): _ModuleListStub,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch.storage", "_load_from_bytes"): _load_from_bytes,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "dtype"): _NumpyDtypeStub,
    ("dnnlib.util", "EasyDict"): _EasyDict,
    ("_codecs", "encode"): _codecs_encode,
    ("builtins", "set"): _set,
    ("__builtin__", "set"): _set,
}


class SafeEDMUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` allows only the exact (module, name) pairs of
    EDM_FORMAT §1.8, each mapped to an inert, argument-checking stand-in.

    No ``persistent_load`` is defined, so a PERSID/BINPERSID opcode in the outer file is refused by
    the stdlib (:func:`safe_load` reports it as :class:`UnsafePickleError`). GLOBAL, STACK_GLOBAL,
    INST, OBJ, NEWOBJ and EXT* all resolve through ``find_class``, the single gate.

    Args:
        file: binary file object positioned at the pickle.
        allow_vendored_persistence: also accept ``<pkg>.torch_utils.persistence`` (forks that vendored
            EDM under a package); off by default.

    Raises (from ``load()``):
        UnsafePickleError: a global outside the allow-list, or a stand-in refusing its arguments.
    """

    def __init__(self, file: IO[bytes], *, allow_vendored_persistence: bool = False):
        super().__init__(file)
        self.allow_vendored_persistence = bool(allow_vendored_persistence)

    def find_class(self, module: str, name: str) -> Any:
        target = _ALLOWED.get((module, name))
        if target is None and self.allow_vendored_persistence and name == "_reconstruct_persistent_obj" \
                and module.endswith(".torch_utils.persistence"):
            target = _reconstruct_persistent_obj
        if target is None:
            raise UnsafePickleError(f"global {module}.{name} is not allowed in an EDM network pickle")
        return target


def safe_load(file: IO[bytes], *, allow_vendored_persistence: bool = False) -> Any:
    """Unpickle one EDM-format pickle from ``file`` with :class:`SafeEDMUnpickler` (EDM_FORMAT §1.9).

    Returns:
        the top-level object with persistent objects as :class:`PersistentStub`, containers as
        :class:`ContainerStub`, tensors as CPU ``torch.Tensor``, NumPy scalars as Python numbers.
    Raises:
        UnsafePickleError: anything outside the allow-list (including a PERSID opcode); nothing it
            asked for ran.
        WeightsError: a truncated or malformed pickle.
    """
    unpickler = SafeEDMUnpickler(file, allow_vendored_persistence=allow_vendored_persistence)
    try:
        with warnings.catch_warnings():  # legacy storages are TypedStorage, which torch flags as deprecated
            warnings.filterwarnings("ignore", message="TypedStorage is deprecated", category=UserWarning)
            return unpickler.load()
    except SimsError:
        raise
    except pickle.UnpicklingError as exc:
        msg = str(exc).replace("\n", " ")
        if "persistent" in msg:
            raise UnsafePickleError("PERSID opcode (persistent id) in the outer file: EDM network pickles "
                                    "have none") from None
        raise WeightsError(f"not a readable EDM pickle: {msg}") from None
    except (EOFError, ValueError, TypeError, AttributeError, KeyError, IndexError, struct.error,
            RecursionError, MemoryError) as exc:
        raise WeightsError(f"not a readable EDM pickle ({type(exc).__name__}: {str(exc)[:200]})") from None


# --------------------------------------------------------------------------------------------------
# Walking the recovered tree
# --------------------------------------------------------------------------------------------------

def _node_state(node: Any, where: str) -> dict:
    if isinstance(node, (PersistentStub, ContainerStub)):
        return node.state
    raise WeightsError(f"{where or 'root'}: expected a persistent module or container, found {type(node).__name__}")


def _dict_entry(state: dict, key: str, where: str) -> Dict[str, Any]:
    value = state.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise WeightsError(f"{where or 'root'}: {key} is a {type(value).__name__}, not a dict")
    return value


def flatten(stub: Any, prefix: str = "") -> "collections.OrderedDict[str, torch.Tensor]":
    """Name → tensor map of a recovered module tree in ``state_dict()`` order (EDM_FORMAT §1.9).

    Per node: its ``_parameters`` (None skipped), its ``_buffers`` (None and
    ``_non_persistent_buffers_set`` skipped), then each child of ``_modules`` (None skipped) with
    ``prefix + name + '.'``. Applied to ``snapshot['ema']`` the names are EDM's ``model.…`` names.

    Args:
        stub: a :class:`PersistentStub` or :class:`ContainerStub`.
        prefix: prepended to every name.
    Returns:
        OrderedDict name → CPU tensor (dtype as stored).
    Raises:
        WeightsError: a node or entry of the wrong type.
        UnsafePickleError: a tensor modified after it was rebuilt (:func:`check_tensor`).
    """
    out: "collections.OrderedDict[str, torch.Tensor]" = collections.OrderedDict()
    _flatten_into(stub, prefix, out, depth=0)
    return out


def _flatten_into(node: Any, prefix: str, out: dict, depth: int) -> None:
    if depth > 64:
        raise WeightsError(f"{prefix}: module tree deeper than 64 levels")
    state = _node_state(node, prefix.rstrip("."))
    for key in ("_parameters", "_buffers"):
        skip = state.get("_non_persistent_buffers_set") or set() if key == "_buffers" else set()
        for name, tensor in _dict_entry(state, key, prefix.rstrip(".")).items():
            if tensor is None or name in skip:
                continue
            if not isinstance(tensor, torch.Tensor):
                raise WeightsError(f"{prefix}{name}: {key} entry is a {type(tensor).__name__}, not a tensor")
            out[prefix + str(name)] = check_tensor(tensor, prefix + str(name))
    for name, child in _dict_entry(state, "_modules", prefix.rstrip(".")).items():
        if child is not None:
            _flatten_into(child, f"{prefix}{name}.", out, depth + 1)


class ClassNode(NamedTuple):
    """One node of :func:`describe`'s tree (EDM_FORMAT §1.9): the EDM class name, its constructor
    kwargs (None for containers / objects that recorded none) and its children by attribute name."""

    class_name: str
    init_kwargs: Optional[dict]
    children: "collections.OrderedDict[str, ClassNode]"


def describe(stub: Any) -> ClassNode:
    """Nested ``(class_name, init_kwargs, children)`` tree of a recovered object (EDM_FORMAT §1.9).

    Containers appear with their torch class name (``'ModuleDict'``) and ``init_kwargs`` None.

    Raises:
        WeightsError: a node of the wrong type.
    """
    return _describe(stub, "", 0)


def _describe(node: Any, where: str, depth: int) -> ClassNode:
    if depth > 64:
        raise WeightsError(f"{where}: module tree deeper than 64 levels")
    state = _node_state(node, where)
    kwargs = node.init_kwargs if isinstance(node, PersistentStub) else None
    children = collections.OrderedDict()
    for name, child in _dict_entry(state, "_modules", where).items():
        if child is not None:
            children[str(name)] = _describe(child, f"{where}.{name}" if where else str(name), depth + 1)
    return ClassNode(node.class_name, kwargs, children)


# --------------------------------------------------------------------------------------------------
# Snapshot
# --------------------------------------------------------------------------------------------------

@dataclass
class EDMSnapshot:
    """An EDM ``network-snapshot-*.pkl`` read by :func:`load_edm_pickle` (EDM_FORMAT §1.1, §1.3).

    Attributes:
        precond: class name of ``ema`` (``'EDMPrecond'``, ``'VPPrecond'``, ...).
        precond_kwargs: its constructor kwargs (``img_resolution``, ``img_channels``, ``label_dim``,
            ``model_type``, ... ; NumPy scalars as Python numbers).
        precond_attrs: its plain scalar/list attributes (``sigma_data``, ``sigma_min``, ``use_fp16``...).
        backbone: class name of ``ema.model`` (``'SongUNet'``, ``'DhariwalUNet'``) or None if absent.
        backbone_kwargs: its constructor kwargs (``in_channels``, ``model_channels``, ...) or None.
        tensors: ``flatten(ema)``: EDM name (``model.enc.16x16_conv.weight``) → CPU tensor.
        loss_fn / loss_kwargs: class name and kwargs of ``loss_fn`` (None if absent/None).
        augment_pipe / augment_kwargs: class name and kwargs of ``augment_pipe`` (None if None).
        dataset_kwargs: the ``dataset_kwargs`` dict ({} if absent).
        sha256: hex SHA-256 of the file.
        tree: :func:`describe` of ``ema``.
        extra_keys: top-level keys other than the four above (ignored).
    """

    precond: str
    precond_kwargs: Dict[str, Any]
    precond_attrs: Dict[str, Any]
    backbone: Optional[str]
    backbone_kwargs: Optional[Dict[str, Any]]
    tensors: "collections.OrderedDict[str, torch.Tensor]"
    loss_fn: Optional[str]
    loss_kwargs: Optional[Dict[str, Any]]
    augment_pipe: Optional[str]
    augment_kwargs: Optional[Dict[str, Any]]
    dataset_kwargs: Dict[str, Any]
    sha256: str
    tree: ClassNode
    extra_keys: List[str] = field(default_factory=list)


_PLAIN = (bool, int, float, str, type(None))


def _plain_attrs(state: dict) -> Dict[str, Any]:
    out = {}
    for key, value in state.items():
        if not isinstance(key, str) or key.startswith("_") or key == "training":
            continue
        if isinstance(value, _PLAIN) or (isinstance(value, (list, tuple)) and all(isinstance(v, _PLAIN) for v in value)):
            out[key] = value
    return out


def _kwargs_of(stub: PersistentStub) -> Dict[str, Any]:
    if stub.init_args:
        raise WeightsError(f"{stub.class_name}: positional constructor arguments {_short(stub.init_args)} "
                           f"(EDM constructs with keywords only)")
    return dict(stub.init_kwargs or {})


def _component(value: Any, key: str) -> Tuple[Optional[str], Optional[Dict[str, Any]]]:
    if value is None:
        return None, None
    if not isinstance(value, PersistentStub):
        raise WeightsError(f"snapshot[{key!r}] is a {type(value).__name__}, not a persistent object")
    kwargs = value.init_kwargs if value.init_kwargs is not None else _plain_attrs(value.state)
    return value.class_name, dict(kwargs)


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_edm_pickle(path: str | os.PathLike, *, allow_vendored_persistence: bool = False) -> EDMSnapshot:
    """Safely read an EDM network snapshot (EDM_FORMAT §1.1–§1.9); nothing in the file is executed.

    Args:
        path: an ``edm-*.pkl`` / ``network-snapshot-*.pkl`` file.
        allow_vendored_persistence: see :class:`SafeEDMUnpickler`.
    Returns:
        :class:`EDMSnapshot` with class names, constructor kwargs, tensors (EDM names, e.g.
        ``model.map_layer0.weight`` [emb, noise]) and the file's SHA-256.
    Raises:
        MissingFileError: ``path`` does not exist.
        WeightsError: unreadable / truncated file, top level not a dict with ``ema``, ``ema`` not a
            persistent module.
        UnsafePickleError: the file asks for anything outside the allow-list.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise MissingFileError(f"EDM pickle not found: {path}")
    try:
        sha = _sha256_file(path)
        with open(path, "rb") as f:
            data = safe_load(f, allow_vendored_persistence=allow_vendored_persistence)
    except OSError as exc:
        raise WeightsError(f"cannot read EDM pickle {path}: {exc.strerror or exc}") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{path}: top level is a {type(data).__name__}, expected a dict with key 'ema'")
    if "ema" not in data:
        raise WeightsError(f"{path}: no 'ema' network in the snapshot (keys: {', '.join(map(str, data))})")
    ema = data["ema"]
    if not isinstance(ema, PersistentStub):
        raise WeightsError(f"{path}: snapshot['ema'] is a {type(ema).__name__}, not a persistent network")
    modules = _dict_entry(ema.state, "_modules", "ema")
    model = modules.get("model")
    if model is not None and not isinstance(model, PersistentStub):
        raise WeightsError(f"{path}: ema.model is a {type(model).__name__}, not a persistent network")
    loss_fn, loss_kwargs = _component(data.get("loss_fn"), "loss_fn")
    augment_pipe, augment_kwargs = _component(data.get("augment_pipe"), "augment_pipe")
    dataset_kwargs = data.get("dataset_kwargs") or {}
    if not isinstance(dataset_kwargs, dict):
        raise WeightsError(f"{path}: dataset_kwargs is a {type(dataset_kwargs).__name__}, not a dict")
    return EDMSnapshot(
        precond=ema.class_name, precond_kwargs=_kwargs_of(ema), precond_attrs=_plain_attrs(ema.state),
        backbone=model.class_name if model is not None else None,
        backbone_kwargs=_kwargs_of(model) if model is not None else None,
        tensors=flatten(ema), loss_fn=loss_fn, loss_kwargs=loss_kwargs, augment_pipe=augment_pipe,
        augment_kwargs=augment_kwargs, dataset_kwargs=dict(dataset_kwargs), sha256=sha, tree=describe(ema),
        extra_keys=[str(k) for k in data if k not in ("ema", "loss_fn", "augment_pipe", "dataset_kwargs")])
