"""The generation loop with the diffusion model (loop.model=diffusion) on a 2-D toy (2 processes: test_distributed.py)."""
import csv
import json
import pytest


from conftest import run_cli

LOOP_TOY = ["configs/loop/toy2d.yaml", "train.total_kimg=5.12", "train.batch_size=128", "network.hidden_dim=32",
            "network.num_layers=1", "train.ckpt_every_kimg=2.56", "sampler.num_steps=6", "sims.num_synthetic=256",
            "sims.aux_kimg=1.28", "loop.generations=2", "loop.num_real=300", "loop.num_synthetic=300",
            "data.num_samples=1000"]


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_diffusion_loop_standard_vs_sims(tmp_path):
    run = tmp_path / "loop"
    run_cli("sims.cli.train", *LOOP_TOY, "loop.num_eval=200", f"run_dir={run}")
    rows = _rows(run / "metrics.csv")
    per_seed = [r for r in rows if r["seed"] == "0"]
    assert {(r["workflow"], r["method"], r["generation"]) for r in per_seed} == {
        (w, m, g) for w in ("replace", "accumulate") for m in ("standard", "sims") for g in ("1", "2")}
    for r in per_seed:
        assert float(r["fd"]) > 0 and 0 <= float(r["precision"]) <= 1 and 0 <= float(r["recall"]) <= 1
    sizes = {(r["workflow"], r["generation"]): int(r["train_size"]) for r in per_seed}
    assert sizes[("replace", "2")] == 300 and sizes[("accumulate", "2")] == 600
    # generation 1 trains on the same data with the same seed for every workflow and method: one base model;
    # generation 2 has four different training sets: four more.
    bases = [p for p in (run / "models" / "_bases").iterdir() if (p / "DONE").exists()]
    assert len(bases) == 5
    assert (run / "plots" / "fd.png").exists() and json.loads((run / "metrics.json").read_text())["num_eval"] == 200
    # a sample figure per generation and stream (generation 1 shared by the workflows)
    figures = sorted(str(p.relative_to(run / "samples")) for p in (run / "samples").glob("**/*.png"))
    assert figures == sorted([f"_shared/{m}/seed0/gen001.png" for m in ("standard", "sims")]
                             + [f"{w}/{m}/seed0/gen002.png" for w in ("replace", "accumulate") for m in ("standard", "sims")])
    # SIMS streams fine-tuned an auxiliary model in every generation
    assert len(list((run / "models").glob("**/aux/ema.safetensors"))) == 3  # gen 1 shared + gen 2 x 2 workflows
    # a re-run of a finished loop does no work and changes nothing
    before = (run / "metrics.csv").read_text()
    run_cli("sims.cli.train", *LOOP_TOY, "loop.num_eval=200", f"run_dir={run}")
    assert (run / "metrics.csv").read_text() == before


@pytest.mark.parametrize("aux_data", ["synthetic", "both"])
def test_what_the_auxiliary_sees(tmp_path, aux_data):
    run = tmp_path / "loop"
    run_cli("sims.cli.train", *LOOP_TOY, "loop.workflows=[accumulate]", "loop.methods=[sims]",
            f"loop.aux_data={aux_data}", "train.total_kimg=1.28", f"run_dir={run}")
    gen1 = json.loads((run / "models/_shared/sims/seed0/gen001/aux_data.json").read_text())
    gen2 = json.loads((run / "models/accumulate/sims/seed0/gen002/aux_data.json").read_text())
    # generation 1 trains on real data only: its auxiliary learns from the base's own samples
    assert gen1 == {"requested": aux_data, "used": "own", "own": 256, "pollution": 0, "pollution_generations": []}
    # generation 2: the pollution (generation 1's 300 synthetic samples in the training set), and the own samples too
    assert gen2["used"] == aux_data and gen2["pollution"] == 300 and gen2["pollution_generations"] == [1]
    assert gen2["own"] == (256 if aux_data == "both" else 0)
    assert (run / "models/accumulate/sims/seed0/gen002/synthetic").exists() == (aux_data == "both")
