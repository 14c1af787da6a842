"""Low-dimensional toy distributions (2-D and 3-D) for fast diffusion, KDE and collapse-loop runs.

The "Collapse or Thrive?" KDE tasks (Kazdan, Schaeffer et al. 2025, arXiv 2410.16713; SPEC
section 3) use moons, circles, blobs with fixed centres and the 3-D swiss roll with noise 0.05;
``gmm`` is the 8-mode Gaussian mixture on a circle of SPEC section 5.

Every toy is drawn in its *raw* coordinates and then standardised with **fixed** per-toy constants,
``x = (raw - CENTER) / SCALE``, where CENTER and SCALE are the mean and standard deviation per axis
of the noiseless raw distribution (analytic, or for the swiss roll measured once on 2 million
noiseless samples). They never depend on the drawn sample, so fresh samples of the same toy (the
loop's fresh real data and test points) share one coordinate system; with ``noise = 0.05`` every
axis has roughly unit variance.

``noise`` is the standard deviation of isotropic Gaussian noise in raw units (scikit-learn's
convention for moons, circles and swiss roll). For the cluster toys it is added in quadrature to the
clusters' own width: blobs ``sqrt(0.15**2 + noise**2)``, gmm ``sqrt(0.1**2 + noise**2)``.

| toy        | d | raw distribution                                                   |
|------------|---|--------------------------------------------------------------------|
| moons      | 2 | ``sklearn.datasets.make_moons`` (two interleaved half circles)      |
| circles    | 2 | ``sklearn.datasets.make_circles(factor=0.5)`` (radii 1 and 0.5)      |
| blobs      | 2 | ``sklearn.datasets.make_blobs``, 9 equal clusters at the grid {-1,0,1}^2, std 0.15 |
| swiss_roll | 3 | ``sklearn.datasets.make_swiss_roll`` (x = t cos t, y ~ U(0,21), z = t sin t) |
| gmm        | 2 | 8 equally weighted Gaussians, means on the unit circle at angles 2πk/8, std 0.1 |
"""
from __future__ import annotations

import math
from typing import Dict, Tuple

import numpy as np

BLOB_CENTRES = np.array([[x, y] for y in (-1.0, 0.0, 1.0) for x in (-1.0, 0.0, 1.0)])
BLOB_STD = 0.15
GMM_MODES = 8
GMM_RADIUS = 1.0
GMM_STD = 0.1
GMM_CENTRES = np.array(
    [[GMM_RADIUS * math.cos(2 * math.pi * k / GMM_MODES), GMM_RADIUS * math.sin(2 * math.pi * k / GMM_MODES)] for k in range(GMM_MODES)]
)
CIRCLES_FACTOR = 0.5

# Fixed standardisation constants (mean, std per axis of the noiseless raw toy).
TOY_STANDARDISATION: Dict[str, Tuple[Tuple[float, ...], Tuple[float, ...]]] = {
    # moons: outer x=cos t, y=sin t; inner x=1-cos t, y=0.5-sin t (t uniform on [0, π]):
    # mean (1/2, 1/4), var_x = 3/4, var_y = 9/16 - 1/π.
    "moons": ((0.5, 0.25), (math.sqrt(0.75), math.sqrt(9 / 16 - 1 / math.pi))),
    # circles: radii 1 and 0.5, equal counts: E[x²] = (1 + 0.25) / 2 / 2.
    "circles": ((0.0, 0.0), (math.sqrt(0.3125), math.sqrt(0.3125))),
    # blobs: centres uniform on {-1,0,1}² (variance 2/3 per axis) plus the cluster width.
    "blobs": ((0.0, 0.0), (math.sqrt(2 / 3 + BLOB_STD**2),) * 2),
    # swiss roll: measured on 2e6 noiseless samples of make_swiss_roll (y analytic: U(0, 21)).
    "swiss_roll": ((2.0083, 10.5, 0.2063), (6.6218, 21 / math.sqrt(12), 6.9523)),
    # gmm: means on the unit circle (variance 1/2 per axis) plus the component width.
    "gmm": ((0.0, 0.0), (math.sqrt(0.5 + GMM_STD**2),) * 2),
}
TOY_DIMS: Dict[str, int] = {"moons": 2, "circles": 2, "blobs": 2, "swiss_roll": 3, "gmm": 2}
TOY_NAMES: Tuple[str, ...] = tuple(TOY_DIMS)


def toy_dim(name: str) -> int:
    """Dimension d of toy ``name``. Raises ValueError for an unknown toy (the message lists the choices)."""
    if name not in TOY_DIMS:
        raise ValueError(f"unknown toy {name!r}; choose one of {', '.join(TOY_NAMES)}")
    return TOY_DIMS[name]


def _raw_toy(name: str, n: int, noise: float, seed: int) -> np.ndarray:
    from sklearn import datasets

    if name == "moons":
        x, _ = datasets.make_moons(n_samples=n, noise=noise, random_state=seed)
    elif name == "circles":
        x, _ = datasets.make_circles(n_samples=n, noise=noise, factor=CIRCLES_FACTOR, random_state=seed)
    elif name == "blobs":
        x, _ = datasets.make_blobs(
            n_samples=n, centers=BLOB_CENTRES, cluster_std=math.hypot(BLOB_STD, noise), random_state=seed
        )
    elif name == "swiss_roll":
        x, _ = datasets.make_swiss_roll(n_samples=n, noise=noise, random_state=seed)
    elif name == "gmm":
        rng = np.random.default_rng(seed)
        component = rng.integers(0, GMM_MODES, size=n)
        x = GMM_CENTRES[component] + math.hypot(GMM_STD, noise) * rng.standard_normal((n, 2))
    else:  # pragma: no cover - guarded by toy_dim
        raise ValueError(name)
    return np.asarray(x, dtype=np.float64)


def make_toy(name: str, n: int, noise: float = 0.05, seed: int = 0) -> np.ndarray:
    """Draw ``n`` standardised points of toy ``name``; a pure function of ``(name, n, noise, seed)``.

    Args:
        name: moons | circles | blobs | swiss_roll | gmm (see the module table).
        n: number of points, >= 1.
        noise: standard deviation of the Gaussian noise in raw units, >= 0 (SPEC section 3 uses 0.05).
        seed: integer seed (scikit-learn ``random_state`` / numpy ``default_rng``).
    Returns:
        float64 array ``[n, d]`` (d = 2, or 3 for swiss_roll), standardised with the fixed
        constants in :data:`TOY_STANDARDISATION` (roughly zero mean, unit variance per axis).
    Raises:
        ValueError: unknown toy, ``n < 1``, negative or non-finite noise.
    """
    toy_dim(name)
    if int(n) < 1:
        raise ValueError(f"number of toy samples must be >= 1, got {n}")
    if not math.isfinite(noise) or noise < 0:
        raise ValueError(f"toy noise must be a finite number >= 0, got {noise}")
    raw = _raw_toy(name, int(n), float(noise), int(seed))
    centre, scale = TOY_STANDARDISATION[name]
    return (raw - np.asarray(centre)) / np.asarray(scale)
