"""Running feature statistics (mean and covariance) for Fréchet distances, merged across ranks.

The Fréchet Inception Distance (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update
Rule Converge to a Local Nash Equilibrium", eq. 6 / SPEC section 4) needs only the mean μ and
the covariance Σ of the features of each set. :class:`FeatureStats` accumulates them in one pass
over batches as float64 sums (count N, Σ f, Σ f fᵀ), so any number of batches, chunks or ranks
give the same μ and the unbiased (N−1) covariance as one pass over all features at once.
KID and precision/recall need the features themselves; ``max_items`` keeps the first raw
features up to a cap.

Reference statistics are stored the way the EDM releases store them: an ``.npz`` with arrays
``mu`` [D] and ``sigma`` [D, D] (extra keys are allowed and ignored), so published EDM
reference files (e.g. ``cifar10-32x32.npz``) load with :func:`load_npz`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
import torch

from sims.errors import InputError, MissingFileError
from sims.utils import atomic_write

ArrayLike = Union[torch.Tensor, np.ndarray]

__all__ = [
    "FeatureStats",
    "save_npz",
    "load_npz",
    "check_feature_dim",
]


def _as_2d_float64(features: ArrayLike) -> torch.Tensor:
    """Features [N, D] (tensor or array, any float dtype, any device) → float64 CPU tensor [N, D]."""
    if isinstance(features, np.ndarray):
        features = torch.from_numpy(features)
    if not torch.is_tensor(features):
        raise TypeError(f"features must be a torch.Tensor or numpy array, got {type(features).__name__}")
    if features.ndim != 2:
        raise ValueError(f"features must have shape [N, D], got {tuple(features.shape)}")
    return features.detach().to(device="cpu", dtype=torch.float64)


class FeatureStats:
    """Accumulates the first two moments of features [N, D] in float64, optionally keeping raw features.

    Holds ``count`` (N), ``sum`` (Σ_i f_i, [D]) and ``outer`` (Σ_i f_i f_iᵀ, [D, D]) as float64 CPU
    tensors. :meth:`mean_cov` turns them into μ and the unbiased covariance
    Σ = (Σ f fᵀ − N μ μᵀ) / (N − 1) — the estimator used for FID (SPEC section 4).

    Args:
        dim: feature dimension D; None infers it from the first :meth:`update`.
        max_items: keep the first ``max_items`` raw features (float32, CPU) for KID and
            precision/recall; 0 keeps none. Moments always use every feature.

    Raises:
        ValueError: (from :meth:`update`) a batch whose D differs from the statistics' D, or a
            non-finite feature (a NaN would silently poison every later FID).
    """

    def __init__(self, dim: Optional[int] = None, max_items: int = 0) -> None:
        if dim is not None and dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        if max_items < 0:
            raise ValueError(f"max_items must be >= 0, got {max_items}")
        self.dim: Optional[int] = dim
        self.max_items = int(max_items)
        self.count = 0
        self.sum: Optional[torch.Tensor] = None
        self.outer: Optional[torch.Tensor] = None
        self._kept: list[torch.Tensor] = []
        self._num_kept = 0
        if dim is not None:
            self._allocate(dim)

    # ------------------------------------------------------------------ accumulation
    def _allocate(self, dim: int) -> None:
        self.dim = dim
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)

    def update(self, features: ArrayLike) -> "FeatureStats":
        """Add a batch of features.

        Args:
            features: [N, D] tensor or array (any float dtype/device); copied to CPU float64.
        Returns:
            ``self`` (for chaining).
        Raises:
            ValueError: wrong rank, D mismatch, or non-finite values.
        """
        f = _as_2d_float64(features)
        if self.dim is None:
            self._allocate(f.shape[1])
        if f.shape[1] != self.dim:
            raise ValueError(
                f"feature batch has D={f.shape[1]} features but these statistics have D={self.dim}"
            )
        if f.shape[0] == 0:
            return self
        if not torch.isfinite(f).all():
            raise ValueError("features contain NaN or Inf; refusing to accumulate them")
        self.count += f.shape[0]
        self.sum += f.sum(dim=0)
        self.outer += f.T @ f
        if self._num_kept < self.max_items:
            take = f[: self.max_items - self._num_kept].to(torch.float32)
            self._kept.append(take)
            self._num_kept += take.shape[0]
        return self

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        """Add another :class:`FeatureStats` (e.g. from another shard) into this one, in place.

        Raw features of ``other`` are appended after this one's, up to ``max_items``.

        Raises:
            ValueError: the two statistics have different D.
        """
        if other.dim is None or other.count == 0:
            return self
        if self.dim is None:
            self._allocate(other.dim)
        if other.dim != self.dim:
            raise ValueError(f"cannot merge statistics with D={other.dim} into statistics with D={self.dim}")
        self.count += other.count
        self.sum += other.sum
        self.outer += other.outer
        if self._num_kept < self.max_items and other._num_kept > 0:
            take = other.features()[: self.max_items - self._num_kept]
            self._kept.append(take)
            self._num_kept += take.shape[0]
        return self

    def all_reduce(self, ctx) -> "FeatureStats":
        """Sum the statistics of every rank of ``ctx`` (a :class:`sims.dist.DistContext`) into every
        rank, in place; a no-op in one process.

        Moments are summed in float64; kept raw features are gathered (padded to the largest
        rank's count), concatenated in rank order and cut to ``max_items``. Every rank must call
        this (it is a collective), also a rank that saw no features: the dimension comes from
        ``dim`` at construction or the first update, and is checked to agree across ranks.

        Returns:
            ``self``; afterwards every rank holds identical statistics.
        Raises:
            ValueError: a rank without a known dimension, or ranks that disagree on it.
        """
        if not ctx.distributed:
            return self
        d = -1 if self.dim is None else int(self.dim)
        dims = ctx.all_gather(torch.tensor([d], dtype=torch.int64))
        known = {int(t) for t in dims} - {-1}
        if len(known) != 1:
            raise ValueError(f"ranks disagree on (or do not know) the feature dimension: {sorted(known)}; "
                             "create FeatureStats(dim=extractor.feature_dim)")
        if self.dim is None:
            self._allocate(known.pop())
        self.count = int(round(float(ctx.all_reduce(torch.tensor([float(self.count)], dtype=torch.float64)))))
        self.sum = ctx.all_reduce(self.sum)
        self.outer = ctx.all_reduce(self.outer)
        if self.max_items > 0:
            local = self.features()
            sizes = [int(t) for t in ctx.all_gather(torch.tensor([local.shape[0]], dtype=torch.int64))]
            n_max = max(sizes)
            if n_max > 0:
                padded = torch.zeros(n_max, self.dim, dtype=torch.float32)
                padded[: local.shape[0]] = local
                gathered = ctx.all_gather(padded)
                kept = torch.cat([g[:n] for g, n in zip(gathered, sizes)])[: self.max_items]
                self._kept = [kept]
                self._num_kept = kept.shape[0]
        return self

    # ------------------------------------------------------------------ results
    def features(self) -> torch.Tensor:
        """The kept raw features, float32 CPU tensor [M, D] with M ≤ ``max_items`` (M = 0 if none kept)."""
        if not self._kept:
            return torch.zeros(0, self.dim or 0, dtype=torch.float32)
        if len(self._kept) > 1:
            self._kept = [torch.cat(self._kept)]
        return self._kept[0]

    def mean_cov(self) -> Tuple[np.ndarray, np.ndarray]:
        """Mean and unbiased covariance of every feature seen.

        Returns:
            (mu [D] float64, sigma [D, D] float64, symmetric), sigma = (Σ f fᵀ − N μ μᵀ)/(N − 1).
        Raises:
            ValueError: fewer than 2 features (the N−1 covariance is undefined).
        """
        if self.count < 2:
            raise ValueError(f"need at least 2 features for a covariance, have {self.count}")
        n = self.count
        mu = self.sum / n
        sigma = (self.outer - n * torch.outer(mu, mu)) / (n - 1)
        sigma = 0.5 * (sigma + sigma.T)
        return mu.numpy().copy(), sigma.numpy().copy()

    def save_npz(self, path: Union[str, Path]) -> None:
        """Write μ and Σ of these statistics with :func:`save_npz` (EDM's reference format)."""
        mu, sigma = self.mean_cov()
        save_npz(path, mu, sigma)

    def state_dict(self) -> Dict[str, Any]:
        """Plain-tensor state (count, sums, kept features) for checkpoints/resume."""
        return {
            "dim": self.dim,
            "max_items": self.max_items,
            "count": self.count,
            "sum": self.sum,
            "outer": self.outer,
            "kept": self.features() if self._num_kept else None,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`."""
        self.__init__(dim=state["dim"], max_items=state["max_items"])
        self.count = int(state["count"])
        if state["sum"] is not None:
            self.sum = state["sum"].to(torch.float64).clone()
            self.outer = state["outer"].to(torch.float64).clone()
        if state.get("kept") is not None:
            self._kept = [state["kept"].to(torch.float32).clone()]
            self._num_kept = self._kept[0].shape[0]

    def __repr__(self) -> str:
        return f"FeatureStats(dim={self.dim}, count={self.count}, kept={self._num_kept}/{self.max_items})"


# ---------------------------------------------------------------------- reference files
def check_feature_dim(mu: np.ndarray, feature_dim: int, source: str = "reference statistics") -> None:
    """Fail early when stored statistics were computed with a different feature extractor.

    Args:
        mu: stored mean [D_ref].
        feature_dim: D of the extractor about to be used.
        source: what ``mu`` came from, for the message (e.g. the .npz path).
    Raises:
        ValueError: ``D_ref != feature_dim``, naming both and the likely cause.
    """
    d_ref = int(np.asarray(mu).shape[0])
    if d_ref != int(feature_dim):
        raise InputError(
            f"{source} have D={d_ref} features but the extractor gives D={feature_dim}: they were "
            f"computed with a different feature extractor (D=2048 is Inception-v3 pool3); recompute "
            f"the reference with the same extractor or choose the matching one"
        )


def save_npz(path: Union[str, Path], mu: ArrayLike, sigma: ArrayLike, **extra: ArrayLike) -> None:
    """Atomically write reference statistics as ``.npz`` with keys ``mu`` [D] and ``sigma`` [D, D].

    This is the format of EDM's published reference statistics (SPEC section 4). Extra arrays
    (e.g. ``count``) may be added as keywords. The file is written exactly at ``path`` (numpy's
    automatic ``.npz`` suffix is not applied).

    Raises:
        ValueError: mu not 1-D, sigma not [D, D] matching mu.
    """
    mu_np = np.asarray(mu.detach().cpu() if torch.is_tensor(mu) else mu, dtype=np.float64)
    sigma_np = np.asarray(sigma.detach().cpu() if torch.is_tensor(sigma) else sigma, dtype=np.float64)
    _check_mu_sigma(mu_np, sigma_np, str(path))
    arrays = {k: np.asarray(v.detach().cpu() if torch.is_tensor(v) else v) for k, v in extra.items()}

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, mu=mu_np, sigma=sigma_np, **arrays)

    atomic_write(Path(path), write)


def load_npz(path: Union[str, Path]) -> Tuple[np.ndarray, np.ndarray]:
    """Load reference statistics from an ``.npz`` with keys ``mu`` and ``sigma`` (EDM's format).

    Extra keys are ignored. Loading uses ``allow_pickle=False`` (the file cannot run code).

    Returns:
        (mu [D] float64, sigma [D, D] float64).
    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not a readable .npz, a missing ``mu``/``sigma`` key (the message lists the keys
            found), or shapes that do not fit together, or non-finite values.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(
            f"reference statistics not found: {os.fspath(path)} (compute them from the real data with "
            f"FeatureStats.save_npz, or point to an EDM reference .npz with keys mu, sigma)"
        )
    try:
        data = np.load(path, allow_pickle=False)
        if not hasattr(data, "files"):  # np.load gives an NpzFile for archives, an ndarray for .npy
            raise InputError("a single .npy array, not an .npz archive")
    except Exception as exc:  # zipfile.BadZipFile, OSError, pickled content, ...
        raise InputError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})") from exc
    with data:
        keys = list(data.keys())
        missing = [k for k in ("mu", "sigma") if k not in keys]
        if missing:
            raise InputError(
                f"{path}: reference statistics need keys 'mu' and 'sigma' (EDM format), missing "
                f"{missing}; keys found: {keys}"
            )
        mu = np.asarray(data["mu"], dtype=np.float64)
        sigma = np.asarray(data["sigma"], dtype=np.float64)
    _check_mu_sigma(mu, sigma, str(path))
    return mu, sigma


def _check_mu_sigma(mu: np.ndarray, sigma: np.ndarray, source: str) -> None:
    if mu.ndim != 1:
        raise InputError(f"{source}: mu must be 1-D [D], got shape {mu.shape}")
    d = mu.shape[0]
    if sigma.shape != (d, d):
        raise InputError(f"{source}: sigma must be [D, D] = [{d}, {d}] to match mu, got shape {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise InputError(f"{source}: mu/sigma contain NaN or Inf")
