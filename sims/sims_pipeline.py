"""SIMS (Alemohammad et al. 2024, arXiv 2408.16333, Algorithm 1) on top of a trained base model:
synthetic data → auxiliary fine-tune → guided evaluation over the ω grid."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch
from omegaconf import OmegaConf

from sims.diffusion import SIMSGuidance
from sims.training.export import WeightsError, load_denoiser

COMPAT_KEYS = ("network", "data_shape", "label_dim", "sigma_data")


def check_compatible(base_meta: dict, aux_meta: dict, aux_path: Path) -> None:
    """The auxiliary model must have the base's architecture, data shape, classes and σ_data.

    Raises:
        WeightsError: naming the first mismatching field.
    """
    for key in COMPAT_KEYS:
        if base_meta.get(key) != aux_meta.get(key):
            raise WeightsError(f"auxiliary model {aux_path} does not match the base model: {key} is "
                               f"{aux_meta.get(key)!r}, base has {base_meta.get(key)!r}")


def load_run_denoiser(run_dir: str | Path, omega: float = 0.0, *, sigma_interval: Optional[Sequence[float]] = None,
                      device="cpu") -> Tuple[object, dict, dict]:
    """The denoiser to sample a run with: the base EMA model (ω = 0) or SIMS guidance with the run's
    auxiliary model (ω > 0).

    Returns:
        (denoiser, the run's config as a dict, the base weights' metadata).
    Raises:
        WeightsError: not a run directory, no base weights, ω > 0 but no (or a mismatched) auxiliary model.
        ValueError: ω not finite or negative.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise WeightsError(f"{run_dir} is not a sims run directory (no config.yaml)")
    cfg = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=True)
    base, meta = load_denoiser(run_dir / "base" / "ema.safetensors", device)
    if omega == 0 and sigma_interval is None:
        SIMSGuidance(base, base, omega)  # validates omega
        return base, cfg, meta
    aux_path = run_dir / "aux" / "ema.safetensors"
    if not aux_path.is_file():
        SIMSGuidance(base, base, omega)  # a bad omega is reported before a missing model
        raise WeightsError(f"{run_dir} has no auxiliary model ({aux_path}): guidance omega={omega} needs one; "
                           "train it with sims-train CONFIG run_dir=... sims.enabled=true")
    aux, aux_meta = load_denoiser(aux_path, device)
    check_compatible(meta, aux_meta, aux_path)
    return SIMSGuidance(base, aux, omega, sigma_interval=sigma_interval), cfg, meta
