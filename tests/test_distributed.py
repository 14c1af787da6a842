"""Two gloo processes on CPU under each launcher: torchrun-style variables, SLURM variables, and
Lightning's own launcher (``devices=2``). See tests/ddp_worker.py for what each rank runs."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, TOY_ARGS, run_cli

WORKER = str(ROOT / "tests" / "ddp_worker.py")
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
               "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_env(kind: str, rank: int, port: int) -> dict:
    """The environment a launcher gives rank ``rank`` of a 2-process job on one node."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    if kind == "torchrun":
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", GROUP_RANK="0",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCHELASTIC_RUN_ID="sims-test")
    elif kind == "slurm":
        env.update(SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NODEID="0", SLURM_NTASKS="2",
                   SLURM_NTASKS_PER_NODE="2", SLURM_NNODES="1", SLURM_NODELIST="127.0.0.1", SLURM_JOB_ID="4242",
                   SLURM_JOB_NAME="sims-test", MASTER_PORT=str(port))
    return env


def launch(kind: str, *cmd: str, timeout: int = 600) -> list:
    """Run ``python cmd...`` as a 2-process job started by ``kind`` (torchrun | slurm)."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, *cmd], cwd=ROOT, env=launcher_env(kind, r, port),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    return outs


def lightning_launch(*cmd: str, timeout: int = 600) -> str:
    """Run ``python cmd...`` in a plain process whose Lightning launcher starts the second one."""
    env = launcher_env("none", 0, 0)
    proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def one_process_fit(tmp_path_factory):
    """The same global batch in one process: two micro-batches of 32 accumulated per step, drawing
    slice 0's and slice 1's (seed, slice, step) noise — what ranks 0 and 1 draw in the 2-process job."""
    sys.path.insert(0, str(ROOT / "tests"))
    from ddp_worker import train_toy

    from sims.dist import single_process

    sigmas, module = train_toy(single_process(), tmp_path_factory.mktemp("one"))
    return sigmas, module.net.state_dict(), module.ema.module.state_dict()


@pytest.mark.parametrize("kind", ["torchrun", "slurm", "lightning"])
def test_ranks_draw_their_own_noise_and_match_one_process(kind, tmp_path, one_process_fit):
    out = tmp_path / "job"
    if kind == "lightning":
        lightning_launch(WORKER, "fit", str(out), "--launcher-devices", "2")
    else:
        launch(kind, WORKER, "fit", str(out))
    r0, r1 = (torch.load(out / f"rank{r}.pt") for r in (0, 1))
    assert r0["world"] == r1["world"] == 2 and r0["launcher"] == r1["launcher"] == kind
    # within every step the two ranks draw different sigma (and noise) for their halves of the batch
    assert len(r0["sigmas"]) == len(r1["sigmas"]) == 6
    for s0, s1 in zip(r0["sigmas"], r1["sigmas"]):
        assert not torch.allclose(s0, s1)
    # after training both ranks hold bit-identical live and EMA weights ...
    for key in ("net", "ema"):
        for name in r0[key]:
            assert torch.equal(r0[key][name], r1[key][name]), (key, name)
    # ... equal to one process that drew rank 0's and rank 1's noise for the two halves
    sigmas, net, ema = one_process_fit
    assert all(torch.equal(a, b) for a, b in zip(sigmas[0::2], r0["sigmas"]))
    assert all(torch.equal(a, b) for a, b in zip(sigmas[1::2], r1["sigmas"]))
    for ref, got in ((net, r0["net"]), (ema, r0["ema"])):
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], rtol=0, atol=1e-6)


def test_evaluation_with_a_rank_without_batch_equals_one_process(tmp_path):
    sys.path.insert(0, str(ROOT / "tests"))
    from ddp_worker import evaluate_one_batch

    from sims.dist import single_process

    launch("torchrun", WORKER, "eval", str(tmp_path / "job"))
    one = evaluate_one_batch(single_process(), tmp_path / "one")
    for rank in (0, 1):
        got = json.loads((tmp_path / "job" / f"eval_rank{rank}.json").read_text())
        assert got["world"] == 2 and got["num_samples"] == 30
        for k in ("fd", "fd_mean_term", "precision", "recall", "nfe"):
            assert got[k] == pytest.approx(one[k], rel=1e-9, abs=1e-12), k


SIMS_TOY = [*TOY_ARGS, "sims.enabled=true", "sims.num_synthetic=512", "sims.aux_kimg=2.56", "sims.omegas=[0,1]",
            "sims.selection_num_samples=200", "sims.selection_seed_offsets=[0]", "sims.report_num_samples=200",
            "sims.report_seed_offsets=[20000]", "train.accelerator=cpu", "train.batch_gpu=128", "sampler.batch_size=128"]


@pytest.fixture(scope="module")
def base_done(tmp_path_factory):
    """A toy run whose base model is complete (one process)."""
    run = tmp_path_factory.mktemp("base") / "run"
    run_cli("sims.cli.train", *TOY_ARGS, "train.batch_gpu=128", f"run_dir={run}", "train.accelerator=cpu")
    return run


@pytest.mark.parametrize("kind", ["torchrun", "slurm"])
def test_stages_after_a_completed_base_run_on_both_ranks(kind, tmp_path, base_done):
    run = tmp_path / "run"
    shutil.copytree(base_done, run)
    out = launch(kind, "-m", "sims.cli.train", *SIMS_TOY, f"run_dir={run}")
    assert "rank 1 outside" not in "".join(out)
    shards = sorted((run / "synthetic").glob("shard_*.npz"))
    writers, seeds = [], []
    for p in shards:
        with np.load(p) as z:
            writers.append(int(z["writer_rank"]))
            seeds.extend(int(s) for s in z["seeds"])
    assert set(writers) == {0, 1}  # each rank wrote its share ...
    assert sorted(seeds) == list(range(1_000_000, 1_000_512))  # ... and nothing twice
    report = json.loads((run / "eval/report.json").read_text())
    assert report["base"]["fd_per_set"] and (run / "aux/DONE").exists()
    # the same stages in one process give the same report (numbers from identical weights and seeds)
    one = tmp_path / "one"
    shutil.copytree(base_done, one)
    run_cli("sims.cli.train", *SIMS_TOY, f"run_dir={one}")
    ref = json.loads((one / "eval/report.json").read_text())
    assert report["best_omega"] == ref["best_omega"]
    np.testing.assert_allclose(report["base"]["fd_per_set"], ref["base"]["fd_per_set"], rtol=1e-6)
    np.testing.assert_allclose(report["sims"]["fd_per_set"], ref["sims"]["fd_per_set"], rtol=1e-4)


LOOP_TOY = ["configs/loop/toy2d.yaml", "train.total_kimg=2.56", "train.batch_size=128", "train.batch_gpu=64",
            "network.hidden_dim=32", "network.num_layers=1", "train.ckpt_every_kimg=1.28", "sampler.num_steps=6",
            "sims.num_synthetic=256", "sims.aux_kimg=1.28", "loop.generations=2", "loop.num_real=300",
            "loop.num_synthetic=300", "data.num_samples=1000", "loop.workflows=[accumulate]", "loop.methods=[sims]",
            "train.accelerator=cpu", "loop.num_eval=200"]


def test_loop_under_two_processes_gives_the_metrics_of_one(tmp_path):
    lightning_launch("-m", "sims.cli.train", *LOOP_TOY, f"run_dir={tmp_path / 'two'}", "train.devices=2")
    run_cli("sims.cli.train", *LOOP_TOY, f"run_dir={tmp_path / 'one'}")
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())["series"]["accumulate"]["sims"]
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())["series"]["accumulate"]["sims"]
    for metric in ("fd", "precision", "recall"):
        np.testing.assert_allclose(two[metric]["mean"], one[metric]["mean"], rtol=1e-3, atol=1e-6, err_msg=metric)
    # rank 1 wrote nothing of its own: one synthetic file per generation
    assert sorted(p.name for p in (tmp_path / "two" / "synthetic").glob("**/*.npz")) == ["gen001.npz", "gen002.npz"]
