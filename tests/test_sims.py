"""SIMS pipeline (SPEC §1): synthetic store, auxiliary fine-tune, guided evaluation, sampling, sims-fid."""
import json
import shutil

import numpy as np
import pytest
import torch

from conftest import DIGITS_ARGS, TOY_ARGS, run_cli
from sims.data.store import SyntheticStore
from sims.dist import single_process
from sims.metrics import save_npz
from sims.stages.synthetic import make_synthetic

SIMS_TOY = [*TOY_ARGS, "sims.enabled=true", "sims.num_synthetic=512", "sims.aux_kimg=5.12", "sims.omegas=[0,0.5,1]",
            "sims.selection_num_samples=300", "sims.selection_seed_offsets=[0,5000]", "sims.report_num_samples=300",
            "sims.report_seed_offsets=[20000,30000,40000]"]


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("sims") / "run"
    proc = run_cli("sims.cli.train", *SIMS_TOY, f"run_dir={run}")
    return run, proc


def test_pipeline_outputs(toy_run):
    run, proc = toy_run
    for f in ["synthetic/manifest.json", "aux/ema.safetensors", "aux/DONE", "eval/report.json", "eval/report.md",
              "eval/fd_vs_omega.png", "eval/grid_base_vs_sims.png", "eval/reference.npz", "eval/results.json"]:
        assert (run / f).exists(), f
    report = json.loads((run / "eval/report.json").read_text())
    results = json.loads((run / "eval/results.json").read_text())
    sel = [r for r in results.values() if r["kind"] == "sel"]
    assert {(r["omega"], r["seed_offset"]) for r in sel} == {(w, o) for w in (0.0, 0.5, 1.0) for o in (0, 5000)}
    # omega is chosen on the selection sets: the lowest mean FD there
    mean_sel = {w: np.mean([r["fd"] for r in sel if r["omega"] == w]) for w in (0.0, 0.5, 1.0)}
    assert report["best_omega"] == min(mean_sel, key=mean_sel.get)
    # and reported on the held-out sets, base and chosen setting on each
    rep = [r for r in results.values() if r["kind"] == "rep"]
    assert sorted({r["seed_offset"] for r in rep}) == report["report_seed_offsets"] == [20000, 30000, 40000]
    assert report["selection_seed_offsets"] == [0, 5000]
    assert report["base"]["fd_per_set"] == [r["fd"] for r in rep if r["omega"] == 0.0]
    assert report["base"]["fd_min"] == min(report["base"]["fd_per_set"])
    assert report["base_fd_mean"] == pytest.approx(np.mean(report["base"]["fd_per_set"]))
    # NFE as counted: 8 Heun steps = 15 evaluations of the base, twice that guided
    assert report["base"]["nfe"] == 15.0
    assert report["sims"]["nfe"] == (30.0 if report["best_omega"] > 0 else 15.0)
    assert report["real_resample_fd"]["mean"] > 0
    text = (run / "eval/report.md").read_text()
    assert "Finite-sample floor" in text and "held-out report sets" in text
    for r in rep:
        assert r["fd"] >= 0 and 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1
        assert 0 <= r["fd_mean_term"] <= r["fd"] + 1e-9
        assert len(r["base_sha256"]) == 64 and r["features"] == "identity" and r["num_samples"] == 300
        assert r["pr_size"] == 300  # equal sizes for precision/recall
    manifest = json.loads((run / "synthetic/manifest.json").read_text())
    assert manifest["count"] == 512 and manifest["first_seed"] == 1_000_000
    assert "report:" in proc.stdout


def test_rerun_is_a_noop_and_store_has_no_duplicates(toy_run):
    run, _ = toy_run
    before = (run / "eval/results.json").read_text()
    again = run_cli("sims.cli.train", *SIMS_TOY, f"run_dir={run}", "sampler.batch_size=77")
    assert "resuming" not in again.stdout and "sel|" not in again.stdout
    assert (run / "eval/results.json").read_text() == before
    data = SyntheticStore(run / "synthetic").load()
    assert len(data) == 512


def test_guided_sampling_and_omega_zero(toy_run, tmp_path):
    run, _ = toy_run
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    run_cli("sims.cli.sample", str(run), "--seeds", "0-19", "--out", str(a))
    run_cli("sims.cli.sample", str(run), "--seeds", "0-19", "--out", str(b), "--guidance", "0")
    run_cli("sims.cli.sample", str(run), "--seeds", "0-19", "--out", str(c), "--guidance", "1.0")
    for s in range(20):
        xa, xb, xc = (np.load(d / f"{s:06d}.npy") for d in (a, b, c))
        assert np.array_equal(xa, xb)
    assert not np.allclose(np.load(a / "000003.npy"), np.load(c / "000003.npy"))
    bad = run_cli("sims.cli.sample", str(run), "--seeds", "0-1", "--out", str(c), "--guidance", "nan", check=False)
    assert bad.returncode == 2 and "omega" in bad.stderr


def test_mismatched_auxiliary_is_refused(toy_run, tmp_path):
    run, _ = toy_run
    other = tmp_path / "other"
    run_cli("sims.cli.train", *TOY_ARGS, f"run_dir={other}", "network.hidden_dim=32")
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    shutil.copy(other / "base/ema.safetensors", broken / "aux/ema.safetensors")
    proc = run_cli("sims.cli.sample", str(broken), "--seeds", "0-1", "--out", str(tmp_path / "s"), "--guidance", "0.5",
                   check=False)
    assert proc.returncode == 2 and "does not match the base model: network" in proc.stderr


def test_a_base_given_as_one_file_of_any_name_is_adopted(toy_run, tmp_path):
    # sims.base may name a weights file (e.g. written by sims-import) as well as a run directory
    from sims.stages.base import adopt_base
    from sims.training.export import read_metadata, weights_sha256

    run, _ = toy_run
    source = tmp_path / "imported" / "my-model.safetensors"
    source.parent.mkdir()
    shutil.copy(run / "base/ema.safetensors", source)
    (tmp_path / "IMPORT.json").write_text(json.dumps({"sha256": "an-unrelated-import"}))  # a folder above it
    meta = read_metadata(source)
    stage = tmp_path / "adopter" / "base"
    weights = adopt_base(single_process(), source, stage, meta["data_shape"], int(meta["label_dim"]))
    assert weights == stage / "ema.safetensors" and weights_sha256(weights) == weights_sha256(source)
    assert sorted(p.name for p in stage.iterdir()) == ["DONE", "SOURCE.json", "ema.safetensors"]
    record = json.loads((stage / "SOURCE.json").read_text())
    assert record["sha256"] == weights_sha256(source) and record["import"] is None


def test_the_import_record_is_kept_only_for_the_weights_it_describes(tmp_path):
    from sims.stages.base import import_record_of

    run = tmp_path / "imported-run"
    (run / "base").mkdir(parents=True)
    (run / "IMPORT.json").write_text(json.dumps({"sha256": "abc", "backbone": "SongUNet"}))
    weights = run / "base" / "ema.safetensors"
    assert import_record_of(weights, {"source_sha256": "abc"}) == {"sha256": "abc", "backbone": "SongUNet"}
    assert import_record_of(weights, {"source_sha256": "other"}) is None  # the record is of another pickle
    assert import_record_of(weights, {}) is None  # trained weights carry no source_sha256
    (run / "loose").mkdir()
    assert import_record_of(run / "loose" / "w.safetensors", {"source_sha256": "abc"}) is None  # not a run's base/


def test_store_resumes_without_duplicates(tmp_path):
    made = []

    def denoiser(x, sigma, labels=None):
        made.append(len(x))
        return torch.zeros_like(x)

    store = SyntheticStore(tmp_path / "syn")
    # an interrupted first attempt (batch size 4) left two shards behind
    store.write_shard([0, 1, 2, 3], torch.zeros(4, 2))
    store.write_shard([8, 9, 10, 11], torch.zeros(4, 2))
    kw = dict(data_shape=(2,), label_dim=0, sampler={"num_steps": 2}, batch_size=5)
    data = make_synthetic(single_process(), denoiser, tmp_path / "syn", range(14), **kw)  # resumed: batch size 5
    assert sum(made) == 3 * 6  # only the 6 missing seeds (4-7, 12, 13), 3 evaluations each
    assert len(data) == 14 and sorted(SyntheticStore(tmp_path / "syn").stored_seeds()) == list(range(14))
    made.clear()
    make_synthetic(single_process(), denoiser, tmp_path / "syn", range(14), **kw)  # complete: nothing to do
    assert made == []


def test_seed_sets_must_be_disjoint(tmp_path):
    proc = run_cli("sims.cli.train", *SIMS_TOY, f"run_dir={tmp_path / 'r'}", "sims.synthetic_seed_offset=5100",
                   check=False)
    assert proc.returncode == 2 and "overlap" in proc.stderr and "sims.synthetic_seed_offset" in proc.stderr


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("digits") / "run"
    run_cli("sims.cli.train", *DIGITS_ARGS, f"run_dir={run}")
    return run


def test_one_and_two_processes_write_identical_pngs(digits_run, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run_cli("sims.cli.sample", str(digits_run), "--seeds", "0-22", "--out", str(one), "--batch", "4",
            "--accelerator", "cpu")
    run_cli("sims.cli.sample", str(digits_run), "--seeds", "0-22", "--out", str(two), "--batch", "4",
            "--devices", "2", "--accelerator", "cpu")
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in two.iterdir()) == [f"{s:06d}.png" for s in range(23)]
    for n in names:
        assert (one / n).read_bytes() == (two / n).read_bytes(), n


def test_sims_fid_folder_and_errors(digits_run, tmp_path):
    out = tmp_path / "s"
    run_cli("sims.cli.sample", str(digits_run), "--seeds", "0-39", "--out", str(out))
    ref = tmp_path / "ref.npz"
    run_cli("sims.cli.fid", "--ref-data", "configs/digits.yaml", "--save-ref", str(ref))
    res = run_cli("sims.cli.fid", str(out), "--ref", str(ref), "--json", str(tmp_path / "r.json"))
    assert json.loads(res.stdout.strip().splitlines()[-1])["num_samples"] == 40
    assert json.loads((tmp_path / "r.json").read_text())["fd"] > 0
    # reference statistics of another feature dimension
    save_npz(tmp_path / "bad.npz", np.zeros(2048), np.eye(2048))
    proc = run_cli("sims.cli.fid", str(out), "--ref", str(tmp_path / "bad.npz"), check=False)
    assert proc.returncode == 2 and "2048" in proc.stderr
    # an empty folder, a partial folder, a corrupt file
    (tmp_path / "empty").mkdir()
    proc = run_cli("sims.cli.fid", str(tmp_path / "empty"), "--ref", str(ref), check=False)
    assert proc.returncode == 2 and "no samples" in proc.stderr
    proc = run_cli("sims.cli.fid", str(out), "--ref", str(ref), "--expect", "50", check=False)
    assert proc.returncode == 2 and "partial: 40 samples, expected 50" in proc.stderr
    (out / "000040.png").write_bytes(b"not a png")
    proc = run_cli("sims.cli.fid", str(out), "--ref", str(ref), check=False)
    assert proc.returncode == 2 and "000040.png" in proc.stderr


def test_fd_callback_does_not_disturb_training(tmp_path):
    from sims.config import load_config, to_container
    from sims.data import load_real_dataset
    from sims.stages.pipeline import fd_callback_evaluator
    from sims.training.callbacks import FDEvalCallback
    from sims.training.fit import fit_stage
    from sims.training.module import EDMModule

    cfg = load_config("configs/toy2d.yaml", [f"run_dir={tmp_path}", "data.num_samples=512", "network.hidden_dim=32",
                                            "network.num_layers=1", "train.batch_size=64", "train.total_kimg=0.768",
                                            "train.eval_num_samples=64", "sampler.num_steps=4"])
    data = load_real_dataset(cfg.data)
    ctx = single_process()

    def train(name, callbacks):
        m = EDMModule(to_container(cfg.network), to_container(cfg.train), (2,), 0)
        fit_stage(ctx, tmp_path / name, m, data, total_kimg=0.768, train=to_container(cfg.train), callbacks=callbacks,
                  progress=False)
        return m

    cb = FDEvalCallback(0.256, fd_callback_evaluator(ctx, cfg, data))
    with_cb, without = train("a", [cb]), train("b", [])
    assert len(cb.history) == 3 and all(h["fd"] > 0 and 0 <= h["precision"] <= 1 for h in cb.history)
    for a, b in zip(with_cb.ema.module.parameters(), without.ema.module.parameters()):
        assert torch.equal(a, b)


def test_resample_floor_shrinks_with_sample_count():
    """The finite-sample FD floor is positive, ≈ the Gaussian bias tr-term, and falls as n grows."""
    from sims.stages.evaluate import resample_floor
    from sims.metrics import FeatureStats

    gen = torch.Generator().manual_seed(0)
    real = torch.randn(20000, 8, generator=gen, dtype=torch.float64)
    mu, sigma = FeatureStats(8).update(real).mean_cov()
    small, large = resample_floor(real, mu, sigma, 500), resample_floor(real, mu, sigma, 8000)
    assert 0 < large["mean"] < small["mean"]
    # for N(0, I_d) the mean term alone contributes d/n on average
    assert small["mean"] > 8 / 500 * 0.5
    assert resample_floor(real, mu, sigma, 500) == small  # seeded: reproducible
