"""Checked rebuilding of the tensors inside an EDM network pickle (EDM_FORMAT §1.5, §1.8, §1.9).

Stand-ins for ``torch._utils._rebuild_tensor_v2`` / ``_rebuild_parameter`` /
``_rebuild_parameter_with_state`` and ``torch.storage._load_from_bytes``, used by
:class:`sims.training.edm_pickle.SafeEDMUnpickler`: a tensor is rebuilt only from a nested legacy
``torch.save`` storage blob whose header was parsed and size-checked first
(:func:`parse_storage_blob`), then read with ``torch.load(weights_only=True)``; :func:`check_tensor`
refuses a tensor modified after it was rebuilt.
"""
from __future__ import annotations

import collections
import importlib
import io
import pickle
import struct
from typing import Any, Dict, IO, List, Tuple

import torch

from sims.errors import UnsafePickleError
from sims.training.edm_stubs import _short

# torch.load imports these on first use; import them now so a load runs no import machinery
# (module loading goes through builtins.exec, which the hostile-pickle tests forbid during a load).
for _name in ("torch.utils.serialization.config", "torch._weights_only_unpickler"):
    try:
        importlib.import_module(_name)
    except ImportError:  # older torch: nothing to pre-import
        pass

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # legacy torch.save magic number (§1.5)
LEGACY_PROTOCOL = 1001

# Legacy storage class tokens → (dtype, element size) (EDM_FORMAT §1.9).
_STORAGE_TOKENS: Dict[str, Tuple[torch.dtype, int]] = {
    "FloatStorage": (torch.float32, 4), "HalfStorage": (torch.float16, 2), "DoubleStorage": (torch.float64, 8),
    "BFloat16Storage": (torch.bfloat16, 2), "LongStorage": (torch.int64, 8), "IntStorage": (torch.int32, 4),
    "ShortStorage": (torch.int16, 2), "CharStorage": (torch.int8, 1), "ByteStorage": (torch.uint8, 1),
    "BoolStorage": (torch.bool, 1),
}


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

