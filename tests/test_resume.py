"""Exact resume: a run killed anywhere and re-run ends where an uninterrupted run would have.

The kills are real (SIGKILL, through ``SIMS_FAULT=point:N``, see :func:`sims.utils.fault_point`) at
deterministic places: just after a checkpoint, between two checkpoints, while a checkpoint is
written, during the synthetic generation, during the auxiliary fine-tune, during the evaluation.
"""
from __future__ import annotations

import json
import signal

import pytest
import torch
from safetensors.torch import load_file

from conftest import TOY_ARGS, run_cli

SIMS_TOY = [*TOY_ARGS, "sims.enabled=true", "sims.num_synthetic=512", "sims.aux_kimg=5.12", "sims.omegas=[0,1]",
            "sims.selection_num_samples=300", "sims.selection_seed_offsets=[0]", "sims.report_num_samples=300",
            "sims.report_seed_offsets=[20000,30000]", "sampler.batch_size=128"]


def _same_weights(a, b):
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = tmp_path_factory.mktemp("ref") / "run"
    run_cli("sims.cli.train", *SIMS_TOY, f"run_dir={run}")
    return run


def _killed(run, fault):
    proc = run_cli("sims.cli.train", *SIMS_TOY, f"run_dir={run}", check=False, env={"SIMS_FAULT": fault})
    assert proc.returncode == -signal.SIGKILL, (fault, proc.stdout[-1500:], proc.stderr[-1500:])
    return proc


def test_killed_anywhere_and_resumed_equals_uninterrupted(tmp_path, reference):
    run = tmp_path / "run"
    ckpt = run / "base" / "checkpoints" / "last.ckpt"
    # (iii) killed while writing its second checkpoint (step 20): the first one (step 10) stays intact
    _killed(run, "ckpt_write:2")
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == 10
    assert list(ckpt.parent.glob(".last.ckpt.*.tmp"))  # the half-written file, never renamed
    # (i) resumed, then killed just after its first checkpoint (step 20)
    proc = _killed(run, "ckpt_saved:1")
    assert "resuming base" in proc.stdout
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == 20
    assert not list(ckpt.parent.glob(".last.ckpt.*.tmp"))
    # (ii) resumed, then killed between two checkpoints (step 20 + 5)
    _killed(run, "train_step:5")
    assert not (run / "base" / "DONE").exists()
    # resumed: the base finishes, then killed during the synthetic generation (after its 2nd shard) ...
    _killed(run, "synthetic_shard:2")
    assert _same_weights(run / "base/ema.safetensors", reference / "base/ema.safetensors")
    assert not (run / "synthetic/manifest.json").exists() and len(list((run / "synthetic").glob("shard_*"))) == 2
    # ... during the auxiliary fine-tune (its step 7) ...
    _killed(run, "train_step:7")
    assert not (run / "aux" / "DONE").exists()
    # ... and during the evaluation (its 5th sample batch)
    _killed(run, "eval_batch:5")
    assert (run / "eval/results.json").exists() and not (run / "eval/report.json").exists()
    run_cli("sims.cli.train", *SIMS_TOY, f"run_dir={run}")
    for f in ("base/ema.safetensors", "aux/ema.safetensors"):
        assert _same_weights(run / f, reference / f), f
    got, ref = (json.loads((r / "eval/report.json").read_text()) for r in (run, reference))
    assert got == ref
    assert (run / "synthetic/manifest.json").read_text() == (reference / "synthetic/manifest.json").read_text()
