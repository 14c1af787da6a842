"""Inference weights: the EMA denoiser as safetensors + its architecture in the file's metadata.

No pickled code: a file loads with ``safetensors`` and the network config stored beside the
tensors, so sampling never needs to trust (unpickle) a checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sims.diffusion import EDMPrecond
from sims.utils import atomic_write


class WeightsError(ValueError):
    """Exported weights missing, unreadable, or not matching what the caller needs."""


def export_denoiser(module, path: str | Path, **extra: Any) -> Path:
    """Write ``module.ema.module`` (an :class:`EDMPrecond`) to ``path`` atomically.

    Metadata (JSON strings): ``network``, ``data_shape``, ``label_dim``, ``sigma_data``, ``kimg``
    and any ``extra`` keys.
    """
    meta = {
        "network": json.dumps(dict(module.hparams["network"])),
        "data_shape": json.dumps(list(module.data_shape)),
        "label_dim": str(module.label_dim),
        "sigma_data": str(module.train_cfg["sigma_data"]),
        "kimg": str(module.cur_nimg / 1000.0),
        **{k: json.dumps(v) for k, v in extra.items()},
    }
    state = {k: v.detach().cpu().contiguous() for k, v in module.ema.module.state_dict().items()}
    atomic_write(Path(path), lambda p: save_file(state, str(p), metadata=meta))
    return Path(path)


def read_metadata(path: str | Path) -> Dict[str, Any]:
    """The decoded metadata of an exported file (see :func:`export_denoiser`).

    Raises:
        WeightsError: file missing or not a safetensors file.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"no exported weights at {path}: train the model first (sims-train)")
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
    return out


def load_denoiser(path: str | Path, device: str | torch.device = "cpu",
                  precision: str = "32-true") -> Tuple[EDMPrecond, Dict[str, Any]]:
    """Rebuild the EMA denoiser from an exported file, in eval mode.

    Returns:
        (denoiser, metadata).
    Raises:
        WeightsError: missing/corrupt file or weights that do not fit the stored architecture.
    """
    from sims.training.module import build_denoiser

    meta = read_metadata(path)
    for key in ("network", "data_shape", "label_dim"):
        if key not in meta:
            raise WeightsError(f"{path} lacks metadata key {key!r}: not a sims export")
    net = build_denoiser(meta["network"], meta["data_shape"], int(meta["label_dim"]),
                         float(meta.get("sigma_data", 0.5)), precision)
    from safetensors.torch import load_file

    try:
        net.load_state_dict(load_file(str(path)))
    except RuntimeError as exc:
        raise WeightsError(f"weights in {path} do not fit its network config: {str(exc).splitlines()[0]}") from None
    return net.eval().requires_grad_(False).to(device), meta
