"""Inference weights: an EDM denoiser as safetensors + its architecture in the file's metadata.

No pickled code: a file loads with ``safetensors`` and the network config stored beside the
tensors, so sampling never needs to trust (unpickle) a checkpoint. Metadata (JSON strings):
``format`` (:data:`FORMAT`), ``network`` (a ``NetworkConfig`` dict), ``data_shape``, ``label_dim``,
``sigma_data``, ``kimg``, ``ema_halflife_kimg`` and whatever the caller adds (stage, source SHA-256…).

A stage folder holds the main EMA as ``ema.safetensors`` and every further EMA half-life as
``ema-<key>.safetensors`` (:func:`sims.training.module.ema_key`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sims.diffusion import EDMPrecond
from sims.errors import MissingFileError, WeightsError
from sims.utils import atomic_write

FORMAT = "sims-denoiser/2"


def save_denoiser(denoiser: EDMPrecond, path: str | Path, *, network: Dict[str, Any], data_shape, label_dim: int,
                  sigma_data: float, **extra: Any) -> Path:
    """Write ``denoiser``'s tensors and its description to ``path`` atomically.

    Args:
        denoiser: an :class:`EDMPrecond` (its state dict is saved, on CPU).
        network: the ``NetworkConfig`` dict that builds its backbone.
        data_shape: one sample's shape; label_dim: classes; sigma_data: σ_d.
        extra: further JSON-able metadata.
    Returns:
        ``path``.
    """
    meta = {"format": FORMAT, "network": dict(network), "data_shape": list(data_shape), "label_dim": int(label_dim),
            "sigma_data": float(sigma_data), **extra}
    encoded = {k: json.dumps(v) for k, v in meta.items()}
    state = {k: v.detach().cpu().contiguous() for k, v in denoiser.state_dict().items()}
    atomic_write(Path(path), lambda p: save_file(state, str(p), metadata=encoded))
    return Path(path)


def export_module(module, stage_dir: str | Path, **extra: Any) -> Path:
    """Write every EMA of an :class:`~sims.training.module.EDMModule` into ``stage_dir``
    (``ema.safetensors`` and ``ema-<key>.safetensors``). Returns the main file's path."""
    stage_dir = Path(stage_dir)
    common = dict(network=dict(module.hparams["network"]), data_shape=module.data_shape, label_dim=module.label_dim,
                  sigma_data=module.train_cfg["sigma_data"], kimg=module.cur_nimg / 1000.0)
    for key, ema in module.averages().items():
        name = "ema.safetensors" if key == "" else f"ema-{key}.safetensors"
        save_denoiser(ema.module, stage_dir / name, ema_halflife_kimg=ema.halflife_kimg, **common, **extra)
    return stage_dir / "ema.safetensors"


def read_metadata(path: str | Path) -> Dict[str, Any]:
    """The decoded metadata of an exported file (see :func:`save_denoiser`).

    Raises:
        MissingFileError: no file. WeightsError: not a safetensors file, or not a sims export of this format.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"no exported weights at {path}: train the model first (sims-train)")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except Exception as exc:
        raise WeightsError(f"cannot read {path} as safetensors: {exc}") from None
    out: Dict[str, Any] = {}
    for k, v in raw.items():
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    if out.get("format") != FORMAT:
        found = out.get("format", "no format tag (an older sims export)")
        raise WeightsError(f"{path} is not a {FORMAT} file ({found}); re-export it with this version of sims")
    return out


def load_denoiser(path: str | Path, device: str | torch.device = "cpu",
                  precision: str = "32-true") -> Tuple[EDMPrecond, Dict[str, Any]]:
    """Rebuild an exported denoiser, in eval mode, without gradients.

    Returns:
        (denoiser, metadata).
    Raises:
        MissingFileError / WeightsError: missing or corrupt file, or weights that do not fit the stored architecture.
    """
    from sims.training.denoiser import build_denoiser

    meta = read_metadata(path)
    for key in ("network", "data_shape", "label_dim"):
        if key not in meta:
            raise WeightsError(f"{path} lacks metadata key {key!r}: not a sims export")
    net = build_denoiser(meta["network"], meta["data_shape"], int(meta["label_dim"]),
                         float(meta.get("sigma_data", 0.5)), precision)
    try:
        net.load_state_dict(load_file(str(path)))
    except RuntimeError as exc:
        raise WeightsError(f"weights in {path} do not fit its network config: {str(exc).splitlines()[0]}") from None
    return net.eval().requires_grad_(False).to(device), meta


def weights_sha256(path: str | Path) -> str:
    """SHA-256 of an exported file's tensors (names, dtypes, shapes and bytes, in name order): the
    identity of the weights, independent of the metadata's byte layout (which safetensors does not
    keep stable across processes).

    Raises:
        MissingFileError / WeightsError: as :func:`read_metadata`.
    """
    import hashlib

    read_metadata(path)
    h = hashlib.sha256()
    with safe_open(str(path), framework="pt") as f:
        for name in sorted(f.keys()):
            t = f.get_tensor(name).contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def load_state(path: str | Path) -> Dict[str, torch.Tensor]:
    """The raw tensors of an exported file (CPU), e.g. to initialise the auxiliary model from the base."""
    read_metadata(path)
    return load_file(str(path))
