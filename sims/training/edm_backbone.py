"""EDM's backbone construction rules, for :mod:`sims.training.edm_import`: the constructor kwargs of
EDM's SongUNet (DDPM++ settings) and DhariwalUNet, completed and type-checked
(:func:`resolve_backbone_kwargs`, EDM_FORMAT §1.3, §2), and the names and shapes of the tensors
those kwargs imply (:func:`edm_tensor_shapes`, EDM_FORMAT §2.3, §2.5). No code from NVlabs/edm is
copied; the rules are those listed in /work/shared/EDM_FORMAT.md.
"""
from __future__ import annotations

import collections
import math
from typing import Any, Dict, List, Mapping, Tuple

from sims.errors import WeightsError

__all__ = ["ADM_CHANNELS_PER_HEAD", "DHARIWALUNET_DEFAULTS", "SONGUNET_DEFAULTS", "SOURCE_PREFIX", "edm_tensor_shapes",
           "resolve_backbone_kwargs"]

SOURCE_PREFIX = "model."

# Constructor defaults of EDM's SongUNet and DhariwalUNet (their keyword signatures); used only for
# keywords absent from a pickle, and checked against the tensors like every other value.
SONGUNET_DEFAULTS: Dict[str, Any] = dict(
    label_dim=0, augment_dim=0, model_channels=128, channel_mult=[1, 2, 2, 2], channel_mult_emb=4, num_blocks=4,
    attn_resolutions=[16], dropout=0.10, label_dropout=0, embedding_type="positional", channel_mult_noise=1,
    encoder_type="standard", decoder_type="standard", resample_filter=[1, 1])
DHARIWALUNET_DEFAULTS: Dict[str, Any] = dict(
    label_dim=0, augment_dim=0, model_channels=192, channel_mult=[1, 2, 3, 4], channel_mult_emb=4, num_blocks=3,
    attn_resolutions=[32, 16, 8], dropout=0.10, label_dropout=0)
_DEFAULTS = {"SongUNet": SONGUNET_DEFAULTS, "DhariwalUNet": DHARIWALUNET_DEFAULTS}
_REQUIRED = ("img_resolution", "in_channels", "out_channels")
ADM_CHANNELS_PER_HEAD = 64  # DhariwalUNet's blocks: heads = out_channels // 64 (EDM_FORMAT §2.5)


# --------------------------------------------------------------------------------------------------
# Configuration from constructor arguments
# --------------------------------------------------------------------------------------------------

def _as_int(value: Any, name: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or int(value) < minimum:
        raise WeightsError(f"EDM kwarg {name}={value!r} is not an integer >= {minimum}")
    return int(value)


def _as_int_list(value: Any, name: str, minimum: int = 1, nonempty: bool = True) -> List[int]:
    if not isinstance(value, (list, tuple)) or (nonempty and not value):
        raise WeightsError(f"EDM kwarg {name}={value!r} is not a {'non-empty ' if nonempty else ''}list of integers")
    return [_as_int(v, name, minimum) for v in value]


def _as_float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise WeightsError(f"EDM kwarg {name}={value!r} is not a finite number")
    return float(value)


def resolve_backbone_kwargs(backbone_class: str, kwargs: Mapping[str, Any]) -> Dict[str, Any]:
    """Complete and type-check the constructor kwargs of an EDM backbone (EDM_FORMAT §1.3, §2).

    Args:
        backbone_class: ``'SongUNet'`` or ``'DhariwalUNet'``.
        kwargs: ``ema.model._init_kwargs`` from the pickle.
    Returns:
        every constructor keyword with a value (absent ones from the class's defaults), ints as int,
        lists as lists of int, rates as float.
    Raises:
        WeightsError: unknown class, an unknown or missing keyword, a value of the wrong type, a
            resolution the levels do not divide, in/out channels that differ, or an NCSN++ setting
            (``embedding_type='fourier'``, ``encoder_type`` residual/skip, ``decoder_type='skip'``,
            ``resample_filter`` other than [1, 1], ``channel_mult_noise`` other than 1).
    """
    if backbone_class not in _DEFAULTS:
        raise WeightsError(f"unknown EDM backbone class {backbone_class!r} (supported: SongUNet with DDPM++ "
                           f"settings, DhariwalUNet)")
    defaults = _DEFAULTS[backbone_class]
    unknown = sorted(set(kwargs) - set(defaults) - set(_REQUIRED))
    if unknown:
        raise WeightsError(f"{backbone_class} kwargs {', '.join(f'{k}={kwargs[k]!r}' for k in unknown)} are not "
                           f"constructor arguments of EDM's {backbone_class}")
    missing = [k for k in _REQUIRED if k not in kwargs]
    if missing:
        raise WeightsError(f"{backbone_class} kwargs lack {', '.join(missing)}")
    full = {**defaults, **dict(kwargs)}
    if backbone_class == "SongUNet":
        if full["embedding_type"] != "positional":
            raise WeightsError(f"SongUNet with embedding_type={full['embedding_type']!r} (NCSN++, the -ve- models) is "
                               f"not supported; only DDPM++ (embedding_type='positional')")
        for key, ok in (("encoder_type", "standard"), ("decoder_type", "standard")):
            if full[key] != ok:
                raise WeightsError(f"SongUNet with {key}={full[key]!r} (NCSN++ style) is not supported; "
                                   f"only DDPM++ ({key}='{ok}')")
        if list(full["resample_filter"]) != [1, 1]:
            raise WeightsError(f"SongUNet with resample_filter={full['resample_filter']!r} (NCSN++ uses [1,3,3,1]) "
                               f"is not supported; only DDPM++ ([1, 1])")
        if _as_int(full["channel_mult_noise"], "channel_mult_noise", 1) != 1:
            raise WeightsError(f"SongUNet with channel_mult_noise={full['channel_mult_noise']!r} (NCSN++ uses 2) is "
                               f"not supported; only DDPM++ (1)")
        full["channel_mult_noise"] = 1
        full["resample_filter"] = [1, 1]
    for key in ("img_resolution", "in_channels", "out_channels", "model_channels", "channel_mult_emb"):
        full[key] = _as_int(full[key], key, 1)
    for key in ("label_dim", "augment_dim", "num_blocks"):
        full[key] = _as_int(full[key], key, 0)
    full["channel_mult"] = _as_int_list(full["channel_mult"], "channel_mult", 1)
    full["attn_resolutions"] = _as_int_list(full["attn_resolutions"], "attn_resolutions", 1, nonempty=False)
    full["dropout"] = _as_float(full["dropout"], "dropout")
    full["label_dropout"] = _as_float(full["label_dropout"], "label_dropout")
    if full["in_channels"] != full["out_channels"]:
        raise WeightsError(f"{backbone_class} with in_channels={full['in_channels']} != out_channels="
                           f"{full['out_channels']} (EDMPrecond needs equal; the iDDPM baseline has 2x outputs)")
    levels = len(full["channel_mult"])
    if full["img_resolution"] % (1 << (levels - 1)):
        raise WeightsError(f"{backbone_class} img_resolution={full['img_resolution']} is not divisible by "
                           f"2**{levels - 1} (channel_mult has {levels} levels)")
    return full


# --------------------------------------------------------------------------------------------------
# Expected tensors (EDM's construction rules, EDM_FORMAT §2.3 / §2.5)
# --------------------------------------------------------------------------------------------------

def _block(out: Dict[str, Tuple[int, ...]], name: str, cin: int, cout: int, emb: int, *, up: bool = False,
           down: bool = False, attention: bool = False, adaptive: bool, resample_proj: bool, heads: int) -> None:
    p = f"{name}."
    out[p + "norm0.weight"] = (cin,)
    out[p + "norm0.bias"] = (cin,)
    out[p + "conv0.weight"] = (cout, cin, 3, 3)
    out[p + "conv0.bias"] = (cout,)
    if up or down:
        out[p + "conv0.resample_filter"] = (1, 1, 2, 2)
    out[p + "affine.weight"] = (cout * (2 if adaptive else 1), emb)
    out[p + "affine.bias"] = (cout * (2 if adaptive else 1),)
    out[p + "norm1.weight"] = (cout,)
    out[p + "norm1.bias"] = (cout,)
    out[p + "conv1.weight"] = (cout, cout, 3, 3)
    out[p + "conv1.bias"] = (cout,)
    if cout != cin or up or down:
        kernel = 1 if (resample_proj or cout != cin) else 0
        if kernel:
            out[p + "skip.weight"] = (cout, cin, kernel, kernel)
            out[p + "skip.bias"] = (cout,)
        if up or down:
            out[p + "skip.resample_filter"] = (1, 1, 2, 2)
    if attention and heads > 0:
        out[p + "norm2.weight"] = (cout,)
        out[p + "norm2.bias"] = (cout,)
        out[p + "qkv.weight"] = (3 * cout, cout, 1, 1)
        out[p + "qkv.bias"] = (3 * cout,)
        out[p + "proj.weight"] = (cout, cout, 1, 1)
        out[p + "proj.bias"] = (cout,)


def edm_tensor_shapes(backbone_class: str, kwargs: Mapping[str, Any],
                      prefix: str = SOURCE_PREFIX) -> "collections.OrderedDict[str, Tuple[int, ...]]":
    """Names and shapes of every tensor EDM's backbone has for these constructor kwargs, in
    ``state_dict()`` order (EDM_FORMAT §2.3 SongUNet DDPM++, §2.5 DhariwalUNet; Appendix A).

    Args:
        backbone_class: ``'SongUNet'`` or ``'DhariwalUNet'``.
        kwargs: constructor kwargs (completed by :func:`resolve_backbone_kwargs`).
        prefix: prepended to each name (``'model.'``: the names inside ``ema``).
    Returns:
        OrderedDict name → shape tuple, e.g. ``model.enc.32x32_block0.qkv.weight`` → (3C, C, 1, 1);
        ``…resample_filter`` buffers → (1, 1, 2, 2).
    Raises:
        WeightsError: as :func:`resolve_backbone_kwargs`.
    """
    k = resolve_backbone_kwargs(backbone_class, kwargs)
    song = backbone_class == "SongUNet"
    mc, mult, nb = k["model_channels"], k["channel_mult"], k["num_blocks"]
    res0, cin_img, cout_img = k["img_resolution"], k["in_channels"], k["out_channels"]
    emb = mc * k["channel_mult_emb"]
    attn = set(k["attn_resolutions"])
    out: "collections.OrderedDict[str, Tuple[int, ...]]" = collections.OrderedDict()

    def mapping(width: int) -> None:  # map_augment (optional), map_layer0, map_layer1: the nets' shared part
        if k["augment_dim"]:
            out["map_augment.weight"] = (width, k["augment_dim"])
        out["map_layer0.weight"] = (emb, width)
        out["map_layer0.bias"] = (emb,)
        out["map_layer1.weight"] = (emb, emb)
        out["map_layer1.bias"] = (emb,)

    if song:  # EDM's registration order: map_label, map_augment, map_layer0, map_layer1
        noise = mc * k["channel_mult_noise"]
        if k["label_dim"]:
            out["map_label.weight"] = (noise, k["label_dim"])
            out["map_label.bias"] = (noise,)
        mapping(noise)
        blk = dict(adaptive=False, resample_proj=True)
    else:  # map_augment, map_layer0, map_layer1, map_label
        mapping(mc)
        if k["label_dim"]:
            out["map_label.weight"] = (emb, k["label_dim"])
        blk = dict(adaptive=True, resample_proj=False)

    def heads(c: int) -> int:
        return 1 if song else c // ADM_CHANNELS_PER_HEAD

    skips: List[int] = []
    cout = cin_img
    for level, m in enumerate(mult):
        res = res0 >> level
        if level == 0:
            cin, cout = cout, (mc if song else mc * m)
            out[f"enc.{res}x{res}_conv.weight"] = (cout, cin, 3, 3)
            out[f"enc.{res}x{res}_conv.bias"] = (cout,)
        else:
            _block(out, f"enc.{res}x{res}_down", cout, cout, emb, down=True, heads=heads(cout), **blk)
        skips.append(cout)
        for idx in range(nb):
            cin, cout = cout, mc * m
            _block(out, f"enc.{res}x{res}_block{idx}", cin, cout, emb, attention=res in attn, heads=heads(cout), **blk)
            skips.append(cout)
    for level, m in reversed(list(enumerate(mult))):
        res = res0 >> level
        if level == len(mult) - 1:
            _block(out, f"dec.{res}x{res}_in0", cout, cout, emb, attention=True, heads=heads(cout), **blk)
            _block(out, f"dec.{res}x{res}_in1", cout, cout, emb, heads=heads(cout), **blk)
        else:
            _block(out, f"dec.{res}x{res}_up", cout, cout, emb, up=True, heads=heads(cout), **blk)
        for idx in range(nb + 1):
            cin, cout = cout + skips.pop(), mc * m
            attention = (idx == nb and res in attn) if song else (res in attn)
            _block(out, f"dec.{res}x{res}_block{idx}", cin, cout, emb, attention=attention, heads=heads(cout), **blk)
        if song and level == 0:
            out[f"dec.{res}x{res}_aux_norm.weight"] = (cout,)
            out[f"dec.{res}x{res}_aux_norm.bias"] = (cout,)
            out[f"dec.{res}x{res}_aux_conv.weight"] = (cout_img, cout, 3, 3)
            out[f"dec.{res}x{res}_aux_conv.bias"] = (cout_img,)
    if not song:
        out["out_norm.weight"] = (cout,)
        out["out_norm.bias"] = (cout,)
        out["out_conv.weight"] = (cout_img, cout, 3, 3)
        out["out_conv.bias"] = (cout_img,)
    return collections.OrderedDict((prefix + name, shape) for name, shape in out.items())
