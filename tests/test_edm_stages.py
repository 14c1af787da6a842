"""EDM's networks through the project's commands, end to end on CPU (issue 10's smoke tests).

* ``sims-import edm`` on each shipped fixture (EDM's own classes, random weights; see
  ``tests/fixtures/edm/README.md``), then :func:`sims.load_denoiser` on what it wrote, reproduces EDM's
  recorded output ``D``.
* The imported DDPM++ is the base of the SIMS stages (synthetic set, auxiliary fine-tune, guided
  evaluation) on the real digits at 16×16 repeated to RGB — the fixture's data shape.
* A small class-conditional ADM goes through base training, synthetic generation (its labels kept),
  the auxiliary fine-tune and the guided evaluation.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import sims
from conftest import run_cli
from sims.data.store import SyntheticStore
from sims.training.export import read_metadata, weights_sha256

FIXTURES = Path(__file__).parent / "fixtures" / "edm"
# small SIMS stages: 64 synthetic samples, 8 auxiliary steps of 32, ω ∈ {0, 0.5}, sets of 64, 4 Heun steps
SMALL_SIMS = ["sims.enabled=true", "sims.num_synthetic=64", "sims.aux_kimg=0.256", "train.batch_size=32",
              "sims.omegas=[0,0.5]", "sims.selection_num_samples=64", "sims.selection_seed_offsets=[0,5000]",
              "sims.report_num_samples=64", "sims.report_seed_offsets=[20000,30000,40000]", "sampler.num_steps=4",
              "sampler.batch_size=64", "sims.aux_snapshot_every_kimg=null", "train.progress_bar=false",
              "train.grid_seeds=16"]
ENV = {"OMP_NUM_THREADS": "1"}


def _import(name: str, out: Path) -> Path:
    run_cli("sims.cli.import_edm", "edm", str(FIXTURES / f"{name}.pkl"), "--out", str(out), env=ENV)
    return out


@pytest.fixture(scope="module")
def imported_ddpmpp(tmp_path_factory):
    return _import("ddpmpp_small16", tmp_path_factory.mktemp("import") / "ddpmpp")


@pytest.mark.parametrize("name", ["ddpmpp_small16", "adm_small16"])
def test_sims_import_then_load_denoiser_reproduces_edm(name, tmp_path, imported_ddpmpp):
    run = imported_ddpmpp if name == "ddpmpp_small16" else _import(name, tmp_path / name)
    assert (run / "base" / "DONE").is_file() and json.loads((run / "IMPORT.json").read_text())["sha256"]
    ref = np.load(FIXTURES / f"{name}.io.npz")
    labels = torch.from_numpy(ref["labels"]) if ref["labels"].size else None
    D_ref = torch.from_numpy(ref["D"])
    for path in (run, run / "base" / "ema.safetensors"):  # the run directory and the weights file
        denoiser = sims.load_denoiser(path)
        with torch.no_grad():
            D = denoiser(torch.from_numpy(ref["x"]), torch.from_numpy(ref["sigma"]), labels)
        err = (D - D_ref).abs().max().item()
        assert err <= 1e-5 * max(1.0, D_ref.abs().max().item()), f"{name} via {path.name}: max |D - D_EDM| = {err:.3g}"


def test_imported_edm_ddpmpp_is_the_base_of_the_sims_stages_on_rgb_digits(imported_ddpmpp, tmp_path):
    run = tmp_path / "run"
    run_cli("sims.cli.train", "configs/digits.yaml", f"run_dir={run}", "data.resolution=16", "data.channels=3",
            f"sims.base={imported_ddpmpp}", *SMALL_SIMS, env=ENV)
    source = imported_ddpmpp / "base" / "ema.safetensors"
    # the base is the imported network, unchanged, with its import record (config's network section unused)
    assert weights_sha256(run / "base" / "ema.safetensors") == weights_sha256(source)
    record = json.loads((run / "base" / "SOURCE.json").read_text())
    assert record["import"]["sha256"] == json.loads((imported_ddpmpp / "IMPORT.json").read_text())["sha256"]
    aux_meta = read_metadata(run / "aux" / "ema.safetensors")
    assert aux_meta["network"] == read_metadata(source)["network"] and aux_meta["data_shape"] == [3, 16, 16]
    assert aux_meta["base_sha256"] == weights_sha256(source)
    synthetic = SyntheticStore(run / "synthetic").load(0)
    assert len(synthetic) == 64 and tuple(synthetic.data.shape[1:]) == (3, 16, 16)
    report = json.loads((run / "eval" / "report.json").read_text())
    assert sorted(c["omega"] for c in report["selection"]) == [0.0, 0.5]  # the guided cells were evaluated
    assert all(np.isfinite(c["fd_mean"]) for c in report["selection"]) and len(report["base"]["fd_per_set"]) == 3
    assert all(r["base_sha256"] == weights_sha256(source) for r in report["rows"])  # every figure names its base
    guided = sims.load_denoiser(run, omega=0.5)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = guided(x, 1.0)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_conditional_adm_through_base_synthetic_aux_and_guided_evaluation(tmp_path):
    from sims.diffusion.sampler import SeedNoise

    run = tmp_path / "adm"
    run_cli("sims.cli.train", "configs/digits.yaml", f"run_dir={run}", "data.use_labels=true", "network.arch=adm",
            "network.model_channels=32", "network.channel_mult=[1,2]", "network.num_blocks=1",
            "network.attn_resolutions=[4]", "network.channels_per_head=16", "train.total_kimg=0.64",
            "train.ckpt_every_kimg=0.32", "train.lr_rampup_kimg=0.32", *SMALL_SIMS, env=ENV)
    meta = read_metadata(run / "base" / "ema.safetensors")
    assert meta["network"]["arch"] == "adm" and int(meta["label_dim"]) == 10
    # synthetic generation keeps each seed's class: the label drawn by the sampler's per-seed stream
    store = SyntheticStore(run / "synthetic")
    seeds = sorted(store.stored_seeds())
    synthetic = store.load(10)
    noise = SeedNoise(seeds)
    noise.randn(1, 8, 8)
    drawn = noise.randint(10)
    assert torch.equal(synthetic.labels, drawn)  # class indices [N] (items carry them one-hot)
    assert len(set(drawn.tolist())) > 5  # the classes vary
    # the auxiliary model is the base's conditional ADM, fine-tuned on those (image, class) pairs
    aux_meta = read_metadata(run / "aux" / "ema.safetensors")
    assert aux_meta["network"] == meta["network"] and int(aux_meta["label_dim"]) == 10
    guided = sims.load_denoiser(run, omega=0.5)
    labels = torch.nn.functional.one_hot(torch.tensor([3, 7]), 10).float()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        a, b = guided(x, 1.0, labels), guided(x, 1.0, labels.flip(0))
    assert torch.isfinite(a).all() and not torch.allclose(a, b)  # the class changes the guided output
    report = json.loads((run / "eval" / "report.json").read_text())
    assert sorted(c["omega"] for c in report["selection"]) == [0.0, 0.5] and report["label_dim"] == 10
