"""FID at scale: reference statistics and ``sims-fid`` sharded over 2 gloo processes on the CPU give
one process's numbers (issue 13, item 3).

- ``build_reference`` in a 2-process job started with torchrun-style variables
  (tests/fid_worker.py) vs the same call in this process, including uneven shards and a rank
  with no batch;
- ``sims-fid RUN --devices 2`` (Lightning's launcher starts the second process) vs ``--devices 1``;
- ``sims-fid FOLDER --devices 2`` on a sims-sample folder of an odd number of files, read in
  batches so that rank 1 gets fewer batches than rank 0, vs ``--devices 1``.

The features of each batch are the same in both jobs (the same batches are formed): gathered
features, counts and precision/recall agree exactly, μ and Σ to 1e-9 relative (the float64 moment
sums are added in another order: Σ differs by ~1e-14), and FD to 1e-6 relative: with fewer samples
than feature dimensions Σ1Σ2 is singular, and the square roots of its round-off eigenvalues move FD
by ~1e-8 relative (seen: 1.6e-9 for 100 samples in 128-d).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DIGITS_ARGS, ROOT

LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
               "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")
RTOL = 1e-9  # μ, Σ: the same features, float64 sums added in another order
FD_RTOL = 1e-6  # FD: √ of round-off eigenvalues of the singular Σ1Σ2 (N < D) moves it by ~1e-8 relative
# Two Adam steps are enough: the samples need not be good, only the same in both jobs.
TINY_DIGITS = [*DIGITS_ARGS, "train.batch_size=16", "train.total_kimg=0.032", "train.ckpt_every_kimg=0.032",
               "train.lr_rampup_kimg=0.016", "train.grid_seeds=4", "sampler.num_steps=4"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _plain_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", WANDB_MODE="disabled", **extra)
    return env


def _torchrun(*cmd: str, timeout: int = 300) -> None:
    """``python cmd...`` as ranks 0 and 1 of a one-node job, with the variables torchrun sets."""
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, *cmd], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=_plain_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                                        LOCAL_WORLD_SIZE="2", GROUP_RANK="0", MASTER_ADDR="127.0.0.1",
                                                        MASTER_PORT=str(port), TORCHELASTIC_RUN_ID="sims-fid-test"))
             for r in range(2)]
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]


def _fid_two_processes(*args: str) -> dict:
    """``sims-fid ARGS --devices 2 --accelerator cpu`` in a subprocess (Lightning's launcher starts rank 1)."""
    proc = subprocess.run([sys.executable, "-m", "sims.cli.fid", *args, "--devices", "2", "--accelerator", "cpu"],
                          cwd=ROOT, env=_plain_env(), capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, proc.stdout[-2000:]  # printed by rank 0 only
    return json.loads(lines[0])


def _fid_one_process(tmp: Path, *args: str) -> dict:
    """``sims-fid ARGS --devices 1`` in this process (no launcher: one process)."""
    from sims.cli.fid import main

    out = tmp / "one.json"
    assert main([*args, "--devices", "1", "--accelerator", "cpu", "--json", str(out)]) == 0
    return json.loads(out.read_text())


def _assert_same_result(two: dict, one: dict) -> None:
    assert two.keys() == one.keys()
    for key, a in one.items():
        b = two[key]
        if isinstance(a, float) and key not in ("precision", "recall"):
            assert b == pytest.approx(a, rel=FD_RTOL, abs=1e-12), (key, a, b)
        else:  # counts, precision/recall (k-NN set membership of the gathered features), provenance
            assert b == a, (key, a, b)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_digits_run(tmp_path_factory):
    """A digits run of two steps: ``sims-train`` called in this process (saves a start-up)."""
    from sims.cli.train import main as train

    run = tmp_path_factory.mktemp("fidscale") / "run"
    assert train([*TINY_DIGITS, f"run_dir={run}"]) == 0
    assert (run / "base" / "ema.safetensors").is_file()
    return run


@pytest.fixture(scope="module")
def digits_ref(tmp_path_factory):
    """The digits data set's statistics in digits features (``sims-fid --ref-data --save-ref``, one process)."""
    from sims.cli.fid import main

    ref = tmp_path_factory.mktemp("fidref") / "digits-ref.npz"
    assert main(["--ref-data", "configs/digits.yaml", "--save-ref", str(ref), "--accelerator", "cpu"]) == 0
    return ref


def test_sharded_reference_statistics_equal_one_process(tmp_path):
    sys.path.insert(0, str(ROOT / "tests"))
    from fid_worker import compute_references

    from sims.dist import single_process

    _torchrun(str(ROOT / "tests" / "fid_worker.py"), "reference", str(tmp_path))
    two = torch.load(tmp_path / "reference.pt", weights_only=False)
    one = compute_references(single_process())
    assert two.keys() == one.keys() == {"digits", "identity", "small"}
    for case in one:
        a, b = one[case], two[case]
        assert b["world"] == 2 and a["world"] == 1
        assert b["count"] == a["count"] == (100 if case == "small" else 1797), case
        assert b["pr_size"] == a["pr_size"] and b["has_manifold"] and a["has_manifold"]
        assert b["real_features"].shape == a["real_features"].shape == (a["pr_size"], 128 if case == "digits" else 64)
        assert torch.equal(b["real_features"], a["real_features"]), case  # the same batches, one thread each
        torch.testing.assert_close(b["mu"], a["mu"], rtol=RTOL, atol=1e-12)
        torch.testing.assert_close(b["sigma"], a["sigma"], rtol=RTOL, atol=1e-12)
    # the sharded moments are those of all the data, not of one rank's shard
    from fid_worker import reference_cases

    from sims.data.images import quantize

    flat = quantize(reference_cases()["identity"][1].data).reshape(1797, 64).double()
    np.testing.assert_allclose(two["identity"]["mu"].numpy(), flat.mean(0).numpy(), rtol=1e-9)


def test_sims_fid_run_two_processes_equal_one(tiny_digits_run, tmp_path):
    # --ref-data: the reference is built sharded as well, and precision/recall (the 100 samples
    # against the k-NN manifold of the 1,797 digits) uses features gathered from both ranks
    args = (str(tiny_digits_run), "--seeds", "0-99", "--ref-data", "configs/digits.yaml", "--batch", "30")
    two = _fid_two_processes(*args)  # 4 batches of generation: 30+30 on rank 0, 30+10 on rank 1
    one = _fid_one_process(tmp_path, *args)
    assert one["num_samples"] == two["num_samples"] == 100 and one["fd"] > 0
    assert one["nfe"] == two["nfe"] == 7.0  # Heun, 4 steps
    assert one["pr_size"] == two["pr_size"] == 100 and one["precision"] is not None
    _assert_same_result(two, one)


def test_sims_fid_odd_folder_two_processes_equal_one(tiny_digits_run, digits_ref, tmp_path):
    from sims.cli.sample import main as sample

    folder = tmp_path / "samples"
    assert sample([str(tiny_digits_run), "--seeds", "0-44", "--out", str(folder), "--accelerator", "cpu"]) == 0
    assert len(list(folder.glob("*.png"))) == 45
    # batches of 10: 5 batches (the last of 5 files); rank 0 reads 3 of them, rank 1 only 2
    two = _fid_two_processes(str(folder), "--ref", str(digits_ref), "--batch", "10")
    one = _fid_one_process(tmp_path, str(folder), "--ref", str(digits_ref), "--batch", "10")
    assert one["num_samples"] == two["num_samples"] == 45 and one["fd"] > 0
    assert one["reference"] == str(digits_ref) and one["precision"] is None  # --ref: statistics only
    _assert_same_result(two, one)
    # the folder's PNGs are the run's samples: sims-fid on the run with the same seeds gives the same FD
    run = _fid_one_process(tmp_path, str(tiny_digits_run), "--seeds", "0-44", "--ref", str(digits_ref))
    assert run["num_samples"] == 45 and run["fd"] == pytest.approx(one["fd"], rel=1e-6)
