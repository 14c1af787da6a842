"""The Gaussian toy of the generation loop: the debiased SIMS analogue, its stability over 100
generations, the noise cache, and the loop driver's mechanisms for cheap models (in-memory
synthetic data replayed on resume, batched records, vectorised seeds)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from sims.config import load_config
from sims.loop import run_loop, series
from sims.loop.driver import _SeedCache, derive_seeds
from sims.toy.gaussian import (
    GaussianMLE,
    GuidedPrecisionError,
    NoiseCache,
    _guided_parts,
    debiased_precision,
    expected_replace_trace_ratio,
    expected_sims_replace_trace_ratio,
    fit_gaussian_mle,
    sample_gaussian,
    sample_wishart,
    sims_covariance_inflation,
    sims_guided_gaussian,
)
from sims.utils import derive_seed

ROOT = Path(__file__).resolve().parents[1]


def _cfg(*overrides: str):
    return load_config(ROOT / "configs/loop/gaussian.yaml", ["run_dir=unused", *overrides])


def _spd(rng, d, spread=3.0):
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (q * np.linspace(1.0, spread, d)) @ q.T


# ------------------------------------------------------------------------------ debiasing


@pytest.mark.parametrize("d, n, reps", [(4, 20, 40_000), (10, 100, 6_000)])
def test_debiased_precision_is_unbiased_monte_carlo(d, n, reps):
    """E[(n - d - 2)/n Sigma_hat^-1] = Sigma^-1 (inverse-Wishart mean), while E[Sigma_hat^-1] is
    n/(n - d - 2) Sigma^-1 (+43% at d=4, n=20; +13.6% at d=10, n=100).

    Tolerance: every entry of the Monte-Carlo mean within 5 standard errors of Sigma^-1 (standard
    error = replicate std / sqrt(reps)), and the mean of tr(Sigma Pi)/d within 1%.
    """
    rng = np.random.default_rng(7)
    cov = _spd(rng, d)
    chol = np.linalg.cholesky(cov)
    x = 0.5 + rng.standard_normal((reps, n, d)) @ chol.T
    _, cov_hat = fit_gaussian_mle(x)
    prec = debiased_precision(cov_hat, n)
    target = np.linalg.inv(cov)
    se = prec.std(axis=0, ddof=1) / np.sqrt(reps)
    assert np.all(np.abs(prec.mean(axis=0) - target) < 5 * se)
    ratio = np.einsum("ij,sji->s", cov, prec) / d  # tr(Sigma Pi)/d, 1 in expectation
    assert ratio.mean() == pytest.approx(1.0, abs=0.01)
    plain = np.einsum("ij,sji->s", cov, np.linalg.inv(cov_hat)) / d
    assert plain.mean() == pytest.approx(n / (n - d - 2), rel=0.01)  # the bias the correction removes
    assert plain.mean() - 1 > 10 * abs(ratio.mean() - 1)


def test_debiased_precision_needs_more_than_d_plus_2_samples():
    with pytest.raises(ValueError, match=r"more than d \+ 2 = 5 samples, got 5"):
        debiased_precision(np.eye(3)[None], 5)
    np.testing.assert_allclose(debiased_precision(2 * np.eye(3)[None], 10), np.eye(3)[None] * 0.5 * 5 / 10)


def test_sims_guided_gaussian_debiased_closed_form():
    mu_r, cov_r = np.array([[0.5, -1.0]]), np.array([[[1.0, 0.2], [0.2, 2.0]]])
    mu_s, cov_s = np.array([[0.3, -0.8]]), np.array([[[0.9, 0.1], [0.1, 1.5]]])
    w, n_s = 0.5, 40
    pi_s = (n_s - 4) / n_s * np.linalg.inv(cov_s[0])
    prec = (1 + w) * np.linalg.inv(cov_r[0]) - w * pi_s
    eta = (1 + w) * np.linalg.solve(cov_r[0], mu_r[0]) - w * pi_s @ mu_s[0]
    mu, cov = sims_guided_gaussian(mu_r, cov_r, mu_s, cov_s, w, aux_size=n_s)
    np.testing.assert_allclose(cov[0], np.linalg.inv(prec), rtol=1e-12)
    np.testing.assert_allclose(mu[0], np.linalg.solve(prec, eta), rtol=1e-12)
    # without aux_size: the plain (biased) inverse, as before
    _, cov_p = sims_guided_gaussian(mu_r, cov_r, mu_s, cov_s, w)
    np.testing.assert_allclose(np.linalg.inv(cov_p[0]), (1 + w) * np.linalg.inv(cov_r[0]) - w * np.linalg.inv(cov_s[0]))


# ------------------------------------------------------------------------------ not positive definite


def test_non_positive_definite_guided_precision_raises():
    """An auxiliary narrower than w/(1+w) x the base in a direction makes P indefinite: an error
    naming the batch position, never a clipped covariance."""
    mu = np.zeros((3, 2))
    cov_r = np.stack([np.eye(2)] * 3)
    cov_s = np.stack([np.eye(2), np.diag([1.0, 0.3]), np.eye(2) * 0.9])  # seed 1: 0.3 < 1/(1+1) = 0.5
    with pytest.raises(GuidedPrecisionError, match=r"not positive definite at w = 1.0 for 1 of 3 seeds "
                                                    r"\(batch positions \[1\].*lower loop.omega") as info:
        sims_guided_gaussian(mu, cov_r, mu, cov_s, 1.0)
    assert info.value.indices == (1,)
    assert isinstance(info.value, ValueError)  # a LoopError: one line from the CLIs
    # exactly singular (0.5 = w/(1+w)) counts as not positive definite too
    with pytest.raises(GuidedPrecisionError):
        sims_guided_gaussian(mu[:1], cov_r[:1], mu[:1], np.diag([1.0, 0.5])[None], 1.0)
    _, cov_ok = sims_guided_gaussian(mu[[0, 2]], cov_r[[0, 2]], mu[[0, 2]], cov_s[[0, 2]], 1.0)
    assert np.all(np.isfinite(cov_ok)) and np.all(np.linalg.eigvalsh(cov_ok) > 0)


def test_loop_model_flags_non_positive_definite_seeds_and_falls_back_to_the_base(caplog):
    """The loop model does not stop a 50-seed run for one improper seed: that seed samples its base
    model this generation, a WARNING is logged and the metric guidance_skipped is 1 for it."""
    d, n_aux, seeds = 3, 8, list(range(40))
    rng = np.random.default_rng(0)
    data = rng.standard_normal((len(seeds), 30, d))
    base = GaussianMLE(d)
    base.fit(data, generation=2, seed=seeds, workdir=None)
    model = GaussianMLE(d, guidance=3.0, aux_size=n_aux)  # w/(1+w) = 0.75: often violated with 8 samples
    with caplog.at_level(logging.WARNING, logger="sims.toy.gaussian"):
        model.fit(data, generation=2, seed=seeds, workdir=None, method="sims")
    skipped = model.evaluate(None, seed=seeds)["guidance_skipped"]
    bad = np.flatnonzero(skipped == 1)
    assert 0 < bad.size < len(seeds) and set(np.unique(skipped)) == {0.0, 1.0}
    assert "not positive definite for" in caplog.text and "generation 2" in caplog.text
    np.testing.assert_array_equal(model.cov[bad], base.cov[bad])
    np.testing.assert_array_equal(model.mu[bad], base.mu[bad])
    good = np.flatnonzero(skipped == 0)
    aux = sample_gaussian(base.mu, base.cov, n_aux, seeds)
    mu_s, cov_s = fit_gaussian_mle(aux)
    mu_g, cov_g = sims_guided_gaussian(base.mu[good], base.cov[good], mu_s[good], cov_s[good], 3.0, aux_size=n_aux)
    np.testing.assert_allclose(model.cov[good], cov_g, rtol=1e-12)
    np.testing.assert_allclose(model.mu[good], mu_g, rtol=1e-12, atol=1e-14)
    with pytest.raises(GuidedPrecisionError):
        sims_guided_gaussian(base.mu, base.cov, mu_s, cov_s, 3.0, aux_size=n_aux)
    # standard fits report no such metric; sims needs n_s > d + 2
    base.fit(data, generation=2, seed=seeds, workdir=None)
    assert "guidance_skipped" not in base.evaluate(None, seed=seeds)
    with pytest.raises(ValueError, match=r"loop.num_synthetic > loop.dim \+ 2 = 5"):
        GaussianMLE(d, guidance=0.5, aux_size=5).fit(data, generation=1, seed=seeds, workdir=None, method="sims")


# ------------------------------------------------------------------------------ inflation theory


def test_wishart_sampler_moments():
    w = sample_wishart(4, 12, 40_000, np.random.default_rng(3))
    np.testing.assert_allclose(w.mean(axis=0), 12 * np.eye(4), atol=0.1)
    # Var(W_ii) = 2 m, Var(W_ij) = m for W ~ W_d(I, m)
    assert w[:, 1, 1].var() == pytest.approx(24, rel=0.05) and w[:, 0, 2].var() == pytest.approx(12, rel=0.05)


def test_sims_covariance_inflation_second_order_and_direct_simulation():
    """kappa (the guided covariance's mean over the base's) matches its second-order expansion for
    small w, and a direct simulation of base -> n_s samples -> auxiliary -> guided Gaussian."""
    d, n_s = 10, 100
    a = n_s - d - 2
    kappa, se = sims_covariance_inflation(0.1, n_s, d, draws=40_000)
    second = 1 + 0.1**2 * ((d + 1) * a + 2) / ((a + 1) * (a - 2))
    assert kappa == pytest.approx(second, abs=5 * se + 2e-4)  # O(w^3) ~ 1e-4 left out
    d, n_s, w, reps = 4, 40, 0.5, 30_000
    kappa, se = sims_covariance_inflation(w, n_s, d, draws=100_000)
    assert kappa > 1 + 0.25 * ((d + 1) * (n_s - 6) + 2) / ((n_s - 5) * (n_s - 8))  # higher orders add to it
    rng = np.random.default_rng(11)
    cov_r = np.stack([_spd(rng, d)] * reps)
    mu_r = np.tile(rng.standard_normal(d), (reps, 1))
    aux = sample_gaussian(mu_r, cov_r, n_s, list(range(reps)))
    mu_s, cov_s = fit_gaussian_mle(aux)
    _, cov_g, ok, _, _ = _guided_parts(mu_r, cov_r, mu_s, cov_s, w, n_s, 1e-12)
    assert ok.mean() > 0.99  # kappa is conditional on a proper guided Gaussian, as here (0.13% are not)
    cov_g, cov_r = cov_g[ok], cov_r[ok]
    reps = int(ok.sum())
    ratio = np.trace(cov_g, axis1=1, axis2=2) / np.trace(cov_r[0])
    assert ratio.mean() == pytest.approx(kappa, abs=5 * ratio.std() / np.sqrt(reps) + 5 * se)
    # E[guided cov] = kappa Sigma_r, not just its trace
    np.testing.assert_allclose(cov_g.mean(axis=0), kappa * cov_r[0], atol=0.03 * np.abs(cov_r[0]).max())


# ------------------------------------------------------------------------------ stability


def test_sims_analogue_is_stable_over_100_generations(tmp_path):
    """d = 10, n = 100, w = 0.5, 50 seeds, 100 generations (the benchmark's setting).

    Before the debiasing the replace trace ratio reached 7.7e4 at t = 100 (accumulate 2.1e6). Now the
    replace/sims seed mean must be within a factor 3 of the theory E tr G_t / d = (kappa (n-1)/n)^t
    (~22 at t = 100; the spread over 50 seeds of this heavy-tailed quantity is about +-45%), accumulate/
    sims must stay below 1.6 (it grows like t^(kappa - 1)), and improper guided Gaussians must be rare.
    """
    n, w, G = 100, 0.5, 100
    cfg = _cfg(f"loop.num_real={n}", f"loop.num_synthetic={n}", f"loop.generations={G}",
               "loop.seeds=" + json.dumps(list(range(50))), "loop.workflows=[replace,accumulate]",
               "loop.methods=[standard,sims]", f"loop.omega={w}")
    rows = run_loop(cfg, tmp_path / "run", plots=False).rows
    tr = series(rows, "trace_ratio")
    kappa, _ = sims_covariance_inflation(w, n, 10, draws=50_000)
    theory = expected_sims_replace_trace_ratio(np.arange(1, G + 1), n, kappa)
    rep = tr[("replace", "sims")]["mean"]
    for t in (10, 50, 100):
        assert theory[t - 1] / 3 < rep[t - 1] < 3 * theory[t - 1], (t, rep[t - 1], theory[t - 1])
    assert rep[-1] < 100  # the biased analogue: ~7.7e4
    acc = tr[("accumulate", "sims")]["mean"]
    assert np.all(acc < 1.6) and acc[-1] > tr[("accumulate", "standard")]["mean"][-1]
    std = tr[("replace", "standard")]["mean"]
    assert std[-1] == pytest.approx(expected_replace_trace_ratio(G, n), rel=0.15)
    skipped = series(rows, "guidance_skipped")
    assert set(skipped) == {("replace", "sims"), ("accumulate", "sims")}
    total = sum(s["per_seed"].sum() for s in skipped.values())
    assert total <= 4  # ~1.3e-5 per seed-generation: expected 0.13 per stream, 1 seen (seed 44, t = 87)


# ------------------------------------------------------------------------------ noise cache


def test_noise_cache_returns_the_same_numbers_and_respects_its_size():
    rng = np.random.default_rng(0)
    mu, cov = rng.standard_normal((3, 4)), np.stack([_spd(rng, 4) for _ in range(3)])
    seeds = [5, 9, 2**31 + 7]
    direct = sample_gaussian(mu, cov, 50, seeds, scale=0.8)
    cache = NoiseCache(max_bytes=3 * 50 * 4 * 8)  # room for one batch's draws
    first = sample_gaussian(mu, cov, 50, seeds, scale=0.8, noise=cache)
    again = sample_gaussian(mu, cov, 50, seeds, scale=0.8, noise=cache)
    assert np.array_equal(direct, first) and np.array_equal(direct, again)
    assert cache.nbytes == 3 * 50 * 4 * 8 and len(cache._store) == 1
    # a seed's rows do not depend on its batch; a second batch does not fit and is not kept
    other = sample_gaussian(mu[1:], cov[1:], 50, seeds[1:], scale=0.8, noise=cache)
    assert np.array_equal(other, direct[1:]) and len(cache._store) == 1
    block = cache.get(seeds, 50, 4)
    assert not block.flags.writeable
    with pytest.raises(ValueError):
        block[0, 0, 0] = 1.0
    # larger draws go through the same path (one group per seed)
    big = sample_gaussian(mu, cov, 3000, seeds, noise=NoiseCache())
    assert np.array_equal(big, sample_gaussian(mu, cov, 3000, seeds))


def test_loop_results_do_not_depend_on_the_noise_cache(tmp_path):
    cfg = _cfg("loop.dim=3", "loop.num_real=20", "loop.num_synthetic=20", "loop.generations=5", "loop.seeds=[0,1,2]",
               "loop.methods=[standard,sims]", "loop.omega=0.5")
    a = run_loop(cfg, tmp_path / "a", plots=False).rows
    lp = cfg.loop
    model = GaussianMLE(lp.dim, lp.sampling_bias, lp.omega, lp.num_synthetic, noise_cache_mib=0)
    b = run_loop(cfg, tmp_path / "b", model=model, plots=False).rows
    assert a == b and model.noise.nbytes == 0


# ------------------------------------------------------------------------------ driver mechanisms


def test_recomputed_synthetic_data_is_not_stored_and_a_resume_replays_it(tmp_path):
    """recompute_synthetic: no npz files; a run stopped in the middle of a stream (its records
    flushed on the way out) resumes by replaying and gives the uninterrupted run's metrics."""
    cfg = _cfg("loop.dim=3", "loop.num_real=20", "loop.num_synthetic=20", "loop.generations=6", "loop.seeds=[0,1,2]",
               "loop.workflows=[accumulate,accumulate-subsample]")
    ref = run_loop(cfg, tmp_path / "ref", plots=False)
    assert not (tmp_path / "ref" / "synthetic").exists()

    class Stop(RuntimeError):
        pass

    def hook(info):
        if info.workflow == "accumulate-subsample" and info.generation == 4 and info.phase == "sample":
            raise Stop

    with pytest.raises(Stop):
        run_loop(cfg, tmp_path / "run", hooks=hook, plots=False)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["completed"] == {f"accumulate/standard/{s}": 6 for s in (0, 1, 2)} | {
        f"accumulate-subsample/standard/{s}": 3 for s in (0, 1, 2)}
    assert len(list((tmp_path / "run" / "units").rglob("*.json"))) == 9
    res = run_loop(cfg, tmp_path / "run", plots=False)
    assert res.rows == ref.rows
    assert (tmp_path / "run" / "metrics.csv").read_text() == (tmp_path / "ref" / "metrics.csv").read_text()


def test_derive_seeds_is_bit_identical_to_derive_seed():
    rng = np.random.default_rng(0)
    seeds = list(range(40)) + [int(s) for s in rng.integers(0, 2**32, 60)] + [2**32 - 1, 2**32, 2**45]
    for keys in [("real",), ("eval",), ("eval-sample",), ("fit", 1), ("sample", 100), ("subsample", "accumulate-subsample", 7),
                 (0,), (2**32 - 1, 3), (2**33,), ()]:
        assert derive_seeds(seeds, *keys) == [derive_seed(s, *keys) for s in seeds], keys
    grid = derive_seeds(seeds[:5], "subsample", "replace", range(1, 9))
    assert grid == [derive_seed(s, "subsample", "replace", t) for s in seeds[:5] for t in range(1, 9)]
    cache = _SeedCache(generations=9)
    assert cache(seeds[:5], "fit", 9) == [derive_seed(s, "fit", 9) for s in seeds[:5]]
    assert cache(seeds[:5], "fit", 3) == [derive_seed(s, "fit", 3) for s in seeds[:5]]  # from the same batch
    assert cache(seeds[:5], "fit", 12) == [derive_seed(s, "fit", 12) for s in seeds[:5]]  # beyond G: direct
    with pytest.raises(ValueError, match="negative|>= 0"):
        derive_seeds([-1], "x")
