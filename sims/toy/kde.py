"""Kernel density estimation in a self-consuming loop ("Collapse or Thrive?" KDE setting).

Kazdan, Schaeffer et al. 2025 (arXiv 2410.16713), KDE task: a Gaussian-kernel KDE with bandwidth
h in {0.1, 0.5, 1.0} is fitted to 2-D/3-D toy data (moons, circles, blobs with fixed centres,
3-D swiss roll; noise 0.05); the next generation's data is sampled from the KDE; the metric is
the mean negative log-likelihood of 500 fresh real test points. Replace makes the test NLL
diverge, accumulate keeps it bounded.

Sampling from a Gaussian-kernel KDE = pick a training point uniformly and add N(0, h^2 I); with
MAD's sampling bias lambda (Alemohammad et al., ICLR 2024) the added noise is N(0, lambda h^2 I)
(lambda = 1 is exactly ``KernelDensity.sample``). We draw it ourselves so the draw is a pure
function of the integer seed.

SIMS is not offered for the KDE: the guided density p_r^(1+w) / p_s^w of two KDEs has no direct
sampler (it would need MCMC or importance resampling, which changes the estimator being
studied). ``method="sims"`` is refused up front by the loop driver.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import numpy as np

from sims.data.toys import TOY_NAMES, make_toy

TOYS = TOY_NAMES

KDE_METRICS = ("test_nll",)
_CHUNK = 256  # real data is drawn in chunks of this size, each from its own seed


def toy_real_data(name: str, num: int, noise: float, seed: int) -> np.ndarray:
    """``num`` real points of toy ``name`` (:func:`sims.data.toys.make_toy`), a prefix-stable
    function of ``seed``.

    Drawn in chunks of 256 points, chunk c from seed ``SeedSequence(seed, spawn_key=(c,))`` and
    shuffled (so a generator that returns points ordered by class still gives an i.i.d. prefix);
    row i never depends on ``num``.

    Returns:
        [num, D] float64 (D = 2, or 3 for swiss_roll).
    Raises:
        ValueError: unknown toy name (from the generator).
    """
    chunks = []
    for c in range(-(-num // _CHUNK)):
        s = int(np.random.SeedSequence(int(seed), spawn_key=(c,)).generate_state(1)[0])
        x = np.asarray(make_toy(name, _CHUNK, noise, s), dtype=np.float64)
        chunks.append(x[np.random.default_rng(s).permutation(len(x))])
    if not chunks:
        return np.empty((0, 3 if name == "swiss_roll" else 2))
    return np.concatenate(chunks)[:num]


class KDEModel:
    """Loop model: scikit-learn ``KernelDensity`` (Gaussian kernel), one seed at a time.

    Implements :class:`sims.loop.GenerativeModel` (``batched = False``; ``seed`` arguments are
    ints, arrays are [N, D]).

    Args:
        toy: toy data set name (:data:`TOYS`).
        bandwidth: kernel bandwidth h > 0 (data units).
        noise: toy-data noise (SPEC: 0.05).
        num_test: fresh real test points for the NLL (SPEC: 500).
        sampling_bias: lambda > 0; samples add N(0, lambda h^2 I) to a uniformly chosen point.
    Raises:
        ValueError: unknown toy, non-positive bandwidth/lambda/num_test, negative noise.
    """

    name = "kde"
    batched = False
    supported_methods = ("standard",)
    metric_names = KDE_METRICS
    num_real_available: Optional[int] = None

    def __init__(self, toy: str = "moons", bandwidth: float = 0.1, noise: float = 0.05, num_test: int = 500,
                 sampling_bias: float = 1.0):
        if toy not in TOYS:
            raise ValueError(f"unknown toy data set {toy!r} (loop.toy); choose one of: {', '.join(TOYS)}")
        if not (np.isfinite(bandwidth) and bandwidth > 0):
            raise ValueError(f"loop.bandwidth must be positive, got {bandwidth}")
        if not (np.isfinite(sampling_bias) and sampling_bias > 0):
            raise ValueError(f"loop.sampling_bias must be a positive finite number, got {sampling_bias}")
        if num_test < 1 or noise < 0:
            raise ValueError(f"need loop.num_test >= 1 and data.noise >= 0, got {num_test}, {noise}")
        self.toy, self.bandwidth, self.noise = toy, float(bandwidth), float(noise)
        self.num_test, self.sampling_bias = int(num_test), float(sampling_bias)
        self._kde = None
        self._train: Optional[np.ndarray] = None
        self._test: Dict[int, np.ndarray] = {}

    def real_data(self, num: int, *, seed: int) -> np.ndarray:
        """[num, D] real points (:func:`toy_real_data`)."""
        return toy_real_data(self.toy, num, self.noise, seed)

    def fit(self, train_data, *, generation: int, seed: int, workdir: Path, previous: Optional[Path] = None,
            method: str = "standard") -> None:
        """Fit the KDE on [N, D] (``workdir``/``previous``/``seed`` unused: the fit is deterministic)."""
        if method not in self.supported_methods:
            raise ValueError(f"kde model supports only {self.supported_methods}, not {method!r}")
        from sklearn.neighbors import KernelDensity

        x = np.array(train_data, dtype=np.float64)  # a copy: the driver's views are reused after fit
        # rtol=1e-8: the tree may stop refining once each density is within a relative 1e-8 (an NLL
        # error below 1e-8 nats), about 3x faster than the exact default on 10^4 training points.
        self._kde = KernelDensity(kernel="gaussian", bandwidth=self.bandwidth, rtol=1e-8).fit(x)
        self._train = x

    def sample(self, num: int, *, seed: int) -> np.ndarray:
        """[num, D]: uniformly chosen training points + N(0, lambda h^2 I)."""
        if self._train is None:
            raise RuntimeError("KDEModel: call fit() before sample()")
        rng = np.random.default_rng(int(seed))
        idx = rng.integers(0, len(self._train), size=num)
        noise = rng.standard_normal((num, self._train.shape[1]))
        return self._train[idx] + np.sqrt(self.sampling_bias) * self.bandwidth * noise

    def evaluate(self, samples, *, seed: int) -> Dict[str, float]:
        """``test_nll``: mean of -log p_KDE over ``num_test`` fresh real points drawn from ``seed``.

        The driver passes the same evaluation seed to every generation and workflow of a run
        seed, so NLL curves share one test set (paired comparisons). Units: nats per point.
        """
        if self._kde is None:
            raise RuntimeError("KDEModel: call fit() before evaluate()")
        test = self._test.get(seed)
        if test is None:
            test = self._test[seed] = toy_real_data(self.toy, self.num_test, self.noise, seed)
        return {"test_nll": float(-np.mean(self._kde.score_samples(test)))}


def factory(cfg, ctx=None) -> KDEModel:
    """``loop.model=kde``: :class:`KDEModel` from the ``loop`` section and ``data.noise``."""
    lp = cfg.loop
    return KDEModel(toy=lp.toy, bandwidth=lp.bandwidth, noise=cfg.data.noise, num_test=lp.num_test,
                    sampling_bias=lp.sampling_bias)
