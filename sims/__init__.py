"""sims: EDM diffusion training with SIMS negative guidance and self-consuming generation loops.

``import sims`` is light (no torch or Lightning import); :func:`load_denoiser` imports what it needs.
"""
from __future__ import annotations

__version__ = "0.2.0"


def load_denoiser(path, *, omega: float = 0.0, device="cpu"):
    """A ready-to-call denoiser ``D(x, sigma, class_labels=None)`` from a run directory or an exported
    weights file (e.g. an EDM network imported with ``sims-import``), in eval mode, float32.

    Args:
        path: a ``sims-train`` / ``sims-import`` run directory, or an ``ema*.safetensors`` file.
        omega: SIMS guidance weight; ω > 0 uses the run's auxiliary model,
            D = (1+ω)·D_base − ω·D_aux (Alemohammad et al. 2024), with the EMAs and auxiliary
            snapshot the run's evaluation selected.
        device: where the networks live.
    Returns:
        ``D(x, sigma, class_labels=None) -> Tensor``: x [N, C, H, W] (or [N, d]) in data units,
        sigma a scalar or [N] (σ > 0, same units), class_labels one-hot [N, label_dim] or None
        (for a conditional network None means the zero label, as EDM); returns x's shape, float32.
        Attributes ``label_dim``, ``data_shape`` and ``meta`` (the weights' metadata).
    Raises:
        sims.errors.WeightsError / MissingFileError: no such run or weights; ω > 0 without an
            auxiliary model. sims.errors.InputError (on call): σ ≤ 0, labels given to an
            unconditional network, or labels of the wrong shape.
    """
    from sims._api import load_denoiser as _load

    return _load(path, omega=omega, device=device)


__all__ = ["__version__", "load_denoiser"]
