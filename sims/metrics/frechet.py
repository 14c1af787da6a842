"""Distances between feature distributions: Fréchet distance (FID), KID, improved precision/recall.

All functions take features as [N, D] (rows are samples, D the feature dimension; torch tensors
or numpy arrays) or, for the Fréchet distance, the moments (μ [D], Σ [D, D]) computed by
:class:`sims.metrics.stats.FeatureStats`. Units are those of the features.

Sources:
- FID: Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local
  Nash Equilibrium", eq. 6 (the Fréchet/2-Wasserstein distance between Gaussians, Dowson &
  Landau 1982); SPEC section 4.
- KID: Bińkowski et al. 2018, "Demystifying MMD GANs", section 4 / eq. 3 (unbiased MMD²) with the
  cubic polynomial kernel k(x, y) = (xᵀy/d + 1)³.
- Precision/recall: Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric for
  Assessing Generative Models", eqs. 1–3 (k-NN hyperspheres, k = 3 in the paper; SPEC section 4
  uses k = 5 as MAD did).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import numpy as np
import scipy.linalg
import torch

ArrayLike = Union[torch.Tensor, np.ndarray]

__all__ = ["frechet_distance", "kernel_inception_distance", "precision_recall", "KNNManifold"]


def _np64(x: ArrayLike) -> np.ndarray:
    if torch.is_tensor(x):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _symmetric_sqrt(a: np.ndarray) -> np.ndarray:
    """Principal square root of a symmetric PSD matrix [D, D] via eigh (negative round-off eigenvalues → 0)."""
    w, v = scipy.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """Fréchet distance between N(μ1, Σ1) and N(μ2, Σ2): the FID when the moments are Inception features.

        FD = ‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^{1/2})       (Heusel et al. 2017, eq. 6)

    tr((Σ1Σ2)^{1/2}) is computed without a non-symmetric matrix square root: Σ1Σ2 is similar to
    the symmetric PSD matrix M = Σ1^{1/2} Σ2 Σ1^{1/2}, so tr((Σ1Σ2)^{1/2}) = Σ_i √λ_i(M). Both
    square roots use symmetric eigendecompositions in float64, so the result is real and stable
    for singular covariances (N < D) where ``scipy.linalg.sqrtm`` returns complex noise. Eigenvalues
    that are negative by round-off are set to 0, and a final value that is negative by round-off
    (|FD| tiny, e.g. a set against itself) is returned as 0.0.

    Args:
        mu1, mu2: means [D] (numpy or torch; converted to float64).
        sigma1, sigma2: covariances [D, D] (symmetric PSD, e.g. the N−1 estimate).
    Returns:
        The distance as a Python float, in squared feature units.
    Raises:
        ValueError: shapes that do not fit ([D] and [D, D]), the two statistics having different D
            (computed with different feature extractors), or non-finite inputs.
    """
    mu1, mu2, s1, s2 = (_np64(a) for a in (mu1, mu2, sigma1, sigma2))
    for name, mu, s in (("first", mu1, s1), ("second", mu2, s2)):
        if mu.ndim != 1 or s.shape != (mu.shape[0], mu.shape[0]):
            raise ValueError(
                f"{name} statistics: need mu [D] and sigma [D, D], got {mu.shape} and {s.shape}"
            )
        if not (np.isfinite(mu).all() and np.isfinite(s).all()):
            raise ValueError(f"{name} statistics contain NaN or Inf")
    if mu1.shape != mu2.shape:
        raise ValueError(
            f"the two statistics have different feature dimensions: D={mu1.shape[0]} vs D={mu2.shape[0]} "
            f"(computed with different feature extractors?)"
        )
    s1 = 0.5 * (s1 + s1.T)
    s2 = 0.5 * (s2 + s2.T)
    diff = mu1 - mu2
    sq1 = _symmetric_sqrt(s1)
    m = sq1 @ s2 @ sq1
    eig = scipy.linalg.eigvalsh(0.5 * (m + m.T))
    tr_covmean = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    fd = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    return max(fd, 0.0)


def _check_pair(a: ArrayLike, b: ArrayLike, names: Tuple[str, str]) -> Tuple[np.ndarray, np.ndarray]:
    a, b = _np64(a), _np64(b)
    for name, x in zip(names, (a, b)):
        if x.ndim != 2 or x.shape[0] == 0:
            raise ValueError(f"{name} must have shape [N, D] with N > 0, got {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError(f"{name} contain NaN or Inf")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{names[0]} have D={a.shape[1]} but {names[1]} have D={b.shape[1]}")
    return a, b


def kernel_inception_distance(
    feats1: ArrayLike,
    feats2: ArrayLike,
    num_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> Tuple[float, float]:
    """Kernel Inception Distance: unbiased MMD² with the cubic polynomial kernel, over random subsets.

    k(x, y) = (xᵀy / d + 1)³ (d = feature dimension). For each of ``num_subsets`` subsets of
    m = min(subset_size, N1, N2) rows drawn without replacement from each set,

        MMD²_u = Σ_{i≠j} k(x_i, x_j)/(m(m−1)) + Σ_{i≠j} k(y_i, y_j)/(m(m−1)) − 2 Σ_{i,j} k(x_i, y_j)/m²

    (Bińkowski et al. 2018, eq. 3 with section 4's kernel); the estimate is unbiased, so it can be
    slightly negative when the two sets come from the same distribution.

    Args:
        feats1: features [N1, D]; feats2: features [N2, D].
        num_subsets: number of random subsets (100 in the paper / torch-fidelity).
        subset_size: rows per subset (1000 in the paper); reduced to min(N1, N2) if larger.
        seed: seed of the subset draws (numpy Generator), so results are reproducible.
    Returns:
        (mean, std) of MMD² over the subsets (std with ddof=0), in squared kernel units.
    Raises:
        ValueError: wrong shapes, different D, fewer than 2 rows, non-finite features.
    """
    x, y = _check_pair(feats1, feats2, ("feats1", "feats2"))
    if num_subsets < 1:
        raise ValueError(f"num_subsets must be >= 1, got {num_subsets}")
    m = min(int(subset_size), x.shape[0], y.shape[0])
    if m < 2:
        raise ValueError(f"KID needs at least 2 rows per set, got N1={x.shape[0]}, N2={y.shape[0]}")
    d = x.shape[1]
    rng = np.random.default_rng(seed)
    values = np.empty(num_subsets, dtype=np.float64)
    for s in range(num_subsets):
        a = x[rng.choice(x.shape[0], m, replace=False)]
        b = y[rng.choice(y.shape[0], m, replace=False)]
        kxx = (a @ a.T / d + 1.0) ** 3
        kyy = (b @ b.T / d + 1.0) ** 3
        kxy = (a @ b.T / d + 1.0) ** 3
        sum_xx = kxx.sum() - np.trace(kxx)
        sum_yy = kyy.sum() - np.trace(kyy)
        values[s] = (sum_xx + sum_yy) / (m * (m - 1)) - 2.0 * kxy.sum() / (m * m)
    return float(values.mean()), float(values.std())


def _kth_nn_radii(feats: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    """Distance of every row of feats [N, D] to its k-th nearest other row: [N]."""
    radii = []
    for i in range(0, feats.shape[0], batch_size):
        d = torch.cdist(feats[i : i + batch_size], feats)
        # the (k+1)-th smallest value skips the point itself (distance 0)
        radii.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def _coverage(query: torch.Tensor, ref: torch.Tensor, radii: torch.Tensor, batch_size: int) -> float:
    """Fraction of query rows within radius_j of some ref row j (the k-NN manifold of ref)."""
    inside = 0
    for i in range(0, query.shape[0], batch_size):
        d = torch.cdist(query[i : i + batch_size], ref)
        inside += int((d <= radii[None, :]).any(dim=1).sum())
    return inside / query.shape[0]


class KNNManifold:
    """A feature set's k-NN manifold (Kynkäänniemi et al. 2019, eq. 1): the features [N, D] and each
    point's distance to its k-th nearest other point, computed once (e.g. for the real data, reused
    by every precision/recall against it).

    Args:
        feats: [N, D] features (tensor or array).
        k: neighbourhood size (SPEC section 4: 5).
        batch_size: rows per distance block (memory ≈ batch_size × N × 4 bytes).
        device: where to compute and keep the features (default CPU).
    Raises:
        ValueError: wrong shape, non-finite features, k < 1 or N ≤ k.
    """

    def __init__(self, feats: ArrayLike, k: int = 5, batch_size: int = 1024,
                 device: Optional[Union[str, torch.device]] = None):
        f, _ = _check_pair(feats, feats, ("features", "features"))
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if f.shape[0] <= k:
            raise ValueError(f"a k-NN manifold with k={k} needs more than k rows, got {f.shape[0]}")
        self.k, self.batch_size = int(k), int(batch_size)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.feats = torch.as_tensor(f, dtype=torch.float32, device=self.device)
        self.radii = _kth_nn_radii(self.feats, self.k, self.batch_size)

    def __len__(self) -> int:
        return int(self.feats.shape[0])

    def coverage(self, query: ArrayLike) -> float:
        """Fraction of ``query`` rows [M, D] inside this manifold."""
        q = torch.as_tensor(np.asarray(query) if not torch.is_tensor(query) else query, dtype=torch.float32,
                            device=self.device)
        return _coverage(q, self.feats, self.radii, self.batch_size)


def precision_recall(
    real_feats: Union[ArrayLike, KNNManifold],
    fake_feats: ArrayLike,
    k: int = 5,
    batch_size: int = 1024,
    device: Optional[Union[str, torch.device]] = None,
) -> Dict[str, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019, eqs. 1–3).

    Each set's manifold is the union of balls around its points with radius the distance to the
    point's k-th nearest neighbour within the same set. Precision = fraction of fake samples
    inside the real manifold (quality); recall = fraction of real samples inside the fake
    manifold (diversity). Distances are Euclidean, computed in float32 with ``torch.cdist`` in
    row batches of ``batch_size`` (memory ≈ batch_size × N × 4 bytes).

    Args:
        real_feats: [N_r, D], or a prepared :class:`KNNManifold` of the real features (its k,
            batch size and device are used); fake_feats: [N_f, D]. Use equal sizes: the numbers
            depend on N (the paper compares sets of equal size).
        k: neighbourhood size (SPEC section 4: 5; the paper's default is 3).
        batch_size: rows per distance block.
        device: where to compute (default CPU).
    Returns:
        {"precision": float in [0, 1], "recall": float in [0, 1]}.
    Raises:
        ValueError: wrong shapes, different D, non-finite features, k < 1 or a set with ≤ k rows.
    """
    real = real_feats if isinstance(real_feats, KNNManifold) else KNNManifold(real_feats, k, batch_size, device)
    _, f = _check_pair(real.feats.cpu().numpy()[:1], fake_feats, ("real_feats", "fake_feats"))
    fake = KNNManifold(f, real.k, real.batch_size, real.device)
    return {"precision": real.coverage(fake.feats), "recall": fake.coverage(real.feats)}
