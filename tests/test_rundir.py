"""The run directory: its lock (one job at a time) and pre-emption by SIGTERM (checkpoint, exit, resume)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, TOY_ARGS, run_cli
from sims.errors import RunDirLockedError
from sims.stages.rundir import LOCK_NAME, STALE_S, RunDirLock


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lock_refuses_a_second_job_and_takes_over_dead_or_stale_ones(tmp_path):
    lock = RunDirLock(tmp_path).acquire()
    with pytest.raises(RunDirLockedError, match=rf"in use by pid {os.getpid()} on host {socket.gethostname()}"):
        RunDirLock(tmp_path).acquire()
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()
    # a lock left by a dead process of this host is taken over
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(),
                                                 "started": time.time(), "heartbeat": time.time()}))
    RunDirLock(tmp_path).acquire().release()
    # another host's: refused while its heartbeat is fresh, taken over once stale, or with force
    other = {"pid": 1, "host": "elsewhere", "started": time.time()}
    (tmp_path / LOCK_NAME).write_text(json.dumps({**other, "heartbeat": time.time()}))
    with pytest.raises(RunDirLockedError, match="pid 1 on host elsewhere.*--force-unlock"):
        RunDirLock(tmp_path).acquire()
    RunDirLock(tmp_path).acquire(force=True).release()
    (tmp_path / LOCK_NAME).write_text(json.dumps({**other, "heartbeat": time.time() - STALE_S - 1}))
    RunDirLock(tmp_path).acquire().release()


def test_sims_train_refuses_a_locked_run_dir_and_readers_do_not_lock(tmp_path):
    run = tmp_path / "run"
    run_cli("sims.cli.train", *TOY_ARGS, "train.total_kimg=2.56", f"run_dir={run}")
    lock = RunDirLock(run).acquire()  # this (live) process plays the other job
    try:
        proc = run_cli("sims.cli.train", *TOY_ARGS, "train.total_kimg=2.56", f"run_dir={run}", check=False)
        assert proc.returncode == 2 and f"in use by pid {os.getpid()}" in proc.stderr
        run_cli("sims.cli.sample", str(run), "--seeds", "0-3", "--out", str(tmp_path / "s"))  # a reader: not refused
    finally:
        lock.release()


def test_sigterm_saves_a_checkpoint_exits_75_and_the_rerun_finishes_identically(tmp_path):
    # 400 steps, checkpoints every 100: the signal (sent once the first checkpoint exists) must land before the
    # end. With 40 steps and a checkpoint at 20 a fast machine (~100 steps/s) finished in the 0.2 s between the
    # checkpoint and the signal (CI, stop 20: step 40).
    args = [*TOY_ARGS, "train.total_kimg=102.4", "train.ckpt_every_kimg=25.6"]
    ref = tmp_path / "ref"
    run_cli("sims.cli.train", *args, f"run_dir={ref}")
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "sims.cli.train", *args, f"run_dir={run}"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first_ckpt = run / "base" / "checkpoints" / "last.ckpt"  # training is under way (handlers installed)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not first_ckpt.exists():
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-2000:]
    assert "stopped by a signal at step" in err and "re-run the same command" in err
    step = torch.load(run / "base/checkpoints/last.ckpt", map_location="cpu", weights_only=False)["global_step"]
    assert 100 <= step < 400 and not (run / "base" / "DONE").exists()
    run_cli("sims.cli.train", *args, f"run_dir={run}")
    a, b = load_file(str(ref / "base/ema.safetensors")), load_file(str(run / "base/ema.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
