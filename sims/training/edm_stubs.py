"""Inert stand-ins for the non-tensor globals an EDM network pickle may name (EDM_FORMAT §1.2–§1.9).

Used by :class:`sims.training.edm_pickle.SafeEDMUnpickler`: :class:`PersistentStub` replaces
``torch_utils.persistence._reconstruct_persistent_obj`` (the embedded source is hashed, never run),
:class:`ContainerStub` the ``torch.nn`` containers, and small checked functions the NumPy scalar,
``_codecs.encode``, ``dnnlib.util.EasyDict``, ``collections.OrderedDict`` and ``builtins.set``. Each
refuses unexpected arguments with :class:`sims.errors.UnsafePickleError`.
"""
from __future__ import annotations

import collections
import hashlib
import struct
from typing import Any

from sims.errors import UnsafePickleError

PERSISTENCE_VERSION = 6  # torch_utils.persistence._version in EDM and EDM2 (EDM_FORMAT §1.2)

# NumPy dtype codes a scalar may have → struct format (EDM_FORMAT §1.6).
_NUMPY_SCALAR_CODES = {"f2": "e", "f4": "f", "f8": "d", "i1": "b", "i2": "h", "i4": "i", "i8": "q",
                       "u1": "B", "u2": "H", "u4": "I", "u8": "Q", "b1": "?"}

_MAX_DESCRIBE = 200  # characters of an offending value quoted in an error message


def _short(value: Any) -> str:
    text = repr(value).replace("\n", " ")
    return text if len(text) <= _MAX_DESCRIBE else text[:_MAX_DESCRIBE] + "..."


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
