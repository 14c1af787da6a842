import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "disabled")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def run_cli(*args, check=True, timeout=600, env=None):
    """Run a console entry point (``python -m sims.cli.X``) in a subprocess and return it."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for a whole test module (``pytestmark = pytest.mark.usefixtures(
    "one_torch_thread")``), restored afterwards: for tiny nets and bitwise comparisons one thread is as
    fast, matches subprocesses run with OMP_NUM_THREADS=1, and is immune to OpenMP spin-waits on shared
    cores (2 threads were measured 10-30x slower under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# A toy run small enough for CI: 2-D moons, a small MLP, 60 steps.
TOY_ARGS = ["configs/toy2d.yaml", "train.total_kimg=15.36", "train.batch_size=256", "network.hidden_dim=64",
            "network.num_layers=2", "train.progress_bar=false", "data.num_samples=2000", "train.ckpt_every_kimg=2.56",
            "sampler.num_steps=8"]
# A digits run small enough for CI: a 2-level DDPM++ with 16 channels, 30 steps.
DIGITS_ARGS = ["configs/digits.yaml", "train.total_kimg=1.92", "train.batch_size=64", "network.model_channels=16",
               "network.num_blocks=1", "train.progress_bar=false", "train.ckpt_every_kimg=0.64", "sampler.num_steps=6",
               "train.grid_seeds=16", "train.lr_rampup_kimg=0.64", "sims.enabled=false"]
