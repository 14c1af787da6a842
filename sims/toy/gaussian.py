"""Multivariate Gaussian fitting in a self-consuming loop, vectorised over seeds.

The "Collapse or Thrive?" task setting (Kazdan, Schaeffer et al. 2025, arXiv 2410.16713,
section on multivariate Gaussian modelling; Gerstgrasser et al. 2024): the truth is
N(mu_0, Sigma_0) = N(0, I_d); each generation fits the maximum-likelihood mean and covariance
(covariance normalised by N, as in the authors' code) and samples the next generation's data
from N(mu_hat, lambda Sigma_hat), where lambda in (0, 1] is MAD's sampling bias (Alemohammad et
al., ICLR 2024, section 3). Metrics: ||mu_hat_t - mu_0||^2, det Sigma_hat_t / det Sigma_0,
tr Sigma_hat_t / tr Sigma_0.

Arrays carry a leading seed axis S: data [S, N, d], means [S, d], covariances [S, d, d].
Every seed has its own ``numpy.random.Generator`` built from an integer seed, so the result of
one seed never depends on which other seeds are computed with it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

GAUSSIAN_METRICS = ("mean_sq_error", "det_ratio", "trace_ratio")


def gaussian_block_stats(x: np.ndarray, chunk: int = 8192) -> Tuple[int, np.ndarray, np.ndarray]:
    """Sufficient statistics of one block of data: (N, mean [S, d], centred scatter [S, d, d]).

    Centred in chunks of ``chunk`` rows, so a large (possibly read-only view) input is never
    copied whole.

    Args:
        x: [S, N, d] float data, N >= 1.
    Raises:
        ValueError: x is not 3-D or N == 0.
    """
    x = np.asarray(x)
    if x.ndim != 3 or x.shape[1] == 0:
        raise ValueError(f"expected data [S, N, d] with N >= 1, got shape {x.shape}")
    s, n, d = x.shape
    mu = x.mean(axis=1, dtype=np.float64)
    m2 = np.zeros((s, d, d))
    for start in range(0, n, chunk):
        xc = x[:, start : start + chunk].astype(np.float64) - mu[:, None, :]
        m2 += np.matmul(xc.transpose(0, 2, 1), xc)
    return n, mu, m2


def combine_block_stats(stats: Sequence[Tuple[int, np.ndarray, np.ndarray]]) -> Tuple[np.ndarray, np.ndarray]:
    """MLE (mean, covariance) of the union of blocks from their :func:`gaussian_block_stats`.

    Pairwise/parallel update of Chan, Golub & LeVeque (1979):
    mu = sum_i n_i mu_i / N, Sigma = (sum_i M2_i + n_i (mu_i - mu)(mu_i - mu)^T) / N.
    """
    if not stats:
        raise ValueError("no data blocks")
    n = sum(b[0] for b in stats)
    mu = sum(b[0] * b[1] for b in stats) / n
    m2 = np.zeros_like(stats[0][2])
    for nb, mb, m2b in stats:
        dm = mb - mu
        m2 += m2b + nb * dm[:, :, None] * dm[:, None, :]
    cov = m2 / n
    return mu, 0.5 * (cov + cov.transpose(0, 2, 1))


def fit_gaussian_mle(x: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Maximum-likelihood mean and covariance of each seed's data.

    mu = (1/N) sum_i x_i; Sigma = (1/N) sum_i (x_i - mu)(x_i - mu)^T (biased/MLE, as in
    Kazdan, Schaeffer et al. 2025's code, ``np.cov(..., bias=True)``).

    Args:
        x: [S, N, d] float data, N >= 1.
    Returns:
        (mu [S, d], Sigma [S, d, d]) in float64.
    Raises:
        ValueError: x is not 3-D or N == 0.
    """
    return combine_block_stats([gaussian_block_stats(x)])


def _sqrt_psd(cov: np.ndarray) -> np.ndarray:
    """A [S, d, d] with A A^T = cov (eigen-decomposition; negative round-off eigenvalues -> 0)."""
    w, v = np.linalg.eigh(cov)
    return v * np.sqrt(np.clip(w, 0.0, None))[:, None, :]


def sample_gaussian(
    mu: np.ndarray, cov: np.ndarray, num: int, seeds: Sequence[int], scale: float = 1.0
) -> np.ndarray:
    """Draw ``num`` samples of N(mu_s, scale * cov_s) for each seed s.

    Args:
        mu: [S, d]; cov: [S, d, d] symmetric positive semi-definite (singular allowed).
        num: samples per seed.
        seeds: S integer seeds; seed s's draws come from ``np.random.default_rng(seeds[s])``.
        scale: lambda, MAD's sampling bias (Alemohammad et al., ICLR 2024): sample
            N(mu, lambda Sigma); lambda < 1 trades diversity for quality.
    Returns:
        [S, num, d] float64.
    Raises:
        ValueError: mismatched shapes, a negative ``num`` or a non-positive/non-finite ``scale``.
    """
    mu, cov = np.asarray(mu, dtype=np.float64), np.asarray(cov, dtype=np.float64)
    s, d = mu.shape
    if cov.shape != (s, d, d) or len(seeds) != s:
        raise ValueError(f"shapes mu {mu.shape}, cov {cov.shape}, {len(seeds)} seeds do not match")
    if num < 0 or not (np.isfinite(scale) and scale > 0):
        raise ValueError(f"need num >= 0 and a positive finite scale, got num={num}, scale={scale}")
    z = np.empty((s, num, d))
    for i, seed in enumerate(seeds):
        np.random.default_rng(int(seed)).standard_normal(out=z[i])
    a = _sqrt_psd(cov) * np.sqrt(scale)
    return mu[:, None, :] + np.matmul(z, a.transpose(0, 2, 1))


def gaussian_metrics(mu: np.ndarray, cov: np.ndarray) -> Dict[str, np.ndarray]:
    """Distance of fitted Gaussians from the truth N(0, I_d) (Kazdan, Schaeffer et al. 2025).

    Args:
        mu: [S, d]; cov: [S, d, d].
    Returns:
        ``mean_sq_error`` = ||mu - 0||^2, ``det_ratio`` = det Sigma / det I = exp(slogdet Sigma)
        (0 for a singular Sigma), ``trace_ratio`` = tr Sigma / d; each [S] float64.
    """
    mu, cov = np.asarray(mu, dtype=np.float64), np.asarray(cov, dtype=np.float64)
    sign, logdet = np.linalg.slogdet(cov)
    det = np.where(sign > 0, np.exp(logdet), 0.0)
    return {
        "mean_sq_error": np.sum(mu**2, axis=-1),
        "det_ratio": det,
        "trace_ratio": np.trace(cov, axis1=-2, axis2=-1) / mu.shape[-1],
    }


def sims_guided_gaussian(
    mu_r: np.ndarray, cov_r: np.ndarray, mu_s: np.ndarray, cov_s: np.ndarray, omega: float, floor: float = 1e-9
) -> Tuple[np.ndarray, np.ndarray]:
    """The Gaussian whose score is the SIMS-extrapolated score (1 + w) s_r - w s_s.

    For Gaussian densities the extrapolated score (Alemohammad et al. 2024, arXiv 2408.16333,
    eq. for s_SIMS; Karras et al. 2024 autoguidance) is the score of
    p_r^(1+w) / p_s^w, again Gaussian with precision P and mean m:
        P = (1 + w) Sigma_r^-1 - w Sigma_s^-1,   P m = (1 + w) Sigma_r^-1 mu_r - w Sigma_s^-1 mu_s.
    If the auxiliary is broader than the base in some direction P can lose positive
    definiteness; its eigenvalues are clipped below at ``floor`` x (largest eigenvalue of
    (1 + w) Sigma_r^-1) so the result is a proper distribution.

    Args:
        mu_r, cov_r: base model [S, d], [S, d, d] (non-singular).
        mu_s, cov_s: auxiliary model fitted on the base model's samples (non-singular).
        omega: w >= 0 (0 returns the base model).
    Returns:
        (mean [S, d], covariance [S, d, d]).
    Raises:
        ValueError: omega negative or not finite; numpy.linalg.LinAlgError: a singular covariance
            (fit on n <= d samples).
    """
    if not (np.isfinite(omega) and omega >= 0):
        raise ValueError(f"SIMS guidance weight must be finite and >= 0, got {omega}")
    if omega == 0:
        return np.array(mu_r, dtype=np.float64), np.array(cov_r, dtype=np.float64)
    prec_r, prec_s = np.linalg.inv(cov_r), np.linalg.inv(cov_s)
    prec = (1 + omega) * prec_r - omega * prec_s
    prec = 0.5 * (prec + prec.transpose(0, 2, 1))
    w, v = np.linalg.eigh(prec)
    top = np.linalg.eigvalsh((1 + omega) * prec_r)[:, -1:]
    w = np.maximum(w, floor * top)
    cov = np.matmul(v / w[:, None, :], v.transpose(0, 2, 1))
    eta = (1 + omega) * np.einsum("sij,sj->si", prec_r, mu_r) - omega * np.einsum("sij,sj->si", prec_s, mu_s)
    return np.einsum("sij,sj->si", cov, eta), 0.5 * (cov + cov.transpose(0, 2, 1))


def expected_replace_mean_error(t: np.ndarray, d: int, n: int, sampling_bias: float = 1.0) -> np.ndarray:
    """E||mu_hat_t - mu_0||^2 under ``replace`` with MLE covariance (exact).

    Generation k's data has mean mu_hat_{k-1} and covariance lambda Sigma_hat_{k-1}, and
    E[Sigma_hat_k | data] = ((n-1)/n) x that covariance, so
    E||mu_hat_t||^2 = (d/n) sum_{k=0}^{t-1} (lambda (n-1)/n)^k, which is ~ t d / n for t << n
    (the linear growth stated by Gerstgrasser et al. 2024 and Kazdan, Schaeffer et al. 2025).
    """
    t = np.asarray(t)
    q = sampling_bias * (n - 1) / n
    if q == 1.0:
        return d / n * t.astype(float)
    return d / n * (1 - q ** t.astype(float)) / (1 - q)


def expected_replace_trace_ratio(t: np.ndarray, n: int, sampling_bias: float = 1.0) -> np.ndarray:
    """E[tr Sigma_hat_t / tr I] under ``replace`` with MLE covariance: ((n-1)/n)^t lambda^(t-1)."""
    t = np.asarray(t, dtype=float)
    return ((n - 1) / n) ** t * sampling_bias ** (t - 1)


def accumulate_mean_error_limit(d: int, n: int, t: Optional[np.ndarray] = None) -> np.ndarray:
    """Accumulate's mean error: (d/n) sum_{k=1}^t 1/k^2 -> (pi^2/6) d/n as t -> infinity.

    mu_hat_t = mu_hat_{t-1} + eps_t / t with E||eps_t||^2 ~ d/n, the Gaussian instance of the
    bounded-error result of Gerstgrasser et al. 2024 (test error <= pi^2/6 x the one-generation
    error). With ``t=None`` returns the limit (pi^2/6) d/n.
    """
    if t is None:
        return np.asarray(np.pi**2 / 6 * d / n)
    t = np.atleast_1d(np.asarray(t, dtype=int))
    partial = np.cumsum(1.0 / np.arange(1, int(t.max()) + 1) ** 2)
    return d / n * partial[t - 1]


class GaussianMLE:
    """Loop model: MLE Gaussian, vectorised over a batch of seeds (``batched = True``).

    Implements :class:`sims.loop.GenerativeModel` with a leading seed axis: ``seed`` arguments are
    sequences of S integer seeds and arrays are [S, ...]. ``method="sims"`` fits an auxiliary
    Gaussian on ``aux_size`` samples of the base fit (SIMS Algorithm 1 steps 2-3) and samples the
    Gaussian of :func:`sims_guided_gaussian` with weight ``guidance`` (step 4); this is the exact
    density-space analogue of SIMS, so it needs n > d.

    Args:
        dim: d.
        sampling_bias: lambda > 0 (samples N(mu, lambda Sigma)).
        guidance: SIMS weight w >= 0 for ``method="sims"``.
        aux_size: base samples the auxiliary is fitted on (SIMS n_s).
    Raises:
        ValueError: dim < 1, lambda not positive, w negative, aux_size < 1.
    """

    name = "gaussian"
    batched = True
    supported_methods = ("standard", "sims")
    metric_names = GAUSSIAN_METRICS
    num_real_available: Optional[int] = None

    def __init__(self, dim: int, sampling_bias: float = 1.0, guidance: float = 0.0, aux_size: int = 1000):
        if int(dim) != dim or dim < 1:
            raise ValueError(f"loop.dim must be a positive integer, got {dim}")
        if not (np.isfinite(sampling_bias) and sampling_bias > 0):
            raise ValueError(f"loop.sampling_bias must be a positive finite number, got {sampling_bias}")
        if not (np.isfinite(guidance) and guidance >= 0):
            raise ValueError(f"loop.omega must be finite and >= 0, got {guidance}")
        if aux_size < 1:
            raise ValueError(f"auxiliary sample size must be >= 1, got {aux_size}")
        self.dim, self.sampling_bias, self.guidance, self.aux_size = int(dim), float(sampling_bias), float(guidance), int(aux_size)
        self.mu: Optional[np.ndarray] = None
        self.cov: Optional[np.ndarray] = None
        self._cache: dict = {}

    def real_data(self, num: int, *, seed: Sequence[int]) -> np.ndarray:
        """[S, num, d] draws of the truth N(0, I_d); prefix-stable (row i never depends on num)."""
        out = np.empty((len(seed), num, self.dim))
        for i, s in enumerate(seed):
            np.random.default_rng(int(s)).standard_normal(out=out[i])
        return out

    def fit(self, train_data: np.ndarray, *, generation: int, seed: Sequence[int], workdir: Path,
            previous: Optional[Path] = None, method: str = "standard") -> None:
        """Fit mu, Sigma per seed on [S, N, d]; for ``sims`` also the auxiliary and the guided Gaussian.

        ``workdir`` and ``previous`` are unused (the fit is closed-form and cheap to redo).
        """
        if method not in self.supported_methods:
            raise ValueError(f"gaussian model: unknown method {method!r}; choose {self.supported_methods}")
        mu, cov = self._fit_parts(train_data)
        if method == "sims" and self.guidance > 0:
            aux = sample_gaussian(mu, cov, self.aux_size, seed)
            mu_s, cov_s = fit_gaussian_mle(aux)
            mu, cov = sims_guided_gaussian(mu, cov, mu_s, cov_s, self.guidance)
        self.mu, self.cov = mu, cov

    def _fit_parts(self, train_data) -> Tuple[np.ndarray, np.ndarray]:
        """MLE over the parts of a :class:`~sims.data.workflows.TrainingData` (or an array).

        Statistics of keyed parts are cached between calls (a key always denotes the same data),
        so an ``accumulate`` loop costs O(n_s) per generation instead of O(t n_s); the result is
        bit-for-bit the same whether or not the cache was warm (e.g. after a resume).
        """
        parts = getattr(train_data, "parts", None)
        if parts is None:
            parts = [(None, np.asarray(train_data))]
        cache, stats = {}, []
        for key, arr in parts:
            st = self._cache.get(key) if key is not None else None
            if st is None:
                st = gaussian_block_stats(arr)
            if key is not None:
                cache[key] = st
            stats.append(st)
        self._cache = cache  # keep only what this fit used: the next fit of a stream reuses a superset
        return combine_block_stats(stats)

    def _fitted(self) -> Tuple[np.ndarray, np.ndarray]:
        if self.mu is None or self.cov is None:
            raise RuntimeError("GaussianMLE: call fit() before sample()/evaluate()")
        return self.mu, self.cov

    def sample(self, num: int, *, seed: Sequence[int]) -> np.ndarray:
        """[S, num, d] samples of N(mu, lambda Sigma)."""
        mu, cov = self._fitted()
        return sample_gaussian(mu, cov, num, seed, scale=self.sampling_bias)

    def evaluate(self, samples: Optional[np.ndarray], *, seed: Sequence[int]) -> Dict[str, np.ndarray]:
        """:func:`gaussian_metrics` of the fitted (for ``sims``: guided) Gaussian; ``samples`` unused."""
        mu, cov = self._fitted()
        return gaussian_metrics(mu, cov)


def factory(cfg, ctx=None) -> GaussianMLE:
    """``loop.model=gaussian``: :class:`GaussianMLE` from the ``loop`` section (ω = ``loop.omega``)."""
    lp = cfg.loop
    return GaussianMLE(dim=lp.dim, sampling_bias=lp.sampling_bias, guidance=lp.omega, aux_size=lp.num_synthetic)
