"""Multivariate Gaussian fitting in a self-consuming loop, vectorised over seeds.

The "Collapse or Thrive?" task setting (Kazdan, Schaeffer et al. 2025, arXiv 2410.16713,
section on multivariate Gaussian modelling; Gerstgrasser et al. 2024): the truth is
N(mu_0, Sigma_0) = N(0, I_d); each generation fits the maximum-likelihood mean and covariance
(covariance normalised by N, as in the authors' code) and samples the next generation's data
from N(mu_hat, lambda Sigma_hat), where lambda in (0, 1] is MAD's sampling bias (Alemohammad et
al., ICLR 2024, section 3). Metrics: ||mu_hat_t - mu_0||^2, det Sigma_hat_t / det Sigma_0,
tr Sigma_hat_t / tr Sigma_0.

SIMS analogue (``method="sims"``; Alemohammad et al. 2024, arXiv 2408.16333): the auxiliary is the
MLE of n_s samples of the base fit and the sampled model is the Gaussian whose score is the
extrapolated score (1 + w) s_base - w s_aux (:func:`sims_guided_gaussian`), with the auxiliary's
precision debiased for its finite sample (:func:`debiased_precision`; without it the guided
covariance inflated by ~ w (d + 2)/(n_s - d - 2) per generation and diverged). The debiasing is
exact in expectation only: the guided covariance is still kappa > 1 times the base's on average
(:func:`sims_covariance_inflation`, :func:`expected_sims_replace_trace_ratio`).

Arrays carry a leading seed axis S: data [S, N, d], means [S, d], covariances [S, d, d].
Every seed has its own ``numpy.random.Generator`` built from an integer seed, so the result of
one seed never depends on which other seeds are computed with it.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from sims.errors import LoopError
from sims.toy.gaussian_sims import (  # noqa: F401  (re-exported: sims.toy.gaussian.* as before)
    GuidedPrecisionError,
    _guided_parts,
    debiased_precision,
    expected_sims_replace_trace_ratio,
    sample_wishart,
    sims_covariance_inflation,
    sims_guided_gaussian,
)

log = logging.getLogger(__name__)

GAUSSIAN_METRICS = ("mean_sq_error", "det_ratio", "trace_ratio")
_CACHE_DOUBLES = 1 << 15  # 256 KiB of float64: the block of seeds processed at once stays in cache


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
    group = max(1, _CACHE_DOUBLES // (min(n, chunk) * d))  # seeds per step: their rows stay in cache
    for start in range(0, n, chunk):
        for g in range(0, s, group):
            xc = np.subtract(x[g : g + group, start : start + chunk], mu[g : g + group, None, :], dtype=np.float64)
            m2[g : g + group] += np.matmul(xc.transpose(0, 2, 1), xc)
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


def standard_normals(seeds: Sequence[int], num: int, dim: int) -> np.ndarray:
    """[S, num, dim] float64: row block s is ``np.random.default_rng(seeds[s]).standard_normal((num, dim))``."""
    z = np.empty((len(seeds), num, dim))
    for i, seed in enumerate(seeds):
        np.random.default_rng(int(seed)).standard_normal(out=z[i])
    return z


class NoiseCache:
    """The standard normals of a seed batch (:func:`standard_normals`), kept up to ``max_bytes``.

    The draws are a pure function of (seeds, num, dim), so a kept block is exactly what a new draw
    would give, and each seed's rows never depend on the other seeds of the batch. The loop's sample
    (and fit) seeds do not depend on the workflow or method (:mod:`sims.loop`), so every stream after
    the first of a run reuses the first one's noise instead of drawing it again (normal draws were
    the largest cost of the Gaussian loop). Blocks are read-only. When full, new draws are returned
    but not kept (keeping the earliest generations: streams run one after another from generation 1).
    """

    def __init__(self, max_bytes: int = 512 << 20):
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self._store: Dict[Tuple[Tuple[int, ...], int, int], np.ndarray] = {}

    def get(self, seeds: Sequence[int], num: int, dim: int) -> np.ndarray:
        """[S, num, dim]: :func:`standard_normals` of ``seeds``."""
        key = (tuple(int(s) for s in seeds), int(num), int(dim))
        z = self._store.get(key)
        if z is None:
            z = standard_normals(key[0], num, dim)
            if self.nbytes + z.nbytes <= self.max_bytes:
                z.flags.writeable = False
                self._store[key] = z
                self.nbytes += z.nbytes
        return z

    def clear(self) -> None:
        self._store.clear()
        self.nbytes = 0


def sample_gaussian(
    mu: np.ndarray, cov: np.ndarray, num: int, seeds: Sequence[int], scale: float = 1.0,
    noise: Optional[NoiseCache] = None,
) -> np.ndarray:
    """Draw ``num`` samples of N(mu_s, scale * cov_s) for each seed s.

    x = mu + A z with A A^T = scale * cov (eigen-decomposition) and z the seed's standard normals.

    Args:
        mu: [S, d]; cov: [S, d, d] symmetric positive semi-definite (singular allowed).
        num: samples per seed.
        seeds: S integer seeds; seed s's draws come from ``np.random.default_rng(seeds[s])``.
        scale: lambda, MAD's sampling bias (Alemohammad et al., ICLR 2024): sample
            N(mu, lambda Sigma); lambda < 1 trades diversity for quality.
        noise: a :class:`NoiseCache` to take the normal draws from (the same numbers; None: draw).
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
    at = (_sqrt_psd(cov) * np.sqrt(scale)).transpose(0, 2, 1)
    out = np.empty((s, num, d))
    group = max(1, _CACHE_DOUBLES // max(num * d, 1))  # seeds per product: their rows stay in cache
    z = noise.get(seeds, num, d) if noise is not None else np.empty((min(group, s), num, d))
    for start in range(0, s, group):
        stop = min(start + group, s)
        if noise is None:
            for j, seed in enumerate(seeds[start:stop]):
                np.random.default_rng(int(seed)).standard_normal(out=z[j])
            block = z[: stop - start]
        else:
            block = z[start:stop]
        np.matmul(block, at[start:stop], out=out[start:stop])
        out[start:stop] += mu[start:stop, None, :]
    return out


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


def expected_replace_mean_error(t: np.ndarray, d: int, n: int, sampling_bias: float = 1.0) -> np.ndarray:
    """E||mu_hat_t - mu_0||^2 under ``replace`` with MLE covariance (exact in expectation).

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
    Gaussian of :func:`sims_guided_gaussian` with weight ``guidance`` (step 4), with the
    auxiliary's precision debiased for its sample size (:func:`debiased_precision`): a
    density-space analogue of SIMS (the Gaussian whose score is the extrapolated score), which
    needs aux_size > d + 2 and raises :class:`GuidedPrecisionError` (a :class:`~sims.errors.LoopError`)
    when a guided precision is not positive definite.

    ``recompute_synthetic = True``: the synthetic data is a cheap deterministic function of the
    seeds, so the loop driver keeps it in memory and replays a stream on resume instead of
    storing it (see :class:`sims.loop.GenerativeModel`).

    Args:
        dim: d.
        sampling_bias: lambda > 0 (samples N(mu, lambda Sigma)).
        guidance: SIMS weight w >= 0 for ``method="sims"``.
        aux_size: base samples the auxiliary is fitted on (SIMS n_s).
        noise_cache_mib: memory for the :class:`NoiseCache` of normal draws shared by the streams of
            a run (0: draw every time; the results are the same). The "Collapse or Thrive?" protocol
            at n = 1000 (50 seeds, 100 generations) keeps 400 MB.
    Raises:
        ValueError: dim < 1, lambda not positive, w negative, aux_size < 1, noise_cache_mib < 0.
    """

    name = "gaussian"
    batched = True
    supported_methods = ("standard", "sims")
    metric_names = GAUSSIAN_METRICS
    num_real_available: Optional[int] = None
    recompute_synthetic = True

    def __init__(self, dim: int, sampling_bias: float = 1.0, guidance: float = 0.0, aux_size: int = 1000,
                 noise_cache_mib: int = 512):
        if int(dim) != dim or dim < 1:
            raise ValueError(f"loop.dim must be a positive integer, got {dim}")
        if not (np.isfinite(sampling_bias) and sampling_bias > 0):
            raise ValueError(f"loop.sampling_bias must be a positive finite number, got {sampling_bias}")
        if not (np.isfinite(guidance) and guidance >= 0):
            raise ValueError(f"loop.omega must be finite and >= 0, got {guidance}")
        if aux_size < 1:
            raise ValueError(f"auxiliary sample size must be >= 1, got {aux_size}")
        if noise_cache_mib < 0:
            raise ValueError(f"noise_cache_mib must be >= 0, got {noise_cache_mib}")
        self.dim, self.sampling_bias, self.guidance, self.aux_size = int(dim), float(sampling_bias), float(guidance), int(aux_size)
        self.mu: Optional[np.ndarray] = None
        self.cov: Optional[np.ndarray] = None
        self.guidance_skipped: Optional[np.ndarray] = None  # [S] 0/1 after a ``sims`` fit, else None
        self._cache: dict = {}
        self.noise = NoiseCache(noise_cache_mib << 20)

    def real_data(self, num: int, *, seed: Sequence[int]) -> np.ndarray:
        """[S, num, d] draws of the truth N(0, I_d); prefix-stable (row i never depends on num)."""
        return standard_normals(seed, num, self.dim)

    def fit(self, train_data: np.ndarray, *, generation: int, seed: Sequence[int], workdir: Path,
            previous: Optional[Path] = None, method: str = "standard") -> None:
        """Fit mu, Sigma per seed on [S, N, d]; for ``sims`` also the auxiliary and the guided Gaussian.

        ``workdir`` and ``previous`` are unused (the fit is closed-form and cheap to redo).

        Raises:
            ValueError: unknown method; LoopError: ``sims`` with aux_size <= d + 2.

        A seed whose guided precision is not positive definite (then p_r^(1+w)/p_s^w is no
        distribution; probability ~1e-5 per seed and generation at d = 10, n_s = 100, w = 0.5, by
        Monte Carlo) is not clipped: it samples the base model in that generation, a WARNING is
        logged, and :meth:`evaluate` reports ``guidance_skipped = 1`` for it (0 otherwise; only
        for ``sims``). :func:`sims_guided_gaussian` itself raises :class:`GuidedPrecisionError`.
        """
        if method not in self.supported_methods:
            raise ValueError(f"gaussian model: unknown method {method!r}; choose {self.supported_methods}")
        mu, cov = self._fit_parts(train_data)
        skipped = None
        if method == "sims" and self.guidance > 0:
            if self.aux_size <= self.dim + 2:
                raise LoopError(f"method sims of the Gaussian model needs loop.num_synthetic > loop.dim + 2 = "
                                f"{self.dim + 2} (the auxiliary's debiased precision), got {self.aux_size}")
            aux = sample_gaussian(mu, cov, self.aux_size, seed, noise=self.noise)
            mu_s, cov_s = fit_gaussian_mle(aux)
            mu, cov, ok, w_min, _ = _guided_parts(mu, cov, mu_s, cov_s, self.guidance, self.aux_size, 1e-12)
            skipped = (~ok).astype(np.float64)
            if not ok.all():
                bad = np.flatnonzero(~ok)
                log.warning("gaussian model, generation %d: the SIMS guided precision is not positive definite for "
                            "%d of %d seeds (positions %s in loop.seeds order; smallest eigenvalue %.3g): those "
                            "seeds sample the base model this generation (metric guidance_skipped = 1); lower "
                            "loop.omega or raise loop.num_synthetic", generation, bad.size, ok.size,
                            bad[:8].tolist(), float(w_min[bad[0]]))
        self.mu, self.cov, self.guidance_skipped = mu, cov, skipped

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
        return sample_gaussian(mu, cov, num, seed, scale=self.sampling_bias, noise=self.noise)

    def evaluate(self, samples: Optional[np.ndarray], *, seed: Sequence[int]) -> Dict[str, np.ndarray]:
        """:func:`gaussian_metrics` of the fitted (for ``sims``: guided) Gaussian; ``samples`` unused.

        After a ``sims`` fit also ``guidance_skipped`` [S]: 1.0 where the guided precision was not
        positive definite and the seed fell back to the base model (see :meth:`fit`), else 0.0.
        """
        mu, cov = self._fitted()
        out = gaussian_metrics(mu, cov)
        if self.guidance_skipped is not None:
            out["guidance_skipped"] = self.guidance_skipped
        return out


def factory(cfg, ctx=None) -> GaussianMLE:
    """``loop.model=gaussian``: :class:`GaussianMLE` from the ``loop`` section (ω = ``loop.omega``)."""
    lp = cfg.loop
    return GaussianMLE(dim=lp.dim, sampling_bias=lp.sampling_bias, guidance=lp.omega, aux_size=lp.num_synthetic)
