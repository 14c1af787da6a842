"""Convert an EDM network snapshot (read safely by :mod:`sims.training.edm_pickle`) into the
project's :class:`sims.diffusion.EDMPrecond` around a ``ddpmpp`` (EDM's SongUNet, DDPM++ settings)
or ``adm`` (EDM's DhariwalUNet) backbone.

The configuration is taken from the pickle's own constructor arguments (``ema.model._init_kwargs``,
EDM_FORMAT §1.3), completed with the constructor defaults where a keyword is absent, and every value
is checked against the tensor shapes: the converter enumerates the names and shapes EDM's
construction rules give for those arguments (EDM_FORMAT §2.3, §2.5) and requires the pickle to hold
exactly those. The project networks use EDM's module names, so the name map is ``model.X`` →
``backbone.X``; the ``resample_filter`` buffers (2×2 of 0.25 for ``resample_filter=[1,1]``) are
checked and dropped, floating tensors are cast to float32, and the result is loaded into the built
project network with ``load_state_dict(strict=True)`` (EDM_FORMAT §8).

Refused with a one-line :class:`sims.errors.WeightsError`: NCSN++ (Fourier embedding,
residual/skip encoder or skip decoder, another resample filter, channel_mult_noise ≠ 1), EDM2
(``Precond`` with ``unet``), the baseline preconditioners (VP/VE/iDDPM), unknown classes, unknown
constructor keywords, and any tensor the arguments do not explain.

Weights converted from NVIDIA's files stay © NVIDIA, CC BY-NC-SA 4.0; the project does not ship them.
"""
from __future__ import annotations

import collections
import math
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from sims.errors import WeightsError
from sims.training.edm_backbone import (ADM_CHANNELS_PER_HEAD, SOURCE_PREFIX, _as_float, edm_tensor_shapes,
                                        resolve_backbone_kwargs)
from sims.training.edm_pickle import EDMSnapshot

__all__ = ["ImportedNetwork", "LICENCE_NOTE", "convert_edm_network", "edm_tensor_shapes", "export_edm_tensors",
           "import_edm_tensors", "resolve_backbone_kwargs"]

LICENCE_NOTE = "weights © NVIDIA, CC BY-NC-SA 4.0"
TARGET_PREFIX = "backbone."

_ARCH = {"SongUNet": "ddpmpp", "DhariwalUNet": "adm"}

_PRECONDS_REFUSED = {
    "VPPrecond": "VP baseline preconditioner (baseline-*-vp.pkl)",
    "VEPrecond": "VE baseline preconditioner (baseline-*-ve.pkl)",
    "iDDPMPrecond": "iDDPM baseline preconditioner (baseline-imagenet-64x64-cond-adm.pkl)",
}
_RESAMPLE_BLOCK = re.compile(r"^(enc|dec)\.\d+x\d+_(down|up)$")


def _fmt(kwargs: Mapping[str, Any], keys: Sequence[str]) -> str:
    return ", ".join(f"{k}={kwargs[k]!r}" for k in keys if k in kwargs)


# --------------------------------------------------------------------------------------------------
# Name / layout map
# --------------------------------------------------------------------------------------------------

def _is_resample_filter(name: str) -> bool:
    return name.endswith(".resample_filter")


def import_edm_tensors(tensors: Mapping[str, torch.Tensor]) -> "collections.OrderedDict[str, torch.Tensor]":
    """EDM ``ema`` tensors → the project ``EDMPrecond`` state dict (EDM_FORMAT §8).

    ``model.X`` → ``backbone.X`` (same order, same layouts: the project networks use EDM's module
    names and qkv layout); ``…resample_filter`` buffers are checked to be [1, 1, 2, 2] of 0.25 and
    dropped; floating tensors are cast to float32 (fp16 snapshots).

    Args:
        tensors: name → tensor, e.g. ``flatten(ema)`` / ``EDMSnapshot.tensors``.
    Returns:
        OrderedDict ``backbone.…`` → float32 tensor.
    Raises:
        WeightsError: a name outside ``model.``, a non-floating tensor, or a resample filter that is
            not 2×2 of 0.25 (i.e. not ``resample_filter=[1,1]``).
    """
    out: "collections.OrderedDict[str, torch.Tensor]" = collections.OrderedDict()
    for name, tensor in tensors.items():
        if not name.startswith(SOURCE_PREFIX):
            raise WeightsError(f"EDM tensor {name!r} is not under 'model.' (the preconditioners hold no tensors)")
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise WeightsError(f"EDM tensor {name} has dtype {getattr(tensor, 'dtype', type(tensor).__name__)}, "
                               f"expected a floating tensor")
        if _is_resample_filter(name):
            if tuple(tensor.shape) != (1, 1, 2, 2) or not bool((tensor.to(torch.float32) == 0.25).all()):
                raise WeightsError(f"EDM buffer {name} is {list(tensor.shape)} "
                                   f"{tensor.flatten()[:4].tolist()}, expected [1, 1, 2, 2] of 0.25 "
                                   f"(resample_filter=[1,1])")
            continue
        out[TARGET_PREFIX + name[len(SOURCE_PREFIX):]] = tensor.to(torch.float32)
    return out


def export_edm_tensors(state_dict: Mapping[str, torch.Tensor]) -> "collections.OrderedDict[str, torch.Tensor]":
    """Inverse of :func:`import_edm_tensors`: project ``EDMPrecond`` state dict → EDM ``ema`` tensors.

    ``backbone.X`` → ``model.X``; a ``resample_filter`` buffer (float32 [1, 1, 2, 2] of 0.25) is
    inserted in ``conv0`` and ``skip`` of every ``enc.RxR_down`` / ``dec.RxR_up`` block, where EDM's
    ``state_dict()`` has it (after ``conv0.bias``; after ``skip.bias``, or after ``conv1`` when the
    skip is parameter-free). Used by the test writer; not for redistributing NVIDIA weights.

    Args:
        state_dict: ``backbone.…`` → tensor (e.g. ``ImportedNetwork.state_dict``).
    Returns:
        OrderedDict ``model.…`` → tensor (the given tensors, not copies).
    Raises:
        WeightsError: a name outside ``backbone.``.
    """
    items = []
    for name, tensor in state_dict.items():
        if not name.startswith(TARGET_PREFIX):
            raise WeightsError(f"project tensor {name!r} is not under 'backbone.'")
        items.append((name[len(TARGET_PREFIX):], tensor))
    # Where to insert: for each resample block, after the last conv0 tensor and after the last
    # conv1/skip tensor.
    last: Dict[Tuple[str, str], int] = {}
    for i, (name, _) in enumerate(items):
        parts = name.split(".")
        if len(parts) >= 4 and _RESAMPLE_BLOCK.match(".".join(parts[:2])):
            block, child = ".".join(parts[:2]), parts[2]
            if child == "conv0":
                last[(block, "conv0")] = i
            elif child in ("conv1", "skip"):
                last[(block, "skip")] = i
    inserts: Dict[int, List[str]] = collections.defaultdict(list)
    for (block, which), i in last.items():
        inserts[i].append(f"{block}.{which}.resample_filter")
    out: "collections.OrderedDict[str, torch.Tensor]" = collections.OrderedDict()
    for i, (name, tensor) in enumerate(items):
        out[SOURCE_PREFIX + name] = tensor
        for buf in sorted(inserts.get(i, ())):
            out[SOURCE_PREFIX + buf] = torch.full((1, 1, 2, 2), 0.25, dtype=torch.float32)
    return out


# --------------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------------

@dataclass
class ImportedNetwork:
    """An EDM network converted to the project's format (result of :func:`convert_edm_network`).

    Attributes:
        network: fields of :class:`sims.config.NetworkConfig` (``arch`` 'ddpmpp'/'adm',
            ``model_channels``, ``channel_mult``, ``channel_mult_emb``, ``num_blocks``,
            ``attn_resolutions``, ``dropout``, ``adaptive_scale`` False, ``augment_dim``,
            ``label_dropout``, ``channels_per_head``).
        data_shape: [C, H, W] of the images (H = W = img_resolution).
        label_dim: number of classes (0: unconditional).
        sigma_data: σ_d of the preconditioner (0.5 for EDM's files).
        state_dict: ``backbone.…`` → float32 tensor, strictly loadable into
            ``EDMPrecond(build_backbone(NetworkConfig(**network), H, C, label_dim), sigma_data, label_dim)``.
        info: JSON-able provenance: class names and kwargs, loss_fn, augment_pipe, dataset_kwargs,
            sha256, tensor/parameter counts, ``licence`` ("weights © NVIDIA, CC BY-NC-SA 4.0").
        module: that project ``EDMPrecond`` with the weights loaded (eval mode), or None when
            ``convert_edm_network(..., build=False)``.
    """

    network: Dict[str, Any]
    data_shape: List[int]
    label_dim: int
    sigma_data: float
    state_dict: "collections.OrderedDict[str, torch.Tensor]"
    info: Dict[str, Any]
    module: Optional[torch.nn.Module] = None

    def build(self) -> torch.nn.Module:
        """A fresh project ``EDMPrecond`` with these weights (``load_state_dict(strict=True)``), eval mode.

        Raises:
            WeightsError: the project network's tensors differ from ``state_dict`` (names or shapes).
        """
        return _build_and_load(self.network, self.data_shape, self.label_dim, self.sigma_data, self.state_dict)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return repr(value)


def _check_tensors(tensors: Mapping[str, torch.Tensor], expected: Mapping[str, Tuple[int, ...]],
                   backbone_class: str, kwargs: Mapping[str, Any]) -> None:
    shown = ("img_resolution", "in_channels", "label_dim", "augment_dim", "model_channels", "channel_mult",
             "channel_mult_emb", "num_blocks", "attn_resolutions")
    where = f"{backbone_class}({_fmt(kwargs, shown)})"
    missing = [n for n in expected if n not in tensors]
    extra = [n for n in tensors if n not in expected]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise WeightsError(f"the pickle lacks tensor {missing[0]} that {where} has{more}")
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise WeightsError(f"tensor {extra[0]} in the pickle is not part of {where}{more}")
    bad_shape = [(n, list(tensors[n].shape), list(s)) for n, s in expected.items()
                 if tuple(tensors[n].shape) != tuple(s)]
    if bad_shape:
        n, got, want = bad_shape[0]
        more = f" (and {len(bad_shape) - 1} more)" if len(bad_shape) > 1 else ""
        raise WeightsError(f"tensor {n} has shape {got} but the constructor kwargs {where} imply {want}{more}")


def _build_and_load(network: Mapping[str, Any], data_shape: Sequence[int], label_dim: int, sigma_data: float,
                    state_dict: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    from sims.config import NetworkConfig
    from sims.diffusion import EDMPrecond
    from sims.networks import build_backbone

    backbone = build_backbone(NetworkConfig(**network), int(data_shape[1]), int(data_shape[0]), int(label_dim))
    module = EDMPrecond(backbone, sigma_data=float(sigma_data), label_dim=int(label_dim))
    target = module.state_dict()
    missing = [n for n in target if n not in state_dict]
    extra = [n for n in state_dict if n not in target]
    shape = [n for n in target if n in state_dict and tuple(target[n].shape) != tuple(state_dict[n].shape)]
    if missing or extra or shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} project tensors unfilled (first {missing[0]})")
        if extra:
            parts.append(f"{len(extra)} EDM tensors unused (first {extra[0]})")
        if shape:
            parts.append(f"{len(shape)} shape mismatches (first {shape[0]}: project "
                         f"{list(target[shape[0]].shape)}, EDM {list(state_dict[shape[0]].shape)})")
        raise WeightsError(f"EDM → project {network.get('arch')} mapping is not exact: " + "; ".join(parts))
    module.load_state_dict(state_dict, strict=True)
    return module.eval().requires_grad_(False)


def convert_edm_network(snapshot: EDMSnapshot, *, build: bool = True) -> ImportedNetwork:
    """Convert a safely loaded EDM snapshot into the project's network (EDM_FORMAT §1.3, §2, §8).

    The configuration comes from ``ema.model``'s constructor kwargs (SongUNet with DDPM++ settings →
    ``arch='ddpmpp'``, DhariwalUNet → ``arch='adm'``), completed with EDM's defaults, and must agree
    with the preconditioner's kwargs (``img_resolution``, ``img_channels``, ``label_dim``,
    ``model_type``) and with every tensor's shape; the mapping must use every source tensor and fill
    every target tensor (``load_state_dict(strict=True)``).

    Args:
        snapshot: from :func:`sims.training.edm_pickle.load_edm_pickle`.
        build: build the project ``EDMPrecond`` and strictly load the weights (the result's
            ``module``); False only converts and checks against EDM's construction rules.
    Returns:
        :class:`ImportedNetwork` (``state_dict`` values float32; ``data_shape`` [C, H, W]).
    Raises:
        WeightsError: EDM2 (``Precond`` with ``unet``), VP/VE/iDDPM preconditioners, an unknown class,
            NCSN++ settings, unknown kwargs, kwargs contradicting each other or the tensor shapes,
            or a mapping that is not exact.
    """
    precond = snapshot.precond
    child_names = list(snapshot.tree.children)
    if "unet" in child_names or precond == "Precond":
        raise WeightsError(f"EDM2 network ({precond} with child {'unet' if 'unet' in child_names else child_names}) "
                           f"is not supported; only EDM1 EDMPrecond pickles")
    if precond in _PRECONDS_REFUSED:
        raise WeightsError(f"{precond}: the {_PRECONDS_REFUSED[precond]} is not supported; only EDMPrecond "
                           f"(the edm-*.pkl files)")
    if precond != "EDMPrecond":
        raise WeightsError(f"unknown EDM preconditioner class {precond!r} (supported: EDMPrecond)")
    if snapshot.backbone is None:
        raise WeightsError(f"EDMPrecond without a 'model' child (children: {child_names})")
    backbone_class = snapshot.backbone
    if backbone_class not in _ARCH:
        raise WeightsError(f"unknown EDM backbone class {backbone_class!r} in EDMPrecond.model "
                           f"(supported: SongUNet with DDPM++ settings, DhariwalUNet)")
    pk = dict(snapshot.precond_kwargs)
    kwargs = resolve_backbone_kwargs(backbone_class, snapshot.backbone_kwargs or {})
    # The preconditioner's own kwargs must describe the same network.
    for pkey, bkey in (("img_resolution", "img_resolution"), ("img_channels", "in_channels"),
                       ("label_dim", "label_dim")):
        if pkey in pk and pk[pkey] != kwargs[bkey]:
            raise WeightsError(f"EDMPrecond {pkey}={pk[pkey]!r} contradicts {backbone_class} {bkey}={kwargs[bkey]!r}")
    if "model_type" in pk and pk["model_type"] != backbone_class:
        raise WeightsError(f"EDMPrecond model_type={pk['model_type']!r} but its model is a {backbone_class}")
    for key, value in pk.items():
        if key in kwargs and key not in ("img_resolution", "label_dim") and value != kwargs[key]:
            raise WeightsError(f"EDMPrecond {key}={value!r} contradicts {backbone_class} {key}={kwargs[key]!r}")
    sigma_data = pk.get("sigma_data", snapshot.precond_attrs.get("sigma_data", 0.5))
    sigma_data = _as_float(sigma_data, "sigma_data")
    if sigma_data <= 0:
        raise WeightsError(f"EDMPrecond sigma_data={sigma_data} is not positive")

    expected = edm_tensor_shapes(backbone_class, kwargs)
    _check_tensors(snapshot.tensors, expected, backbone_class, kwargs)
    state_dict = import_edm_tensors(snapshot.tensors)

    res = kwargs["img_resolution"]
    present = {res >> level for level in range(len(kwargs["channel_mult"]))}
    network = dict(
        arch=_ARCH[backbone_class], model_channels=kwargs["model_channels"], channel_mult=list(kwargs["channel_mult"]),
        channel_mult_emb=kwargs["channel_mult_emb"], num_blocks=kwargs["num_blocks"],
        # resolutions the U-Net does not have change nothing in EDM; the project refuses them
        attn_resolutions=[r for r in kwargs["attn_resolutions"] if r in present],
        dropout=kwargs["dropout"], adaptive_scale=False, augment_dim=kwargs["augment_dim"],
        label_dropout=kwargs["label_dropout"], channels_per_head=ADM_CHANNELS_PER_HEAD)
    data_shape = [kwargs["in_channels"], res, res]
    info = _jsonable(dict(
        source="NVlabs/edm network pickle", licence=LICENCE_NOTE, sha256=snapshot.sha256,
        precond_class=precond, precond_kwargs=pk, precond_attrs=snapshot.precond_attrs,
        backbone_class=backbone_class, backbone_kwargs=snapshot.backbone_kwargs,
        resolved_backbone_kwargs=kwargs,
        loss_fn=None if snapshot.loss_fn is None else dict(class_name=snapshot.loss_fn, kwargs=snapshot.loss_kwargs),
        augment_pipe=None if snapshot.augment_pipe is None else dict(class_name=snapshot.augment_pipe,
                                                                      kwargs=snapshot.augment_kwargs),
        dataset_kwargs=snapshot.dataset_kwargs, source_tensors=len(snapshot.tensors),
        dropped_buffers=sum(1 for n in snapshot.tensors if _is_resample_filter(n)),
        parameters=sum(int(t.numel()) for t in state_dict.values()),
        source_dtypes=sorted({str(t.dtype) for t in snapshot.tensors.values()})))
    imported = ImportedNetwork(network=network, data_shape=data_shape, label_dim=kwargs["label_dim"],
                               sigma_data=sigma_data, state_dict=state_dict, info=info)
    if build:
        imported.module = imported.build()
    return imported
