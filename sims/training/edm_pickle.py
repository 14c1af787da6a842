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

Entry points: :func:`load_edm_pickle` (path → :class:`EDMSnapshot`), :func:`safe_load` (file object
→ the raw top-level object), :func:`flatten` and :func:`describe`. Everything the allow-list does not
name raises :class:`sims.errors.UnsafePickleError` before it can run.
"""
from __future__ import annotations

import collections
import hashlib
import importlib
import io
import os
import pickle
import struct
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, IO, List, NamedTuple, Optional, Tuple

import torch

from sims.errors import MissingFileError, SimsError, UnsafePickleError, WeightsError

# torch.load imports these on first use; import them now so a load runs no import machinery
# (module loading goes through builtins.exec, which the hostile-pickle tests forbid during a load).
for _name in ("torch.utils.serialization.config", "torch._weights_only_unpickler"):
    try:
        importlib.import_module(_name)
    except ImportError:  # older torch: nothing to pre-import
        pass

__all__ = ["ClassNode", "ContainerStub", "EDMSnapshot", "PersistentStub", "SafeEDMUnpickler", "describe",
           "flatten", "load_edm_pickle", "safe_load", "PERSISTENCE_VERSION"]

PERSISTENCE_VERSION = 6  # torch_utils.persistence._version in EDM and EDM2 (EDM_FORMAT §1.2)
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # legacy torch.save magic number (§1.5)
LEGACY_PROTOCOL = 1001

# Legacy storage class tokens → (dtype, element size) (EDM_FORMAT §1.9).
_STORAGE_TOKENS: Dict[str, Tuple[torch.dtype, int]] = {
    "FloatStorage": (torch.float32, 4), "HalfStorage": (torch.float16, 2), "DoubleStorage": (torch.float64, 8),
    "BFloat16Storage": (torch.bfloat16, 2), "LongStorage": (torch.int64, 8), "IntStorage": (torch.int32, 4),
    "ShortStorage": (torch.int16, 2), "CharStorage": (torch.int8, 1), "ByteStorage": (torch.uint8, 1),
    "BoolStorage": (torch.bool, 1),
}

# NumPy dtype codes a scalar may have → struct format (EDM_FORMAT §1.6).
_NUMPY_SCALAR_CODES = {"f2": "e", "f4": "f", "f8": "d", "i1": "b", "i2": "h", "i4": "i", "i8": "q",
                       "u1": "B", "u2": "H", "u4": "I", "u8": "Q", "b1": "?"}

_MAX_DESCRIBE = 200  # characters of an offending value quoted in an error message


def _short(value: Any) -> str:
    text = repr(value).replace("\n", " ")
    return text if len(text) <= _MAX_DESCRIBE else text[:_MAX_DESCRIBE] + "..."


# --------------------------------------------------------------------------------------------------
# Stand-ins for the allowed globals
# --------------------------------------------------------------------------------------------------

class PersistentStub:
    """Inert stand-in for one ``torch_utils.persistence`` object (EDM_FORMAT §1.2, §1.3, §1.9).

    Built from the pickled ``meta`` dict instead of NVIDIA's ``_reconstruct_persistent_obj``; the
    embedded ``module_src`` is hashed (SHA-256, provenance only) and dropped, never compiled or run.

    Attributes:
        class_name: ``meta['class_name']``, e.g. ``'EDMPrecond'``, ``'SongUNet'``, ``'UNetBlock'``.
        version: ``meta['version']`` (always 6).
        state: the instance ``__dict__`` (plain dict): ``_parameters``/``_buffers`` (name → tensor or
            None), ``_modules`` (name → stub or None), the class's own attributes.
        init_args: ``state['_init_args']`` (tuple or None).
        init_kwargs: ``state['_init_kwargs']`` (dict or None).
        module_src_sha256: hex SHA-256 of the embedded module source (UTF-8).

    Raises:
        UnsafePickleError: ``meta`` is not a dict with ``type == 'class'``, ``version == 6``, a str
            ``module_src``, an identifier ``class_name`` and a dict ``state``.
    """

    __slots__ = ("class_name", "version", "state", "init_args", "init_kwargs", "module_src_sha256")

    def __init__(self, meta: Any):
        if type(meta) is not dict:
            raise UnsafePickleError(f"persistent object: meta must be a dict, found {type(meta).__name__}")
        if meta.get("type") != "class":
            raise UnsafePickleError(f"persistent object: meta['type'] must be 'class', found {_short(meta.get('type'))}")
        version = meta.get("version")
        if type(version) is not int or version != PERSISTENCE_VERSION:
            raise UnsafePickleError(f"persistent object: meta['version'] must be {PERSISTENCE_VERSION}, "
                                    f"found {_short(version)}")
        src = meta.get("module_src")
        if type(src) is not str:
            raise UnsafePickleError(f"persistent object: meta['module_src'] must be a str, found {type(src).__name__}")
        name = meta.get("class_name")
        if type(name) is not str or not name.isidentifier():
            raise UnsafePickleError(f"persistent object: meta['class_name'] must be an identifier, found {_short(name)}")
        state = meta.get("state")
        if type(state) is not dict:
            raise UnsafePickleError(f"persistent object {name}: meta['state'] must be a dict, "
                                    f"found {type(state).__name__}")
        self.class_name = name
        self.version = version
        self.state = state
        self.module_src_sha256 = hashlib.sha256(src.encode("utf-8", "surrogatepass")).hexdigest()
        init_args = state.get("_init_args")
        init_kwargs = state.get("_init_kwargs")
        if init_args is not None and not isinstance(init_args, (tuple, list)):
            raise UnsafePickleError(f"persistent object {name}: _init_args must be a tuple, "
                                    f"found {type(init_args).__name__}")
        if init_kwargs is not None and not isinstance(init_kwargs, dict):
            raise UnsafePickleError(f"persistent object {name}: _init_kwargs must be a dict, "
                                    f"found {type(init_kwargs).__name__}")
        self.init_args = tuple(init_args) if init_args is not None else None
        self.init_kwargs = dict(init_kwargs) if init_kwargs is not None else None

    def __setstate__(self, state: Any) -> None:
        raise UnsafePickleError(f"persistent object {self.class_name}: BUILD on it is not allowed "
                                f"(EDM's reduce has no state step)")

    def __repr__(self) -> str:
        return f"PersistentStub({self.class_name})"


def _reconstruct_persistent_obj(meta: Any = None, *extra: Any) -> PersistentStub:
    """Stand-in for ``torch_utils.persistence._reconstruct_persistent_obj(meta)`` (EDM_FORMAT §1.2)."""
    if extra:
        raise UnsafePickleError(f"_reconstruct_persistent_obj called with {1 + len(extra)} arguments (expected 1)")
    return PersistentStub(meta)


class ContainerStub:
    """Inert stand-in for ``torch.nn.ModuleDict`` / ``Sequential`` / ``ModuleList`` (EDM_FORMAT §1.4).

    Created by NEWOBJ with no arguments, filled by BUILD: ``state`` is the container's ``__dict__``
    (its ``_modules`` maps keys such as ``'32x32_conv'`` to :class:`PersistentStub` children).

    Raises:
        UnsafePickleError: constructed with arguments, or a state that is not a dict.
    """

    class_name = "ModuleDict"
    __slots__ = ("state",)

    def __new__(cls, *args: Any, **kwargs: Any):
        if args or kwargs:
            raise UnsafePickleError(f"torch.nn.{cls.class_name} constructed with arguments {_short(args)}")
        obj = super().__new__(cls)
        obj.state = {}
        return obj

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and state[1] is None:
            state = state[0]  # (dict_state, slot_state) form
        if type(state) is not dict:
            raise UnsafePickleError(f"torch.nn.{self.class_name} state must be a dict, found {type(state).__name__}")
        self.state = state

    def __repr__(self) -> str:
        return f"ContainerStub({self.class_name})"


class _ModuleDictStub(ContainerStub):
    class_name = "ModuleDict"
    __slots__ = ()


class _SequentialStub(ContainerStub):
    class_name = "Sequential"
    __slots__ = ()


class _ModuleListStub(ContainerStub):
    class_name = "ModuleList"
    __slots__ = ()


class _NumpyDtypeStub:
    """Stand-in for ``numpy.dtype(code, align, copy)`` + BUILD state (EDM_FORMAT §1.6); scalars only."""

    __slots__ = ("code", "byteorder")

    def __init__(self, code: Any = None, align: Any = False, copy: Any = True):
        if type(code) is not str or code not in _NUMPY_SCALAR_CODES:
            raise UnsafePickleError(f"numpy.dtype {_short(code)} is not an allowed scalar dtype "
                                    f"({', '.join(_NUMPY_SCALAR_CODES)})")
        if type(align) is not bool or type(copy) is not bool:
            raise UnsafePickleError(f"numpy.dtype({code!r}) with non-bool align/copy {_short((align, copy))}")
        self.code = code
        self.byteorder = "<"

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) >= 2 and type(state[1]) is str):
            raise UnsafePickleError(f"numpy.dtype state {_short(state)} is not a scalar dtype state")
        if state[1] not in ("<", ">", "|", "="):
            raise UnsafePickleError(f"numpy.dtype byte order {state[1]!r} is not one of < > | =")
        if len(state) > 2 and any(v is not None for v in state[2:5]):
            raise UnsafePickleError(f"numpy.dtype state {_short(state)} describes a structured dtype")
        self.byteorder = state[1]


def _numpy_scalar(dtype: Any = None, data: Any = None, *extra: Any) -> Any:
    """Stand-in for ``numpy.core.multiarray.scalar(dtype, bytes)``: decode with struct (EDM_FORMAT §1.6).

    Returns a Python float (f2/f4/f8), int (i*/u*) or bool (b1).
    """
    if extra or not isinstance(dtype, _NumpyDtypeStub):
        raise UnsafePickleError(f"numpy scalar with dtype {_short(dtype)} (only plain numeric scalars are allowed)")
    if type(data) is not bytes:
        raise UnsafePickleError(f"numpy scalar {dtype.code} with non-bytes payload {type(data).__name__}")
    order = ">" if dtype.byteorder == ">" else "<"
    fmt = order + _NUMPY_SCALAR_CODES[dtype.code]
    if len(data) != struct.calcsize(fmt):
        raise UnsafePickleError(f"numpy scalar {dtype.code}: {len(data)} bytes, expected {struct.calcsize(fmt)}")
    (value,) = struct.unpack(fmt, data)
    return float(value) if dtype.code[0] == "f" else value


def _codecs_encode(obj: Any = None, encoding: Any = None, *extra: Any) -> bytes:
    """Stand-in for ``_codecs.encode(str, 'latin1')`` (protocol-2 bytes; EDM_FORMAT §1.6)."""
    if extra or type(obj) is not str or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"_codecs.encode with {_short((obj, encoding) + extra)[:80]} "
                                f"(only encode(str, 'latin1') is allowed)")
    return obj.encode("latin1")


class _EasyDict(dict):
    """Stand-in for ``dnnlib.util.EasyDict``: a plain dict subclass, filled by SETITEMS (EDM_FORMAT §1.7)."""

    def __new__(cls, *args: Any, **kwargs: Any):
        if args or kwargs:
            raise UnsafePickleError(f"dnnlib.util.EasyDict constructed with arguments {_short(args)}")
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__()

    def __setstate__(self, state: Any) -> None:
        if state not in (None, {}):
            raise UnsafePickleError("dnnlib.util.EasyDict with a non-empty attribute state")


def _ordered_dict(*args: Any) -> collections.OrderedDict:
    """``collections.OrderedDict`` restricted to no arguments or one list of (key, value) pairs."""
    if len(args) > 1:
        raise UnsafePickleError(f"collections.OrderedDict called with {len(args)} arguments")
    if args and not isinstance(args[0], (list, tuple, dict)):
        raise UnsafePickleError(f"collections.OrderedDict({type(args[0]).__name__}) is not allowed")
    return collections.OrderedDict(*args)


def _set(items: Any = (), *extra: Any) -> set:
    """``builtins.set(list)``: how protocols < 4 write ``_non_persistent_buffers_set`` (EDM_FORMAT §1.3)."""
    if extra or not isinstance(items, (list, tuple)) or not all(isinstance(v, (str, int)) for v in items):
        raise UnsafePickleError(f"builtins.set({_short(items)[:80]}) is not allowed (only a list of names)")
    return set(items)


def _is_empty_hooks(hooks: Any) -> bool:
    return isinstance(hooks, dict) and len(hooks) == 0


def _int_tuple(value: Any, what: str) -> Tuple[int, ...]:
    if not isinstance(value, tuple) or not all(type(v) is int and v >= 0 for v in value):
        raise UnsafePickleError(f"_rebuild_tensor_v2: {what} must be a tuple of non-negative ints, found {_short(value)}")
    return value


def _rebuild_tensor_v2(storage: Any = None, storage_offset: Any = None, size: Any = None, stride: Any = None,
                       requires_grad: Any = None, backward_hooks: Any = None, metadata: Any = None,
                       *extra: Any) -> torch.Tensor:
    """Checked ``torch._utils._rebuild_tensor_v2`` (EDM_FORMAT §1.5): storage from the checked
    ``_load_from_bytes``, int offset/size/stride inside the storage, EMPTY backward hooks, no metadata."""
    if extra:
        raise UnsafePickleError(f"_rebuild_tensor_v2 called with {7 + len(extra)} arguments")
    if type(storage) is not _CheckedStorage:
        raise UnsafePickleError(f"_rebuild_tensor_v2: storage must come from _load_from_bytes, "
                                f"found {type(storage).__name__}")
    if type(storage_offset) is not int or storage_offset < 0:
        raise UnsafePickleError(f"_rebuild_tensor_v2: storage offset {_short(storage_offset)} is not a non-negative int")
    size = _int_tuple(size, "size")
    stride = _int_tuple(stride, "stride")
    if len(size) != len(stride):
        raise UnsafePickleError(f"_rebuild_tensor_v2: size {size} and stride {stride} differ in length")
    if type(requires_grad) is not bool:
        raise UnsafePickleError(f"_rebuild_tensor_v2: requires_grad {_short(requires_grad)} is not a bool")
    if not _is_empty_hooks(backward_hooks):
        raise UnsafePickleError(f"_rebuild_tensor_v2: backward hooks must be an empty OrderedDict, "
                                f"found {_short(backward_hooks)}")
    if metadata is not None and not _is_empty_hooks(metadata):
        raise UnsafePickleError(f"_rebuild_tensor_v2: tensor metadata {_short(metadata)} is not allowed")
    numel = storage.numel
    if all(s > 0 for s in size):
        needed = storage_offset + sum((s - 1) * st for s, st in zip(size, stride)) + 1
        if needed > numel:
            raise UnsafePickleError(f"_rebuild_tensor_v2: view (offset {storage_offset}, size {size}, stride {stride}) "
                                    f"reaches element {needed}, storage has {numel}")
    return torch._utils._rebuild_tensor_v2(storage._storage, storage_offset, size, stride, False,
                                           collections.OrderedDict())


def check_tensor(t: Any, where: str) -> torch.Tensor:
    """Require a plain, unmodified CPU tensor as :func:`_rebuild_tensor_v2` makes it: no grad, no
    hooks, no Python attributes (a BUILD opcode on a tensor could set them; EDM_FORMAT §1.5).

    Raises:
        UnsafePickleError: anything else.
    """
    if type(t) is not torch.Tensor:
        raise UnsafePickleError(f"{where}: expected a tensor, found {type(t).__name__}")
    hooks = t._backward_hooks
    if t.requires_grad or not t.is_leaf or t.grad is not None or (hooks is not None and len(hooks) > 0) \
            or t.__dict__ or t.device.type != "cpu":
        raise UnsafePickleError(f"{where}: tensor was modified after it was rebuilt (requires_grad, hooks, "
                                f"grad or attributes set, e.g. by a BUILD opcode)")
    return t


def _rebuild_parameter(data: Any = None, requires_grad: Any = None, backward_hooks: Any = None,
                       *extra: Any) -> torch.Tensor:
    """Checked ``torch._utils._rebuild_parameter`` (EDM_FORMAT §1.5): a tensor, a bool, EMPTY hooks.

    Returns the plain tensor (no grad); :func:`flatten` knows parameters from buffers by their dict.
    """
    if extra:
        raise UnsafePickleError(f"_rebuild_parameter called with {3 + len(extra)} arguments")
    if type(data) is not torch.Tensor:
        raise UnsafePickleError(f"_rebuild_parameter: data must be a tensor, found {type(data).__name__}")
    check_tensor(data, "_rebuild_parameter")
    if type(requires_grad) is not bool:
        raise UnsafePickleError(f"_rebuild_parameter: requires_grad {_short(requires_grad)} is not a bool")
    if not _is_empty_hooks(backward_hooks):
        raise UnsafePickleError(f"_rebuild_parameter: backward hooks must be an empty OrderedDict, "
                                f"found {_short(backward_hooks)}")
    return data


def _rebuild_parameter_with_state(data: Any = None, requires_grad: Any = None, backward_hooks: Any = None,
                                  state: Any = None, *extra: Any) -> torch.Tensor:
    """Checked ``torch._utils._rebuild_parameter_with_state``: as :func:`_rebuild_parameter`, and the
    Python attribute state must be empty (nothing is set on the tensor)."""
    if extra:
        raise UnsafePickleError(f"_rebuild_parameter_with_state called with {4 + len(extra)} arguments")
    empty = state is None or _is_empty_hooks(state) or (
        isinstance(state, tuple) and all(s is None or _is_empty_hooks(s) for s in state))
    if not empty:
        raise UnsafePickleError(f"_rebuild_parameter_with_state: parameter attribute state {_short(state)} "
                                f"is not allowed")
    return _rebuild_parameter(data, requires_grad, backward_hooks)


# ---- nested legacy torch.save storage blobs (EDM_FORMAT §1.5) -----------------------------------

class _StorageToken:
    """A legacy ``torch.<X>Storage`` class token (never instantiated or called)."""

    __slots__ = ("name", "dtype", "element_size")

    def __init__(self, name: str):
        self.name = name
        self.dtype, self.element_size = _STORAGE_TOKENS[name]

    def __call__(self, *args: Any, **kwargs: Any):
        raise UnsafePickleError(f"storage header: torch.{self.name} called")

    def __setstate__(self, state: Any) -> None:
        raise UnsafePickleError(f"storage header: BUILD on torch.{self.name} is not allowed")


class _HeaderUnpickler(pickle.Unpickler):
    """Allow-lists only ``torch.<X>Storage`` tokens; records the one persistent id (EDM_FORMAT §1.9)."""

    def __init__(self, f: IO[bytes]):
        super().__init__(f)
        self.pids: List[Any] = []

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _STORAGE_TOKENS:
            return _StorageToken(name)
        raise UnsafePickleError(f"storage blob: global {module}.{name} is not allowed (only torch.*Storage)")

    def persistent_load(self, pid: Any) -> Any:
        self.pids.append(pid)
        return ("__persistent__", len(self.pids) - 1)


def _header_load(f: io.BytesIO, what: str) -> Any:
    try:
        return _HeaderUnpickler(f).load()
    except UnsafePickleError:
        raise
    except Exception as exc:  # truncated / malformed header: refuse before torch.load sees it
        raise UnsafePickleError(f"storage blob: unreadable {what} ({type(exc).__name__}: {exc})") from None


def parse_storage_blob(b: bytes) -> Tuple[torch.dtype, int]:
    """Parse and size-check a nested legacy ``torch.save(storage)`` blob, allocating nothing.

    Layout (EDM_FORMAT §1.5): magic, protocol 1001, sys_info, a bare persistent id
    ``('storage', torch.<X>Storage, key, location, numel, None)``, ``[key]``, then int64 numel and
    ``numel × element_size`` raw bytes, which must be exactly what remains of ``b``.

    Returns:
        (dtype, numel) of the storage.
    Raises:
        UnsafePickleError: any other global, object, layout, or a size that the bytes do not hold.
    """
    if type(b) is not bytes:
        raise UnsafePickleError(f"_load_from_bytes: payload must be bytes, found {type(b).__name__}")
    f = io.BytesIO(b)
    magic = _header_load(f, "magic number")
    if type(magic) is not int or magic != LEGACY_MAGIC:
        raise UnsafePickleError(f"storage blob: not a legacy torch.save file (magic {_short(magic)[:40]})")
    proto = _header_load(f, "protocol version")
    if type(proto) is not int or proto != LEGACY_PROTOCOL:
        raise UnsafePickleError(f"storage blob: legacy protocol {_short(proto)[:40]}, expected {LEGACY_PROTOCOL}")
    sys_info = _header_load(f, "sys_info")
    if (type(sys_info) is not dict or sys_info.get("protocol_version") != LEGACY_PROTOCOL
            or sys_info.get("little_endian") is not True or type(sys_info.get("type_sizes")) is not dict):
        raise UnsafePickleError(f"storage blob: unsupported sys_info {_short(sys_info)} (little-endian 1001 only)")
    unp = _HeaderUnpickler(f)
    try:
        obj = unp.load()
    except UnsafePickleError:
        raise
    except Exception as exc:
        raise UnsafePickleError(f"storage blob: unreadable object record ({type(exc).__name__}: {exc})") from None
    if obj != ("__persistent__", 0) or len(unp.pids) != 1:
        raise UnsafePickleError(f"storage blob: object is not a single bare storage (found {_short(obj)[:80]})")
    pid = unp.pids[0]
    if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage" and isinstance(pid[1], _StorageToken)
            and type(pid[2]) is str and type(pid[3]) is str and type(pid[4]) is int and pid[4] >= 0
            and pid[5] is None):
        raise UnsafePickleError(f"storage blob: persistent id {_short(pid)} is not "
                                f"('storage', torch.<X>Storage, key, location, numel, None)")
    token, key, location, numel = pid[1], pid[2], pid[3], pid[4]
    if not (location == "cpu" or location.startswith("cuda")):
        raise UnsafePickleError(f"storage blob: location {location!r} is neither cpu nor cuda")
    keys = _header_load(f, "storage key list")
    if keys != [key]:
        raise UnsafePickleError(f"storage blob: key list {_short(keys)} is not [{key!r}]")
    offset = f.tell()
    remaining = len(b) - offset
    expected = 8 + numel * token.element_size
    if remaining != expected:
        raise UnsafePickleError(f"storage blob: {token.name} of {numel} elements needs {expected} bytes, "
                                f"{remaining} present")
    (count,) = struct.unpack_from("<q", b, offset)
    if count != numel:
        raise UnsafePickleError(f"storage blob: data record holds {count} elements, header declares {numel}")
    return token.dtype, numel


class _CheckedStorage:
    """A storage that came out of :func:`_load_from_bytes`; immutable (BUILD on it is refused), so
    only :func:`_rebuild_tensor_v2` can use it."""

    __slots__ = ("_storage", "dtype", "numel")

    def __init__(self, storage: torch.storage.TypedStorage, dtype: torch.dtype, numel: int):
        object.__setattr__(self, "_storage", storage)
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "numel", numel)

    def __setattr__(self, name: str, value: Any) -> None:
        raise UnsafePickleError("a rebuilt storage cannot be modified")

    def __setstate__(self, state: Any) -> None:
        raise UnsafePickleError("BUILD on a rebuilt storage is not allowed")

    def __repr__(self) -> str:
        return f"_CheckedStorage({self.dtype}[{self.numel}])"


def _load_from_bytes(b: Any = None, *extra: Any) -> "_CheckedStorage":
    """Checked ``torch.storage._load_from_bytes`` (EDM_FORMAT §1.5, §1.8).

    First :func:`parse_storage_blob` (header and size check, nothing allocated), then
    ``torch.load(io.BytesIO(b), map_location='cpu', weights_only=True)``; the result must be a CPU
    storage of the declared dtype and size. Returns it wrapped in an immutable ``_CheckedStorage``
    that only :func:`_rebuild_tensor_v2` accepts.

    Raises:
        UnsafePickleError: the header check fails, torch.load refuses, or the result is no storage.
    """
    if extra:
        raise UnsafePickleError(f"_load_from_bytes called with {1 + len(extra)} arguments")
    dtype, numel = parse_storage_blob(b)
    try:
        storage = torch.load(io.BytesIO(b), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UnsafePickleError(f"storage blob refused by torch.load(weights_only=True): "
                                f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if isinstance(storage, torch.storage.TypedStorage):
        if storage.dtype != dtype or storage.size() != numel or storage.device.type != "cpu":
            raise UnsafePickleError(f"storage blob decoded to {storage.dtype}[{storage.size()}], "
                                    f"header declares {dtype}[{numel}]")
        return _CheckedStorage(storage, dtype, numel)
    raise UnsafePickleError(f"storage blob decoded to {type(storage).__name__}, not a storage")


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
