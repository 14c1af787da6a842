"""SIMS pipeline (SPEC §1): synthetic store, auxiliary fine-tune, guided evaluation, sampling, sims-fid."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import DIGITS_ARGS, TOY_ARGS, run_cli
from sims.data.store import SyntheticStore, fill_store
from sims.metrics import save_npz

SIMS_TOY = [*TOY_ARGS, "sims.enabled=true", "sims.num_synthetic=512", "sims.aux_kimg=5.12", "sims.omegas=[0,0.5,1]",
            "sims.eval_num_samples=300", "sims.eval_seed_offsets=[0,5000]"]


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("sims") / "run"
    proc = run_cli("sims.cli.train", *SIMS_TOY, f"run_dir={run}")
    return run, proc


def test_pipeline_outputs(toy_run):
    run, proc = toy_run
    for f in ["synthetic/manifest.json", "aux/ema.safetensors", "aux/DONE", "eval/report.json", "eval/report.md",
              "eval/fid_vs_omega.png", "eval/grid_base_vs_sims.png", "eval/reference.npz"]:
        assert (run / f).exists(), f
    report = json.loads((run / "eval/report.json").read_text())
    assert {r["omega"] for r in report["results"]} == {0.0, 0.5, 1.0}
    assert {r["seed_offset"] for r in report["results"]} == {0, 5000}
    assert report["best_omega"] in (0.0, 0.5, 1.0)
    assert report["best_fd_mean"] <= report["base_fd_mean"]
    assert report["nfe"] == {"base": 15, "sims": 30}
    assert report["real_resample_fd"]["mean"] > 0
    assert "Finite-sample floor" in (run / "eval/report.md").read_text()
    for r in report["results"]:
        assert r["fd"] >= 0 and 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1
        assert 0 <= r["fd_mean_term"] <= r["fd"] + 1e-9
    manifest = json.loads((run / "synthetic/manifest.json").read_text())
    assert manifest["count"] == 512 and manifest["first_seed"] == 1_000_000
    assert "best omega" in proc.stdout


def test_rerun_is_a_noop_and_store_has_no_duplicates(toy_run):
    run, _ = toy_run
    before = (run / "eval/results.json").read_text()
    again = run_cli("sims.cli.train", *SIMS_TOY, f"run_dir={run}", "sampler.batch_size=77")
    assert "resuming" not in again.stdout and "eval omega" not in again.stdout
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


def test_store_resumes_without_duplicates(tmp_path):
    calls = []

    def make_batch(seeds):
        calls.append(list(seeds))
        return torch.tensor([[float(s), -float(s)] for s in seeds]), None

    store = SyntheticStore(tmp_path / "syn")
    # an interrupted first attempt (batch size 4) left two shards behind
    store.write_shard([0, 1, 2, 3], *make_batch([0, 1, 2, 3]))
    store.write_shard([8, 9, 10, 11], *make_batch([8, 9, 10, 11]))
    calls.clear()
    fill_store(store, range(14), make_batch, batch_size=5, data_shape=(2,))   # resumed with batch size 5
    assert sorted(s for c in calls for s in c) == [4, 5, 6, 7, 12, 13]
    data = store.load()
    assert len(data) == 14
    np.testing.assert_array_equal(data.data[:, 0].numpy(), np.arange(14))
    fill_store(store, range(14), make_batch, batch_size=5, data_shape=(2,))   # complete: nothing to do
    assert len(calls) == 3


def test_seed_sets_must_be_disjoint(tmp_path):
    proc = run_cli("sims.cli.train", *SIMS_TOY, f"run_dir={tmp_path / 'r'}", "sims.synthetic_seed_offset=5100",
                   check=False)
    assert proc.returncode == 2 and "overlap evaluation seeds" in proc.stderr


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
    import lightning as L

    from sims.config import load_config, to_container
    from sims.data import load_real_dataset
    from sims.metrics import IdentityFeatures
    from sims.training.callbacks import FDEvalCallback
    from sims.training.datamodule import ArrayDataModule
    from sims.training.module import EDMModule

    cfg = load_config("configs/toy2d.yaml", [f"run_dir={tmp_path}", "data.num_samples=512", "network.hidden_dim=32",
                                            "network.num_layers=1", "train.batch_size=64"])
    data = load_real_dataset(cfg.data)

    def train(callbacks):
        L.seed_everything(0, verbose=False)
        m = EDMModule(to_container(cfg.network), to_container(cfg.train), (2,), 0)
        t = L.Trainer(max_steps=12, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
        t.fit(m, datamodule=ArrayDataModule(data, 64, 0, total_steps=12))
        return m

    cb = FDEvalCallback(0.256, 64, IdentityFeatures(2), data.data, {"num_steps": 4}, 64)
    with_cb, without = train([cb]), train([])
    assert len(cb.history) == 3 and all(h["fd"] > 0 for h in cb.history)
    for a, b in zip(with_cb.ema.module.parameters(), without.ema.module.parameters()):
        assert torch.equal(a, b)


def test_resample_floor_shrinks_with_sample_count():
    """The finite-sample FD floor is positive, ≈ the Gaussian bias tr-term, and falls as n grows."""
    from sims.evaluation import resample_floor
    from sims.metrics import FeatureStats

    gen = torch.Generator().manual_seed(0)
    real = torch.randn(20000, 8, generator=gen, dtype=torch.float64)
    mu, sigma = FeatureStats(8).update(real).mean_cov()
    small, large = resample_floor(real, mu, sigma, 500), resample_floor(real, mu, sigma, 8000)
    assert 0 < large["mean"] < small["mean"]
    # for N(0, I_d) the mean term alone contributes d/n on average
    assert small["mean"] > 8 / 500 * 0.5
    assert resample_floor(real, mu, sigma, 500) == small  # seeded: reproducible
