"""The public ``sims.load_denoiser`` (kept out of ``sims/__init__`` so that ``import sims`` stays light)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import torch

from sims.errors import InputError


class Denoiser:
    """A loaded denoiser with checked inputs: see :func:`sims.load_denoiser`."""

    def __init__(self, fn, meta: Dict[str, Any], device):
        self.fn, self.meta, self.device = fn, meta, torch.device(device)
        self.label_dim = int(meta["label_dim"])
        self.data_shape = tuple(meta["data_shape"])

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = torch.as_tensor(x, dtype=torch.float32, device=self.device)
        sig = torch.as_tensor(sigma, dtype=torch.float32, device=self.device)
        if sig.ndim > 1 or (sig.ndim == 1 and sig.shape[0] not in (1, x.shape[0])):
            raise InputError(f"sigma must be a scalar or shape [N]={x.shape[0]}, got {tuple(sig.shape)}")
        if not bool((sig > 0).all()):
            raise InputError("sigma must be > 0")
        if class_labels is not None:
            if self.label_dim == 0:
                raise InputError("class labels were given to an unconditional network (label_dim=0)")
            class_labels = torch.as_tensor(class_labels, dtype=torch.float32, device=self.device)
            if class_labels.shape != (x.shape[0], self.label_dim):
                raise InputError(f"class_labels must be one-hot [N, label_dim]=[{x.shape[0]}, {self.label_dim}], "
                                 f"got {tuple(class_labels.shape)}")
        return self.fn(x, sig.expand(x.shape[0]) if sig.ndim else sig, class_labels).float()


def load_denoiser(path, *, omega: float = 0.0, device="cpu") -> Denoiser:
    """See :func:`sims.load_denoiser`."""
    from sims.stages.rundir import load_run_denoiser
    from sims.training.export import load_denoiser as load_file

    path = Path(path)
    if path.is_file():
        if omega:
            raise InputError("omega > 0 needs a run directory (the base and its auxiliary model), not one file")
        fn, meta = load_file(path, device)
    else:
        fn, _, meta = load_run_denoiser(path, omega, device=device)
    return Denoiser(fn, meta, device)
