"""Generation-loop driver, workflows and the "Collapse or Thrive?" toy settings (SPEC section 3)."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sims.cli.compare import main as compare_main
from sims.config import ConfigError, load_config
from sims.data.workflows import (
    WORKFLOWS,
    SamplePool,
    WorkflowError,
    check_real_available,
    compose,
    required_real,
)
from sims.loop import (
    ConfigMismatchError,
    LoopError,
    derive_seed,
    read_metrics_csv,
    register_model,
    run_loop,
    series,
)
from sims.toy.gaussian import (
    GaussianMLE,
    accumulate_mean_error_limit,
    expected_replace_mean_error,
    fit_gaussian_mle,
    sims_guided_gaussian,
)

from sims.loop.registry import _REGISTRY

ROOT = Path(__file__).resolve().parents[1]


def _cfg(*overrides: str, config: str = "configs/loop/gaussian.yaml"):
    return load_config(ROOT / config, ["run_dir=unused", *overrides])


def _gauss(*overrides: str):
    return _cfg("loop.dim=3", "loop.num_real=20", "loop.num_synthetic=20", "loop.generations=4", "loop.seeds=[0,1,2]",
                *overrides)


def _final(rows, workflow, metric, method="standard"):
    return series(rows, metric)[(workflow, method)]


# ------------------------------------------------------------------------------------ workflows


@pytest.mark.parametrize("workflow", WORKFLOWS)
def test_compose_sizes_shares_and_no_duplicates(workflow):
    n_r, n_s = 10, 7
    for t in range(1, 7):
        ts = compose(workflow, t, num_real=n_r, num_synthetic=n_s, seed=derive_seed(0, "subsample", workflow, t))
        assert len(np.unique(ts.real)) == ts.num_real
        assert len({tuple(r) for r in ts.synthetic}) == ts.num_synthetic
        assert all(1 <= g < t for g in ts.synthetic_generations)
        if t == 1:  # generation 1 always trains on the first n_r real samples
            assert np.array_equal(ts.real, np.arange(n_r)) and ts.num_synthetic == 0
            continue
        expected = {
            "replace": (0, n_s, (t - 1,)),
            "accumulate": (n_r, (t - 1) * n_s, tuple(range(1, t))),
            "fresh": (n_r, n_s, (t - 1,)),
            "augment": (n_r, n_s, (t - 1,)),
        }
        if workflow == "accumulate-subsample":
            assert ts.size == n_r  # fixed size m = n_r every generation
            assert set(ts.real) <= set(range(n_r))
        else:
            k, m, gens = expected[workflow]
            assert (ts.num_real, ts.num_synthetic, ts.synthetic_generations) == (k, m, gens)
            assert ts.real_fraction == pytest.approx(k / (k + m))


def test_accumulate_subsample_fixed_size_reproducible_and_generation_specific():
    n_r, n_s = 20, 20
    subsets = []
    for t in range(2, 8):
        a = compose("accumulate-subsample", t, num_real=n_r, num_synthetic=n_s, seed=derive_seed(3, "subsample", "a", t))
        b = compose("accumulate-subsample", t, num_real=n_r, num_synthetic=n_s, seed=derive_seed(3, "subsample", "a", t))
        assert a.size == n_r and np.array_equal(a.synthetic, b.synthetic) and np.array_equal(a.real, b.real)
        pool = compose("accumulate", t, num_real=n_r, num_synthetic=n_s)
        assert {tuple(r) for r in a.synthetic} <= {tuple(r) for r in pool.synthetic}
        subsets.append(a)
    # the real share falls as synthetic data accumulates; draws differ between generations
    assert subsets[-1].real_fraction < 0.5 < subsets[0].real_fraction + 0.3
    assert not np.array_equal(subsets[-1].synthetic, subsets[-2].synthetic)
    ts = compose("accumulate-subsample", 5, num_real=20, num_synthetic=20, seed=1, subsample_size=33)
    assert ts.size == 33
    with pytest.raises(WorkflowError, match="exceeds the pool"):
        compose("accumulate-subsample", 2, num_real=20, num_synthetic=20, seed=1, subsample_size=41)


def test_fresh_real_blocks_disjoint_across_generations():
    n_r, G = 15, 6
    seen = set()
    for t in range(1, G + 1):
        real = set(compose("fresh", t, num_real=n_r, num_synthetic=4).real.tolist())
        assert len(real) == n_r and not (real & seen)
        seen |= real
    assert seen == set(range(required_real("fresh", G, n_r)))


def test_workflow_errors():
    with pytest.raises(WorkflowError, match="unknown workflow 'bogus'.*replace, accumulate, accumulate-subsample, fresh"):
        compose("bogus", 1, num_real=1, num_synthetic=1)
    with pytest.raises(WorkflowError, match=r"needs 5 generations x 100 fresh real samples = 500.*only 300"):
        check_real_available(["replace", "fresh"], 5, 100, 300)
    assert check_real_available(["replace", "accumulate"], 5, 100, 300) == 100
    with pytest.raises(WorkflowError, match="positive integer"):
        compose("replace", 0, num_real=1, num_synthetic=1)


def test_sample_pool_views_and_per_seed_subsets():
    rng = np.random.default_rng(0)
    real = rng.standard_normal((3, 5, 2))
    pool = SamplePool(real, num_synthetic=4, generations=4, keep_history=True)
    syn = {g: rng.standard_normal((3, 4, 2)) for g in (1, 2, 3)}
    for g, x in syn.items():
        pool.add(g, x)
    ts = compose("accumulate", 4, num_real=5, num_synthetic=4)
    td = pool.training_data([ts] * 3, key="k")
    arr = np.asarray(td)
    assert arr.shape == (3, 5 + 12, 2) and len(td) == 17
    assert np.array_equal(arr, np.concatenate([real, syn[1], syn[2], syn[3]], axis=1))
    assert all(np.shares_memory(a, pool._buf) for _, a in td.parts)  # views, not copies
    assert [k[1:] for k, _ in td.parts] == [("real", 0, 5), ("syn", 1), ("syn", 2), ("syn", 3)]
    sets = [compose("accumulate-subsample", 4, num_real=5, num_synthetic=4, seed=s) for s in (1, 2, 3)]
    sub = pool.training_data(sets)
    assert sub.parts[0][0] is None and np.asarray(sub).shape == (3, 5, 2)
    for i, ts in enumerate(sets):
        expected = [real[i, j] for j in ts.real] + [syn[g][i, j] for g, j in ts.synthetic]
        assert np.array_equal(np.asarray(sub)[i], np.array(expected))
    latest = SamplePool(real, num_synthetic=4, generations=4, keep_history=False)
    latest.add(1, syn[1])
    latest.add(2, syn[2])
    with pytest.raises(WorkflowError, match=r"generation\(s\) \[1\] are not in the pool"):
        latest.training_data([compose("accumulate", 3, num_real=5, num_synthetic=4)] * 3)


def test_derive_seed_is_pure_and_key_sensitive():
    assert derive_seed(5, "sample", 3) == derive_seed(5, "sample", 3)
    values = {derive_seed(5, "sample", 3), derive_seed(5, "sample", 4), derive_seed(6, "sample", 3),
              derive_seed(5, "fit", 3), derive_seed(5, "subsample", "replace", 3)}
    assert len(values) == 5 and all(0 <= v < 2**32 for v in values)


# ------------------------------------------------------------------------------------ Gaussian


def test_gaussian_parts_fit_matches_direct_and_cache_is_exact():
    rng = np.random.default_rng(1)
    real = rng.standard_normal((4, 30, 3)) + 2.0
    pool = SamplePool(real, 10, 3, True)
    pool.add(1, rng.standard_normal((4, 10, 3)))
    pool.add(2, rng.standard_normal((4, 10, 3)) * 3)
    ts = compose("accumulate", 3, num_real=30, num_synthetic=10)
    mu, cov = fit_gaussian_mle(np.asarray(pool.training_data([ts] * 4)))
    direct = np.asarray(pool.training_data([ts] * 4))
    ref_cov = np.stack([np.cov(x, rowvar=False, bias=True) for x in direct])
    np.testing.assert_allclose(cov, ref_cov, rtol=1e-12)
    warm = GaussianMLE(3)
    warm.fit(pool.training_data([compose("accumulate", 2, num_real=30, num_synthetic=10)] * 4, key="s"),
             generation=2, seed=[0] * 4, workdir=None)
    warm.fit(pool.training_data([ts] * 4, key="s"), generation=3, seed=[0] * 4, workdir=None)
    cold = GaussianMLE(3)
    cold.fit(pool.training_data([ts] * 4, key="s"), generation=3, seed=[0] * 4, workdir=None)
    assert np.array_equal(warm.mu, cold.mu) and np.array_equal(warm.cov, cold.cov)
    np.testing.assert_allclose(cold.mu, direct.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(cold.cov, ref_cov, rtol=1e-12)


def test_sims_guided_gaussian_closed_form():
    mu_r, cov_r = np.array([[0.5]]), np.array([[[1.0]]])
    mu_s, cov_s = np.array([[0.3]]), np.array([[[0.8]]])
    mu, cov = sims_guided_gaussian(mu_r, cov_r, mu_s, cov_s, 1.0)
    prec = 2 / 1.0 - 1 / 0.8  # (1 + w)/var_r - w/var_s
    assert cov[0, 0, 0] == pytest.approx(1 / prec)
    assert mu[0, 0] == pytest.approx((2 * 0.5 / 1.0 - 0.3 / 0.8) / prec)
    mu0, cov0 = sims_guided_gaussian(mu_r, cov_r, mu_s, cov_s, 0.0)
    assert np.array_equal(mu0, mu_r) and np.array_equal(cov0, cov_r)
    with pytest.raises(ValueError, match=">= 0"):
        sims_guided_gaussian(mu_r, cov_r, mu_s, cov_s, -0.5)


def test_gaussian_collapse_theory(tmp_path):
    """d=5, n=100, 40 generations, 100 seeds (Kazdan, Schaeffer et al. 2025; Gerstgrasser et al. 2024)."""
    d, n, G = 5, 100, 40
    cfg = _cfg(f"loop.dim={d}", f"loop.num_real={n}", f"loop.num_synthetic={n}", f"loop.generations={G}",
               "loop.seeds=" + json.dumps(list(range(100))))
    rows = run_loop(cfg, tmp_path / "run", plots=False).rows
    rep = _final(rows, "replace", "mean_sq_error")
    acc = _final(rows, "accumulate", "mean_sq_error")
    sub = _final(rows, "accumulate-subsample", "mean_sq_error")
    # generation 1 is shared by every workflow
    assert rep["per_seed"][:, 0].tolist() == acc["per_seed"][:, 0].tolist() == sub["per_seed"][:, 0].tolist()
    # replace: E||mu_t||^2 = (d/n) sum_k ((n-1)/n)^k ~ t d/n, growing linearly
    for t in (10, 20, 40):
        assert rep["mean"][t - 1] == pytest.approx(expected_replace_mean_error(t, d, n), rel=0.2)
        assert 0.7 * t * d / n < rep["mean"][t - 1] < 1.1 * t * d / n
    assert rep["mean"][39] > 3 * rep["mean"][9] > 0
    det_rep = _final(rows, "replace", "det_ratio")["per_seed"][:, -1]
    det_acc = _final(rows, "accumulate", "det_ratio")["per_seed"][:, -1]
    assert np.median(det_rep) < 0.01 and 0.6 < np.mean(det_acc) < 1.4
    # accumulate: bounded by (pi^2/6) d/n
    assert acc["mean"][-1] == pytest.approx(float(accumulate_mean_error_limit(d, n)), rel=0.2)
    assert acc["mean"][-1] < acc["mean"][0] * np.pi**2 / 6 * 1.25
    # accumulate-subsample in between
    assert acc["mean"][-1] < sub["mean"][-1] < rep["mean"][-1]


def test_gaussian_seed_results_do_not_depend_on_the_batch(tmp_path):
    a = run_loop(_gauss("loop.seeds=[0,1,2,3]"), tmp_path / "a", plots=False).rows
    b = run_loop(_gauss("loop.seeds=[2]"), tmp_path / "b", plots=False).rows
    pick = lambda rows: [r for r in rows if r["seed"] == 2]  # noqa: E731
    assert pick(a) == pick(b) and len(pick(a)) == 3 * 4


# ------------------------------------------------------------------------------------ KDE


def test_kde_replace_diverges_more_than_accumulate(tmp_path):
    cfg = _cfg("loop.num_real=50", "loop.num_synthetic=50", "loop.generations=12", "loop.seeds=[0,1,2]",
               "loop.workflows=[replace,accumulate]", config="configs/loop/kde.yaml")
    rows = run_loop(cfg, tmp_path / "kde", plots=False).rows
    rep = _final(rows, "replace", "test_nll")["mean"]
    acc = _final(rows, "accumulate", "test_nll")["mean"]
    assert rep[0] == acc[0]
    assert rep[-1] - rep[0] > 2 * (acc[-1] - acc[0]) + 0.3


# ------------------------------------------------------------------------------------ resume


class _Crash(RuntimeError):
    pass


def _crash_at(phase, generation, workflow=None, seed=None):
    def hook(info):
        if (info.phase == phase and info.generation == generation and workflow in (None, info.workflow)
                and seed in (None, info.seeds[0])):
            raise _Crash(f"simulated kill at {phase} of generation {generation}")
    return hook


@pytest.mark.parametrize("phase", ["fit", "sample", "evaluate", "record"])
def test_resume_after_crash_gives_identical_metrics_gaussian(tmp_path, phase):
    cfg = _gauss("loop.workflows=[replace,accumulate,accumulate-subsample]", "loop.methods=[standard,sims]",
                 "loop.omega=0.5")
    ref = run_loop(cfg, tmp_path / "ref", plots=False)
    with pytest.raises(_Crash):
        run_loop(cfg, tmp_path / "run", hooks=_crash_at(phase, 2, "accumulate"), plots=False)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["completed"]["replace/standard/0"] == 4 and not manifest["finished"]
    assert manifest["completed"]["accumulate/standard/0"] == (2 if phase == "record" else 1)
    res = run_loop(cfg, tmp_path / "run", plots=False)
    assert (tmp_path / "run" / "metrics.csv").read_text() == (tmp_path / "ref" / "metrics.csv").read_text()
    assert res.rows == ref.rows


def test_resume_after_crash_gives_identical_metrics_kde(tmp_path):
    cfg = _cfg("loop.num_real=30", "loop.num_synthetic=30", "loop.generations=4", "loop.seeds=[0,1]",
               "loop.workflows=[accumulate,accumulate-subsample]", config="configs/loop/kde.yaml")
    run_loop(cfg, tmp_path / "ref", plots=False)
    with pytest.raises(_Crash):
        run_loop(cfg, tmp_path / "run", hooks=_crash_at("fit", 2, "accumulate-subsample", seed=1), plots=False)
    run_loop(cfg, tmp_path / "run", plots=False)
    assert (tmp_path / "run" / "metrics.csv").read_text() == (tmp_path / "ref" / "metrics.csv").read_text()


def test_resume_after_sigkill_in_subprocess(tmp_path):
    overrides = ["loop.dim=3", "loop.num_real=20", "loop.num_synthetic=20", "loop.generations=4", "loop.seeds=[0,1]"]
    script = (
        "import os, signal, sys\n"
        "from sims.config import ConfigError, load_config\nfrom sims.loop import run_loop\n"
        "cfg = load_config(sys.argv[1], ['run_dir=' + sys.argv[2]] + sys.argv[4:])\n"
        "def hook(info):\n"
        "    if sys.argv[3] == 'kill' and info.phase == 'sample' and info.generation == 2 and info.workflow == 'accumulate':\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "run_loop(cfg, hooks=hook, plots=False)\n"
    )
    run = lambda d, mode: subprocess.run(  # noqa: E731
        [sys.executable, "-c", script, str(ROOT / "configs/loop/gaussian.yaml"), str(d), mode, *overrides],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    killed = run(tmp_path / "run", "kill")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (tmp_path / "run" / "metrics.csv").exists()
    resumed = run(tmp_path / "run", "none")
    assert resumed.returncode == 0, resumed.stderr
    ref = run_loop(load_config(ROOT / "configs/loop/gaussian.yaml", ["run_dir=x", *overrides]), tmp_path / "ref", plots=False)
    assert read_metrics_csv(tmp_path / "run" / "metrics.csv") == ref.rows


def test_rerun_of_finished_run_changes_nothing(tmp_path):
    cfg = _gauss()
    first = run_loop(cfg, tmp_path / "r", plots=False)
    units = sorted(p.stat().st_mtime_ns for p in (tmp_path / "r" / "units").rglob("*.json"))
    again = run_loop(cfg, tmp_path / "r", plots=False)
    assert again.rows == first.rows
    assert sorted(p.stat().st_mtime_ns for p in (tmp_path / "r" / "units").rglob("*.json")) == units


# ------------------------------------------------------------------------------------ errors


def test_config_mismatch_is_refused(tmp_path):
    run_loop(_gauss(), tmp_path / "r", plots=False)
    with pytest.raises(ConfigMismatchError, match=r"loop.num_real: 20 \(run dir\) vs 21 \(now\).*new run_dir or delete"):
        run_loop(_gauss("loop.num_real=21"), tmp_path / "r", plots=False)
    # cosmetic keys and config sections the toy model does not use do not matter
    run_loop(_gauss("train.progress_bar=false", "network.hidden_dim=7"), tmp_path / "r", plots=False)


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (["loop.workflows=[replace,bogus]"], LoopError, "unknown workflow 'bogus'; choose one of: replace, accumulate"),
        (["loop.methods=[bogus]"], LoopError, "unknown method 'bogus'; choose one of: standard, sims"),
        (["loop.model=kde", "loop.methods=[standard,sims]"], LoopError, "does not support method 'sims'"),
        (["loop.model=diffusion", "loop.methods=[standard,sims]"], ConfigError, "loop.omega"),
        (["loop.model=diffusion", "loop.num_real=5000"], LoopError, "real data set has only 1797"),
        (["loop.model=vae"], LoopError, "unknown loop.model 'vae'"),
        (["loop.generations=0"], LoopError, "loop.generations must be a positive integer"),
        (["loop.seeds=[1,1]"], LoopError, "duplicates"),
    ],
)
def test_bad_settings_fail_before_writing(tmp_path, overrides, error, match):
    with pytest.raises(error, match=match):
        run_loop(_gauss(*overrides), tmp_path / "r")
    assert not (tmp_path / "r").exists()


class _FiniteModel:
    """A per-seed model over a finite real data set (like digits): records the driver's calls."""

    batched = False
    supported_methods = ("standard",)
    num_real_available = 120

    def __init__(self):
        self.calls = []
        self.data = np.arange(120, dtype=np.float64)[:, None]

    def real_data(self, num, *, seed):
        if num > 120:
            raise ValueError("too many")
        return self.data[np.random.default_rng(seed).permutation(120)[:num]]

    def fit(self, train_data, *, generation, seed, workdir, previous=None, method="standard"):
        self.calls.append((generation, seed, Path(workdir), previous))
        self.mean = float(np.asarray(train_data).mean())

    def sample(self, num, *, seed):
        return self.mean + np.random.default_rng(seed).standard_normal((num, 1))

    def evaluate(self, samples, *, seed):
        return {"fd": abs(float(samples.mean()) - 59.5), "extra_metric": 1.0}


def test_finite_real_data_and_registered_model(tmp_path, monkeypatch):
    monkeypatch.setitem(_REGISTRY, "diffusion", _REGISTRY["gaussian"])  # restored after the test
    model = _FiniteModel()
    register_model("diffusion", lambda cfg, ctx: model)
    cfg = _gauss("loop.model=diffusion", "loop.workflows=[replace,fresh]", "loop.num_real=50",
                 "loop.num_synthetic=10", "loop.generations=3", "loop.seeds=[4]", "loop.init=previous")
    with pytest.raises(LoopError, match=r"'fresh' needs 3 generations x 50 fresh real samples = 150.*only 120"):
        run_loop(cfg, tmp_path / "r")
    cfg = _gauss("loop.model=diffusion", "loop.workflows=[replace,fresh]", "loop.num_real=40",
                 "loop.num_synthetic=10", "loop.generations=3", "loop.seeds=[4]", "loop.init=previous")
    res = run_loop(cfg, tmp_path / "r", plots=False)
    runs = tmp_path / "r"
    shared = runs / "models" / "_shared" / "standard" / "seed4" / "gen001"
    assert [c[2] for c in model.calls] == [shared, runs / "models/replace/standard/seed4/gen002",
                                           runs / "models/replace/standard/seed4/gen003", shared,
                                           runs / "models/fresh/standard/seed4/gen002", runs / "models/fresh/standard/seed4/gen003"]
    assert [c[3] for c in model.calls] == [None, shared, runs / "models/replace/standard/seed4/gen002",
                                           None, shared, runs / "models/fresh/standard/seed4/gen002"]
    assert model.calls[0][1] == model.calls[3][1] == derive_seed(4, "fit", 1)
    header = (runs / "metrics.csv").read_text().splitlines()[0]
    assert header == "generation,workflow,method,seed,train_size,real_fraction,fd,extra_metric"
    fresh = [r for r in res.rows if r["workflow"] == "fresh" and r["seed"] == 4]
    assert [(r["train_size"], r["real_fraction"]) for r in fresh] == [(40, 1.0), (50, 0.8), (50, 0.8)]


class _EvalRecorder(_FiniteModel):
    def __init__(self):
        super().__init__()
        self.evaluated = []

    def evaluate(self, samples, *, seed):
        self.evaluated.append(np.array(samples))
        return super().evaluate(samples, seed=seed)


def test_num_eval_draws_its_own_samples_for_the_metrics(tmp_path, monkeypatch):
    monkeypatch.setitem(_REGISTRY, "diffusion", _REGISTRY["gaussian"])
    model = _EvalRecorder()
    register_model("diffusion", lambda cfg, ctx: model)
    args = ("loop.model=diffusion", "loop.workflows=[accumulate]", "loop.num_real=40", "loop.num_synthetic=10",
            "loop.generations=2", "loop.seeds=[4]")
    run_loop(_gauss(*args), tmp_path / "default", plots=False)
    syn = [np.load(p)["samples"][0] for p in sorted((tmp_path / "default" / "synthetic").glob("**/*.npz"))]
    assert [e.shape for e in model.evaluated] == [(10, 1), (10, 1)]  # default: the synthetic data itself
    assert all(np.array_equal(a, b) for a, b in zip(model.evaluated, syn))
    model.evaluated.clear()
    res = run_loop(_gauss(*args, "loop.num_eval=25"), tmp_path / "r", plots=False)
    assert [e.shape for e in model.evaluated] == [(25, 1), (25, 1)]
    # the evaluation samples have their own seed: not the synthetic data the next generation trains on
    assert not np.allclose(model.evaluated[0][:10], syn[0])
    assert json.loads(res.metrics_json.read_text())["num_eval"] == 25
    with pytest.raises(LoopError, match="loop.num_eval must be a positive integer"):
        run_loop(_gauss(*args, "loop.num_eval=0"), tmp_path / "bad")


# ------------------------------------------------------------------------------------ outputs


def test_outputs_and_compare(tmp_path, capsys):
    res_a = run_loop(_gauss(), tmp_path / "a")
    run_loop(_gauss("loop.sampling_bias=0.8"), tmp_path / "b", plots=False)
    rows = read_metrics_csv(res_a.metrics_csv)
    assert rows == res_a.rows
    seeds = {r["seed"] for r in rows}
    assert seeds == {0, 1, 2, "mean", "std", "ci95"}
    mean = [r for r in rows if r["seed"] == "mean" and r["workflow"] == "replace" and r["generation"] == 4][0]
    per = [r["mean_sq_error"] for r in rows if r["workflow"] == "replace" and r["generation"] == 4 and r["seed"] in (0, 1, 2)]
    assert mean["mean_sq_error"] == pytest.approx(np.mean(per))
    ci = [r for r in rows if r["seed"] == "ci95" and r["workflow"] == "replace" and r["generation"] == 4][0]
    assert ci["mean_sq_error"] == pytest.approx(4.302653 * np.std(per, ddof=1) / np.sqrt(3), rel=1e-5)
    assert sorted(p.name for p in res_a.plots) == ["det_ratio.png", "mean_sq_error.png", "trace_ratio.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in res_a.plots)
    js = json.loads(res_a.metrics_json.read_text())
    assert js["series"]["accumulate"]["standard"]["mean_sq_error"]["generation"] == [1, 2, 3, 4]
    assert js["training_sets"]["accumulate"]["train_size"] == [20, 40, 60, 80]

    assert compare_main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "cmp"),
                         "--metric", "mean_sq_error"]) == 0
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| a | replace | standard | 3 | 1 |" in table and "| b | accumulate-subsample | standard | 3 | 1 |" in table
    assert (tmp_path / "cmp" / "mean_sq_error.png").is_file()
    assert compare_main([str(tmp_path / "a"), "--out", str(tmp_path / "cmp2"), "--metric", "fd"]) == 2
    assert "available: mean_sq_error, det_ratio, trace_ratio" in capsys.readouterr().err
    assert compare_main([str(tmp_path / "nope"), "--out", str(tmp_path / "cmp3")]) == 2
