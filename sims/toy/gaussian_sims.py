"""The SIMS analogue of the Gaussian loop model: guided Gaussians, the auxiliary's debiased precision,
and the theory of the guided covariance's inflation (Alemohammad et al. 2024, arXiv 2408.16333, in
density space; used by :class:`sims.toy.gaussian.GaussianMLE` for ``method="sims"``).

Arrays carry a leading seed axis S: means [S, d], covariances [S, d, d].
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

from sims.errors import LoopError


class GuidedPrecisionError(LoopError):
    """The SIMS-guided precision (1 + w) Sigma_r^-1 - w Pi_s is not positive definite, so the
    extrapolated "density" p_r^(1+w) / p_s^w is not normalisable: in some direction the auxiliary's
    variance is below w/(1 + w) times the base's (its precision estimate came out too high). Lower
    ``loop.omega`` or raise ``loop.num_synthetic`` (the auxiliary's sample size). ``indices``: the
    positions in the batch (seed axis) that failed."""

    def __init__(self, message: str, indices: Sequence[int] = ()):
        super().__init__(message)
        self.indices = tuple(int(i) for i in indices)


def debiased_precision(cov: np.ndarray, num: int) -> np.ndarray:
    """Unbiased estimate of Sigma^-1 from the MLE covariance of ``num`` samples: ((n - d - 2)/n) Sigma_hat^-1.

    Derivation (Wishart / inverse-Wishart moments; e.g. Anderson 2003, "An Introduction to
    Multivariate Statistical Analysis", sections 7.2 and 7.7; Muirhead 1982, theorem 3.2.12): for n
    i.i.d. draws of N(mu, Sigma) in R^d with the mean estimated, the scatter
    n Sigma_hat = sum_i (x_i - x_bar)(x_i - x_bar)^T is Wishart W_d(Sigma, n - 1), and
    E[W^-1] = Sigma^-1 / (m - d - 1) for W ~ W_d(Sigma, m) with m > d + 1. Hence
    E[Sigma_hat^-1] = n / (n - d - 2) Sigma^-1 (the inverse of the MLE covariance is biased *high*:
    +13.6% at d = 10, n = 100), and (n - d - 2)/n Sigma_hat^-1 is unbiased. It is unbiased in
    *expectation only*: each draw still scatters around Sigma^-1 (relative variance ~ (d + 1)/n per
    eigen-direction), and its inverse is not an unbiased covariance.

    Args:
        cov: [S, d, d] MLE covariances (normalised by ``num``), non-singular.
        num: n, the number of samples each was fitted on; must satisfy n > d + 2.
    Returns:
        [S, d, d] float64, symmetric.
    Raises:
        ValueError: n <= d + 2 (the inverse-Wishart mean does not exist);
            numpy.linalg.LinAlgError: a singular covariance.
    """
    cov = np.asarray(cov, dtype=np.float64)
    d = cov.shape[-1]
    if int(num) != num or num <= d + 2:
        raise ValueError(f"the debiased precision needs more than d + 2 = {d + 2} samples, got {num}")
    prec = np.linalg.inv(cov) * ((num - d - 2) / num)
    return 0.5 * (prec + prec.transpose(0, 2, 1))


def sims_guided_gaussian(
    mu_r: np.ndarray, cov_r: np.ndarray, mu_s: np.ndarray, cov_s: np.ndarray, omega: float,
    aux_size: Optional[int] = None, rtol: float = 1e-12,
) -> Tuple[np.ndarray, np.ndarray]:
    """The Gaussian whose score is the SIMS-extrapolated score (1 + w) s_r - w s_s.

    For Gaussian densities the extrapolated score (Alemohammad et al. 2024, arXiv 2408.16333,
    eq. for s_SIMS; Karras et al. 2024 autoguidance) is the score of p_r^(1+w) / p_s^w, again
    Gaussian with precision P and mean m:
        P = (1 + w) Sigma_r^-1 - w Pi_s,   P m = (1 + w) Sigma_r^-1 mu_r - w Pi_s mu_s,
    where Pi_s is the auxiliary's precision: Sigma_s^-1 if ``aux_size`` is None, else the
    :func:`debiased_precision` ((n_s - d - 2)/n_s) Sigma_s^-1 of an auxiliary that is the MLE of
    n_s = ``aux_size`` samples of the base. Without that correction E[Sigma_s^-1] =
    n_s/(n_s - d - 2) Sigma_r^-1, so P is biased low by w (d + 2)/(n_s - d - 2) Sigma_r^-1 and the
    guided covariance inflates every generation of a loop. With it E[P | base] = Sigma_r^-1 (and,
    as x_bar and Sigma_hat of Gaussian samples are independent, E[P m | base] = Sigma_r^-1 mu_r):
    unbiased in expectation only; E[P^-1 | base] = kappa Sigma_r with kappa > 1 (Jensen; see
    :func:`sims_covariance_inflation`).

    P is *not* clipped: if it is not positive definite (its smallest eigenvalue <= ``rtol`` x its
    largest absolute eigenvalue) p_r^(1+w) / p_s^w is not a distribution and
    :class:`GuidedPrecisionError` is raised, naming the batch indices.

    Args:
        mu_r, cov_r: base model [S, d], [S, d, d] (non-singular).
        mu_s, cov_s: auxiliary model fitted on the base model's samples (non-singular).
        omega: w >= 0 (0 returns the base model).
        aux_size: n_s, the auxiliary's sample size (debias its precision), or None (plain inverse).
        rtol: relative eigenvalue threshold of the positive-definiteness check.
    Returns:
        (mean [S, d], covariance [S, d, d]) in float64.
    Raises:
        ValueError: omega negative or not finite, aux_size <= d + 2; GuidedPrecisionError: P not
            positive definite; numpy.linalg.LinAlgError: a singular covariance (fit on n <= d samples).
    """
    mu, cov, ok, w_min, top = _guided_parts(mu_r, cov_r, mu_s, cov_s, omega, aux_size, rtol)
    bad = np.flatnonzero(~ok)
    if bad.size:
        raise GuidedPrecisionError(
            f"SIMS guided precision (1 + w) Sigma_r^-1 - w Sigma_s^-1 is not positive definite at w = {omega} for "
            f"{bad.size} of {len(ok)} seeds (batch positions {bad[:8].tolist()}{' ...' if bad.size > 8 else ''}; smallest "
            f"eigenvalue {float(w_min[bad[0]]):.3g}, largest |eigenvalue| {float(top[bad[0]]):.3g}): the "
            "auxiliary is narrower than w/(1 + w) times the base in some direction; lower loop.omega or raise "
            "loop.num_synthetic",
            bad.tolist())
    return mu, cov


def _guided_parts(mu_r, cov_r, mu_s, cov_s, omega, aux_size, rtol):
    """(mean, covariance, positive-definite mask [S], smallest eigenvalue of P [S], the threshold's
    scale [S]) of :func:`sims_guided_gaussian`; mean and covariance are the base's where not PD."""
    if not (np.isfinite(omega) and omega >= 0):
        raise ValueError(f"SIMS guidance weight must be finite and >= 0, got {omega}")
    mu_r, cov_r = np.array(mu_r, dtype=np.float64), np.array(cov_r, dtype=np.float64)
    if omega == 0:
        s = len(mu_r)
        return mu_r, cov_r, np.ones(s, dtype=bool), np.full(s, np.nan), np.full(s, np.nan)
    prec_r = np.linalg.inv(cov_r)
    prec_s = np.linalg.inv(cov_s) if aux_size is None else debiased_precision(cov_s, aux_size)
    prec = (1 + omega) * prec_r - omega * prec_s
    prec = 0.5 * (prec + prec.transpose(0, 2, 1))
    w, v = np.linalg.eigh(prec)
    top = np.abs(w).max(axis=1)
    w_min = w[:, 0].copy()
    ok = w_min > rtol * top
    w = np.where(ok[:, None], w, 1.0)  # no division by a non-positive eigenvalue; replaced below
    cov = np.matmul(v / w[:, None, :], v.transpose(0, 2, 1))
    eta = (1 + omega) * np.einsum("sij,sj->si", prec_r, mu_r) - omega * np.einsum("sij,sj->si", prec_s, mu_s)
    mu = np.einsum("sij,sj->si", cov, eta)
    cov = 0.5 * (cov + cov.transpose(0, 2, 1))
    mu[~ok], cov[~ok] = mu_r[~ok], cov_r[~ok]
    return mu, cov, ok, w_min, top


def sample_wishart(dim: int, dof: int, num: int, rng: np.random.Generator) -> np.ndarray:
    """``num`` draws of the Wishart W_dim(I, dof) by Bartlett's decomposition: [num, dim, dim].

    W = L L^T with L lower triangular, L_ii = sqrt(chi^2_(dof - i)) (i = 0..d-1), L_ij ~ N(0, 1)
    below the diagonal (Bartlett 1933; Anderson 2003, section 7.2). Needs dof >= dim.
    """
    if dof < dim:
        raise ValueError(f"Wishart needs dof >= dim, got dof={dof}, dim={dim}")
    low = np.zeros((num, dim, dim))
    rows, cols = np.tril_indices(dim, -1)
    low[:, rows, cols] = rng.standard_normal((num, rows.size))
    diag = np.arange(dim)
    low[:, diag, diag] = np.sqrt(rng.chisquare(dof - diag, size=(num, dim)))
    return np.matmul(low, low.transpose(0, 2, 1))


def sims_covariance_inflation(omega: float, aux_size: int, dim: int, draws: int = 100_000, seed: int = 0,
                              chunk: int = 20_000) -> Tuple[float, float]:
    """kappa = E[tr P_w^-1] / d of the debiased SIMS analogue, by Monte Carlo: (kappa, standard error).

    With a base N(mu_r, Sigma_r), an auxiliary fitted (MLE) on n_s = ``aux_size`` of its samples and
    the debiased precision of :func:`sims_guided_gaussian`, whitening by Sigma_r^(1/2) gives
    P = Sigma_r^(-1/2) [(1 + w) I - w (n_s - d - 2) S^-1] Sigma_r^(-1/2) with S ~ W_d(I, n_s - 1)
    independent of the base; the law of S^-1 is orthogonally invariant, so
    E[guided covariance | base] = kappa Sigma_r with kappa = E[tr((1 + w) I - w (n_s - d - 2) S^-1)^-1] / d
    (> 1 by Jensen's inequality; second order in w: kappa ~ 1 + w^2 ((d + 1) a + 2) / ((a + 1)(a - 2)),
    a = n_s - d - 2, from the inverse-Wishart covariances). Draws whose P is not positive definite
    (then p_r^(1+w)/p_s^w is not normalisable, and the loop raises :class:`GuidedPrecisionError`)
    are left out, so kappa is conditional on positive definiteness; their share is small when
    w (d + 2) << n_s (1.3e-5 of 10^6 draws at d = 10, n_s = 100, w = 0.5; 7% at w = 1; none of
    2 x 10^5 at n_s = 1000, w = 1).

    Args:
        omega: w >= 0; aux_size: n_s > d + 2; dim: d; draws: Monte-Carlo draws; seed: their seed.
    Returns:
        (kappa, its Monte-Carlo standard error).
    """
    a = aux_size - dim - 2
    if a <= 0:
        raise ValueError(f"need aux_size > dim + 2, got aux_size={aux_size}, dim={dim}")
    rng = np.random.default_rng(seed)
    vals = []
    for start in range(0, draws, chunk):
        s = sample_wishart(dim, aux_size - 1, min(chunk, draws - start), rng)
        ev = (1 + omega) - omega * a / np.linalg.eigvalsh(s)  # eigenvalues of the whitened P
        ok = np.all(ev > 0, axis=1)
        vals.append(np.mean(1.0 / ev[ok], axis=1))
    v = np.concatenate(vals)
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(v.size))


def expected_sims_replace_trace_ratio(t: np.ndarray, n: int, kappa: float, sampling_bias: float = 1.0) -> np.ndarray:
    """E[tr G_t / tr I] of the debiased SIMS analogue under ``replace``: (kappa (n-1)/n)^t lambda^(t-1).

    G_t is generation t's guided covariance, kappa from :func:`sims_covariance_inflation`:
    E[G_t | base_t] = kappa Sigma_r,t and E[Sigma_r,t+1 | G_t] = lambda (n-1)/n G_t, starting from
    E[Sigma_r,1] = ((n-1)/n) I. Exact in expectation given kappa (itself conditional on every
    guided precision being positive definite).
    """
    t = np.asarray(t, dtype=float)
    return (kappa * (n - 1) / n) ** t * sampling_bias ** (t - 1)
