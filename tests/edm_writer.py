"""Test helper: write EDM-format network pickles without any NVIDIA code (EDM_FORMAT §6.1 item 1).

An EDM snapshot is a plain pickle of ``dict(ema=..., loss_fn=..., augment_pipe=..., dataset_kwargs=...)``
whose persistent objects reduce to ``torch_utils.persistence._reconstruct_persistent_obj(meta)``
(EDM_FORMAT §1.2). Here :class:`FakePersistent` (an ``nn.Module``) and :class:`FakePersistentObject`
(a plain object, for ``loss_fn`` / ``augment_pipe``) reduce the same way; ``fake_reconstruct`` carries
that module/name and is reachable through throw-away ``sys.modules`` entries only while
:func:`write_edm_pickle` runs ``pickle.dump``. Parameters are real ``nn.Parameter``s and buffers real
tensors in the real ``_parameters`` / ``_buffers`` dicts, ``enc`` / ``dec`` are real
``torch.nn.ModuleDict``s, so PyTorch serialises the tensors itself (``_rebuild_parameter`` →
``_rebuild_tensor_v2`` → ``_load_from_bytes``) exactly as in EDM's files. Every ``module_src`` is a
canary (:func:`canary_src`) that, if ever executed, writes a file, sets an environment variable,
inserts a ``sys.modules`` entry and raises.
"""
from __future__ import annotations

import collections
import contextlib
import io
import pickle
import sys
import types
from typing import Any, Dict, Iterator, Mapping, Optional

import numpy as np
import torch

from sims.training.edm_import import edm_tensor_shapes, export_edm_tensors

CANARY_ENV = "SIMS_EDM_CANARY_RAN"
CANARY_MODULE = "sims_edm_canary_module"


def canary_src(canary_file: str) -> str:
    """Module source that records its execution three ways, then raises."""
    return (
        "import os, sys, types\n"
        f"open({str(canary_file)!r}, 'w').write('module_src was executed')\n"
        f"os.environ[{CANARY_ENV!r}] = '1'\n"
        f"sys.modules[{CANARY_MODULE!r}] = types.ModuleType({CANARY_MODULE!r})\n"
        "raise RuntimeError('EDM module source was executed: a safe loader must never exec module_src')\n"
    )


CANARY_SRC = canary_src("/tmp/sims_edm_canary_ran")


def fake_reconstruct(meta: Any) -> Any:
    """Named ``torch_utils.persistence._reconstruct_persistent_obj`` in the pickle; never called."""
    raise RuntimeError("fake_reconstruct must never be called: the pickle was loaded unsafely")


fake_reconstruct.__module__ = "torch_utils.persistence"
fake_reconstruct.__name__ = fake_reconstruct.__qualname__ = "_reconstruct_persistent_obj"

_PRIVATE = ("_fake_class_name", "_fake_module_src", "_fake_version", "_fake_extra_state")


class _ReducesLikeEDM:
    """``__reduce__`` of EDM's persistent classes: ``(_reconstruct_persistent_obj, (meta,), None)``."""

    def __reduce__(self):
        state = {k: v for k, v in self.__dict__.items() if k not in _PRIVATE}
        for key in ("_parameters", "_buffers", "_modules"):  # OrderedDicts, as PyTorch 1.12 wrote them
            if key in state:
                state[key] = collections.OrderedDict(state[key])
        state.update(self.__dict__.get("_fake_extra_state") or {})
        meta = dict(type="class", version=self.__dict__.get("_fake_version", 6),
                    module_src=self.__dict__["_fake_module_src"], class_name=self.__dict__["_fake_class_name"],
                    state=state)
        return (fake_reconstruct, (meta,), None)


class FakePersistent(_ReducesLikeEDM, torch.nn.Module):
    """An ``nn.Module`` that pickles like an EDM persistent module of class ``class_name``.

    Args:
        class_name: EDM class name (``'EDMPrecond'``, ``'SongUNet'``, ``'UNetBlock'``, ``'Conv2d'``...).
        init_kwargs: recorded as ``_init_kwargs`` (``_init_args`` is ``()``).
        module_src: the ``meta['module_src']`` string (a canary).
        version: ``meta['version']`` (6 in EDM; other values for hostile tests).
        extra_state: entries added to the pickled state (hostile tests).
    """

    def __init__(self, class_name: str, init_kwargs: Optional[Mapping[str, Any]] = None,
                 module_src: str = CANARY_SRC, version: Any = 6, extra_state: Optional[Mapping[str, Any]] = None):
        super().__init__()
        self.__dict__["_fake_class_name"] = class_name
        self.__dict__["_fake_module_src"] = module_src
        self.__dict__["_fake_version"] = version
        self.__dict__["_fake_extra_state"] = dict(extra_state or {})
        self._init_args = ()
        self._init_kwargs = dict(init_kwargs or {})


class FakePersistentObject(_ReducesLikeEDM):
    """A plain object that pickles like EDM's persistent ``EDMLoss`` / ``AugmentPipe``; ``attrs`` are its state."""

    def __init__(self, class_name: str, init_kwargs: Optional[Mapping[str, Any]] = None,
                 attrs: Optional[Mapping[str, Any]] = None, module_src: str = CANARY_SRC):
        self.__dict__["_fake_class_name"] = class_name
        self.__dict__["_fake_module_src"] = module_src
        self._init_args = ()
        self._init_kwargs = dict(init_kwargs or {})
        self.__dict__.update(attrs if attrs is not None else init_kwargs or {})


@contextlib.contextmanager
def fake_persistence_modules() -> Iterator[None]:
    """Install throw-away ``torch_utils`` / ``torch_utils.persistence`` modules exposing
    :func:`fake_reconstruct` (so pickle can name it), and remove them afterwards."""
    names = ("torch_utils", "torch_utils.persistence")
    saved = {n: sys.modules.get(n) for n in names}
    pkg = types.ModuleType("torch_utils")
    mod = types.ModuleType("torch_utils.persistence")
    mod._reconstruct_persistent_obj = fake_reconstruct
    pkg.persistence = mod
    sys.modules["torch_utils"], sys.modules["torch_utils.persistence"] = pkg, mod
    try:
        yield
    finally:
        for n in names:
            if saved[n] is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = saved[n]


# --------------------------------------------------------------------------------------------------
# Building an EDM-like module tree from EDM names
# --------------------------------------------------------------------------------------------------

_LINEAR = {"map_label", "map_augment", "map_layer0", "map_layer1", "affine"}


def _leaf_class(name: str) -> str:
    if name in _LINEAR:
        return "Linear"
    if name.startswith("norm") or name.endswith("_norm"):
        return "GroupNorm"
    return "Conv2d"


def _leaf_kwargs(cls: str, tensors: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    w = tensors.get("weight")
    if cls == "GroupNorm":
        return dict(num_channels=int(w.shape[0]), eps=np.float64(1e-6))
    if cls == "Linear":
        return dict(in_features=int(w.shape[1]), out_features=int(w.shape[0]), bias="bias" in tensors,
                    init_mode="xavier_uniform", init_weight=np.float64(1.0))
    kernel = int(w.shape[-1]) if w is not None else 0
    kw = dict(in_channels=int(w.shape[1]) if w is not None else None,
              out_channels=int(w.shape[0]) if w is not None else None, kernel=kernel)
    if "resample_filter" in tensors:
        kw.update(resample_filter=[1, 1])
    return kw


def _make_leaf(name: str, tensors: Mapping[str, torch.Tensor], module_src: str) -> FakePersistent:
    cls = _leaf_class(name)
    node = FakePersistent(cls, _leaf_kwargs(cls, tensors), module_src=module_src)
    for key in ("weight", "bias"):
        if key in tensors:
            node.register_parameter(key, torch.nn.Parameter(tensors[key].detach().clone(), requires_grad=False))
        else:
            setattr(node, key, None)  # absent weights are plain None attributes (EDM_FORMAT §1.3)
    if "resample_filter" in tensors:
        node.register_buffer("resample_filter", tensors["resample_filter"].detach().clone())
    else:
        node.register_buffer("resample_filter", None)
    unexpected = set(tensors) - {"weight", "bias", "resample_filter"}
    if unexpected:
        raise ValueError(f"{name}: unexpected leaf tensors {sorted(unexpected)}")
    return node


def _group(tensors: Mapping[str, torch.Tensor]) -> "collections.OrderedDict[str, Dict[str, torch.Tensor]]":
    groups: "collections.OrderedDict[str, Dict[str, torch.Tensor]]" = collections.OrderedDict()
    for name, t in tensors.items():
        head, _, rest = name.partition(".")
        groups.setdefault(head, collections.OrderedDict())[rest] = t
    return groups


def _make_block(name: str, tensors: Mapping[str, torch.Tensor], module_src: str) -> FakePersistent:
    children = _group(tensors)
    w0 = children["conv0"]["weight"]
    kwargs = dict(in_channels=int(w0.shape[1]), out_channels=int(w0.shape[0]), up=name.endswith("_up"),
                  down=name.endswith("_down"), attention="qkv" in children,
                  init_attn=dict(init_mode="xavier_uniform", init_weight=np.sqrt(0.2)))
    block = FakePersistent("UNetBlock", kwargs, module_src=module_src)
    for child, sub in children.items():
        setattr(block, child, _make_leaf(child, sub, module_src))
    if "skip" not in children:
        block.skip = None  # absent optional layer: plain None attribute
    block.skip_scale = np.sqrt(0.5)  # a NumPy float64 in the state (EDM_FORMAT §1.3)
    block.num_heads = 1 if "qkv" in children else 0
    return block


def edm_tree_from_tensors(tensors: Mapping[str, torch.Tensor], precond_class: str, precond_kwargs: Mapping[str, Any],
                          backbone_class: str, backbone_kwargs: Mapping[str, Any], *,
                          precond_attrs: Optional[Mapping[str, Any]] = None,
                          module_src: str = CANARY_SRC, version: Any = 6) -> FakePersistent:
    """Build an EDM-like ``ema`` tree (preconditioner → ``model`` → ``enc``/``dec`` ModuleDicts of
    UNetBlocks, Conv2d, Linear, GroupNorm) holding ``tensors`` (EDM names ``model.…``)."""
    root = FakePersistent(precond_class, precond_kwargs, module_src=module_src, version=version)
    for key, value in (precond_attrs or {}).items():
        setattr(root, key, value)
    model_tensors = collections.OrderedDict()
    for name, t in tensors.items():
        if not name.startswith("model."):
            raise ValueError(f"tensor {name} is not under 'model.'")
        model_tensors[name[len("model."):]] = t
    model = FakePersistent(backbone_class, backbone_kwargs, module_src=module_src)
    model.map_noise = FakePersistent("PositionalEmbedding", dict(num_channels=int(backbone_kwargs.get(
        "model_channels", 128)), endpoint=backbone_class == "SongUNet"), module_src=module_src)
    for opt in ("map_label", "map_augment"):
        setattr(model, opt, None)
    for head, sub in _group(model_tensors).items():
        if head in ("enc", "dec"):
            container = torch.nn.ModuleDict()
            for key, sub2 in _group(sub).items():
                if any("." in n for n in sub2):  # a UNetBlock: norm0.weight, conv0.weight, ...
                    container[key] = _make_block(key, sub2, module_src)
                else:  # RxR_conv, RxR_aux_norm, RxR_aux_conv: a Conv2d / GroupNorm
                    container[key] = _make_leaf(key.rsplit("_", 1)[-1], sub2, module_src)
            setattr(model, head, container)
        else:
            setattr(model, head, _make_leaf(head, sub, module_src))
    root.model = model
    return root


def write_edm_pickle(file: Any, ema: Any, *, loss_fn: Any = None, augment_pipe: Any = None,
                     dataset_kwargs: Optional[Mapping[str, Any]] = None, protocol: int = 4,
                     extra: Optional[Mapping[str, Any]] = None, with_ema: bool = True) -> bytes:
    """``pickle.dump(dict(ema=..., loss_fn=..., augment_pipe=..., dataset_kwargs=...))`` like EDM's
    training loop (EDM_FORMAT §1.1), with the fake persistence module installed only meanwhile.

    Args:
        file: a path, a binary file object, or None (only return the bytes).
    Returns:
        the pickle bytes.
    """
    data: Dict[str, Any] = {}
    if with_ema:
        data["ema"] = ema
    data.update(loss_fn=loss_fn, augment_pipe=augment_pipe,
                dataset_kwargs=dict(dataset_kwargs if dataset_kwargs is not None else
                                    {"class_name": "training.dataset.ImageFolderDataset", "path": "datasets/x.zip",
                                     "use_labels": False, "xflip": False, "cache": True, "resolution": 32,
                                     "max_size": 50000}))
    data.update(extra or {})
    buf = io.BytesIO()
    with fake_persistence_modules():
        pickle.dump(data, buf, protocol=protocol)
    raw = buf.getvalue()
    if isinstance(file, (str, bytes)) or hasattr(file, "__fspath__"):
        with open(file, "wb") as f:
            f.write(raw)
    elif file is not None:
        file.write(raw)
    return raw


def edm_loss(module_src: str = CANARY_SRC) -> FakePersistentObject:
    """A persistent ``EDMLoss(P_mean=-1.2, P_std=1.2, sigma_data=0.5)`` (NumPy / Python floats)."""
    return FakePersistentObject("EDMLoss", dict(P_mean=np.float64(-1.2), P_std=1.2, sigma_data=0.5),
                                module_src=module_src)


def augment_pipe(module_src: str = CANARY_SRC) -> FakePersistentObject:
    """A persistent ``AugmentPipe`` with EDM's ``--augment 0.12`` settings (EDM_FORMAT §4)."""
    kw = dict(p=0.12, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
    return FakePersistentObject("AugmentPipe", kw, attrs={**kw, "scale_std": 0.2, "rotate_max": 1.0},
                                module_src=module_src)


def random_edm_tensors(backbone_class: str, backbone_kwargs: Mapping[str, Any], seed: int = 0,
                       dtype: torch.dtype = torch.float32) -> "collections.OrderedDict[str, torch.Tensor]":
    """Random tensors (N(0, 0.1²); resample filters 0.25) with the names/shapes EDM's rules give."""
    g = torch.Generator().manual_seed(seed)
    out = collections.OrderedDict()
    for name, shape in edm_tensor_shapes(backbone_class, backbone_kwargs).items():
        if name.endswith("resample_filter"):
            out[name] = torch.full(shape, 0.25, dtype=dtype)
        else:
            out[name] = (torch.randn(shape, generator=g) * 0.1).to(dtype)
    return out


def precond_kwargs_for(backbone_class: str, backbone_kwargs: Mapping[str, Any]) -> Dict[str, Any]:
    """``EDMPrecond``'s kwargs as EDM's train.py passes them (EDM_FORMAT §1.3)."""
    kw = {k: v for k, v in backbone_kwargs.items() if k not in ("in_channels", "out_channels")}
    kw["img_channels"] = backbone_kwargs["in_channels"]
    kw["model_type"] = backbone_class
    kw["use_fp16"] = False
    return kw


def make_edm_pickle(file: Any, backbone_class: str, backbone_kwargs: Mapping[str, Any], *,
                    tensors: Optional[Mapping[str, torch.Tensor]] = None, seed: int = 0, protocol: int = 4,
                    module_src: str = CANARY_SRC, with_augment_pipe: bool = False, version: Any = 6,
                    precond_class: str = "EDMPrecond", precond_kwargs: Optional[Mapping[str, Any]] = None,
                    **write_kwargs: Any) -> "collections.OrderedDict[str, torch.Tensor]":
    """Write a complete EDM-format snapshot for ``backbone_class(**backbone_kwargs)`` and return its tensors."""
    if tensors is None:
        tensors = random_edm_tensors(backbone_class, backbone_kwargs, seed)
    pk = dict(precond_kwargs) if precond_kwargs is not None else precond_kwargs_for(backbone_class, backbone_kwargs)
    attrs = dict(img_resolution=backbone_kwargs["img_resolution"], img_channels=backbone_kwargs["in_channels"],
                 label_dim=backbone_kwargs.get("label_dim", 0), use_fp16=False, sigma_min=0, sigma_max=float("inf"),
                 sigma_data=np.float64(0.5))
    # EDM's kwargs carry NumPy float64 values (EDM_FORMAT §1.3): write the float ones that way.
    as_numpy = lambda kw: {k: np.float64(v) if type(v) is float else v for k, v in kw.items()}  # noqa: E731
    ema = edm_tree_from_tensors(tensors, precond_class, as_numpy(pk), backbone_class, as_numpy(backbone_kwargs),
                                precond_attrs=attrs, module_src=module_src, version=version)
    write_edm_pickle(file, ema, loss_fn=edm_loss(module_src),
                     augment_pipe=augment_pipe(module_src) if with_augment_pipe else None, protocol=protocol,
                     **write_kwargs)
    return collections.OrderedDict(tensors)


def pickle_from_precond(file: Any, precond: torch.nn.Module, backbone_class: str,
                        backbone_kwargs: Mapping[str, Any], **kwargs: Any) -> "collections.OrderedDict[str, torch.Tensor]":
    """EDM-format snapshot from a project ``EDMPrecond`` (its state dict via ``export_edm_tensors``)."""
    tensors = export_edm_tensors(precond.state_dict())
    return make_edm_pickle(file, backbone_class, backbone_kwargs, tensors=tensors, **kwargs)


__all__ = ["CANARY_ENV", "CANARY_MODULE", "CANARY_SRC", "FakePersistent", "FakePersistentObject", "augment_pipe",
           "canary_src", "edm_loss", "edm_tree_from_tensors", "fake_persistence_modules", "fake_reconstruct",
           "make_edm_pickle", "pickle_from_precond", "precond_kwargs_for", "random_edm_tensors", "write_edm_pickle"]
