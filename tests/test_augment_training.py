"""EDM's non-leaky augmentation inside training (EDM §5 / Appendix, ``train.augment`` > 0 with
``network.augment_dim`` 9; :mod:`sims.data.augment`): an augmented run killed between checkpoints and
re-run ends bit for bit where an uninterrupted run ends, and the batches (and so the trained weights) do
not depend on the number of DataLoader workers.

The toy: scikit-learn's 8x8 digits, a 16-channel two-level DDPM++ with dropout, augment p 0.5, 8 steps of
16 images in two micro-batches of 8 (so the per-(seed, micro-batch, step) augmentation, dropout and loss
draws all matter), a checkpoint every 3 steps, two EMAs. The kill is the fault injection of
:func:`sims.utils.fault_point` (``SIMS_FAULT=train_step:5``: SIGKILL after step 5, two steps after the last
checkpoint) in a subprocess; the resume and the reference runs are in this process.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
STEPS, BATCH, CKPT_EVERY = 8, 16, 3
KILL_AT = 5  # SIGKILL after this step; the last checkpoint before it is step 3
EMA_KEYS = ("ema.safetensors", "ema-0p05.safetensors")


def toy_config(run_dir: Path, num_workers: int = 0):
    from sims.config import load_config

    return load_config(ROOT / "configs" / "digits.yaml", [
        f"run_dir={run_dir}", "network.model_channels=16", "network.num_blocks=1", "network.dropout=0.1",
        "network.augment_dim=9", "train.augment=0.5", f"train.total_kimg={STEPS * BATCH / 1000}",
        f"train.batch_size={BATCH}", "train.batch_gpu=8", f"train.ckpt_every_kimg={CKPT_EVERY * BATCH / 1000}",
        "train.lr_rampup_kimg=0.1", "train.ema_halflife_kimg=0.1", "train.ema_halflives_kimg=[0.05]",
        "train.progress_bar=false", "sims.enabled=false", f"data.num_workers={num_workers}"])


class Recorder:
    """What training consumed: every micro-batch (step, slice, images, labels) and every augmentation label."""

    def __init__(self):
        self.batches, self.augment_labels = [], []


def train(stage_dir: Path, num_workers: int = 0, recorder: Recorder | None = None):
    """Fit the toy in ``stage_dir`` (resuming from its last.ckpt if there is one); return the module."""
    import lightning as L

    from sims.config import to_container
    from sims.data import load_real_dataset
    from sims.dist import single_process
    from sims.training.fit import fit_stage
    from sims.training.module import EDMModule

    cfg = toy_config(stage_dir.parent, num_workers)
    data = load_real_dataset(cfg.data)
    module = EDMModule(to_container(cfg.network), to_container(cfg.train), data.item_shape, 0)
    callbacks = []
    if recorder is not None:
        pipe = module.augment_pipe

        def recording_pipe(images, generator):
            out, labels = pipe(images, generator)
            recorder.augment_labels.append(labels.clone())
            return out, labels

        module.augment_pipe = recording_pipe

        class Record(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                x, y, tag = batch
                recorder.batches.append((int(tag[0]), int(tag[1]), x.clone(), y.clone()))

        callbacks.append(Record())
    fit_stage(single_process(), stage_dir, module, data, total_kimg=float(cfg.train.total_kimg),
              train=to_container(cfg.train), num_workers=num_workers, callbacks=callbacks, progress=False)
    return module


def exported(stage_dir: Path):
    return {f"{name}:{k}": v for name in EMA_KEYS for k, v in load_file(str(stage_dir / name)).items()}


def assert_same_tensors(a, b, what):
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs (max |diff| {(a[k] - b[k]).abs().max().item():.3g})"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run with 0 workers: (stage dir, module, recorder)."""
    root = tmp_path_factory.mktemp("augment-ref")
    rec = Recorder()
    module = train(root / "base", 0, rec)
    return root / "base", module, rec


def test_augmentation_is_on_and_varies(reference):
    _, module, rec = reference
    assert module.augment_pipe is not None
    labels = torch.cat(rec.augment_labels)
    assert labels.shape == (STEPS * BATCH, 9)  # EDM's 9 augmentation labels, one row per image
    applied = (labels != 0).any(dim=1).float().mean().item()
    assert 0.2 < applied < 0.99, applied  # p = 0.5 per transform: most images augmented, not all
    assert len(rec.batches) == 2 * STEPS and [b[:2] for b in rec.batches[:4]] == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_killed_augmented_run_resumes_bit_identically(reference, tmp_path):
    ref_dir, ref_module, ref_rec = reference
    stage = tmp_path / "base"
    env = {**os.environ, "SIMS_FAULT": f"train_step:{KILL_AT}", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(Path(__file__)), str(stage)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (stage / "checkpoints" / "last.ckpt").is_file() and not (stage / "DONE").exists()
    step_in_ckpt = torch.load(stage / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"]
    assert step_in_ckpt == CKPT_EVERY  # killed two steps after the last checkpoint: those two are redone

    rec = Recorder()
    module = train(stage, 0, rec)  # the same call again: resumes
    assert (stage / "DONE").exists()
    assert [b[:2] for b in rec.batches] == [b[:2] for b in ref_rec.batches[2 * CKPT_EVERY:]]  # the steps after the checkpoint
    for (s, k, x, y), (_, _, x_ref, y_ref) in zip(rec.batches, ref_rec.batches[2 * CKPT_EVERY:]):
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref), (s, k)
    for a, b in zip(rec.augment_labels, ref_rec.augment_labels[2 * CKPT_EVERY:]):
        assert torch.equal(a, b)  # the same augmentations after the resume
    assert_same_tensors(exported(stage), exported(ref_dir), "exported EMA after resume")
    assert_same_tensors(module.net.state_dict(), ref_module.net.state_dict(), "live network after resume")


def test_same_batches_and_weights_with_two_workers(reference, tmp_path):
    ref_dir, _, ref_rec = reference
    rec = Recorder()
    train(tmp_path / "base", 2, rec)
    assert len(rec.batches) == len(ref_rec.batches)
    for (s, k, x, y), (s0, k0, x0, y0) in zip(rec.batches, ref_rec.batches):
        assert (s, k) == (s0, k0) and torch.equal(x, x0) and torch.equal(y, y0), (s, k)
    for a, b in zip(rec.augment_labels, ref_rec.augment_labels):
        assert torch.equal(a, b)
    assert_same_tensors(exported(tmp_path / "base"), exported(ref_dir), "exported EMA with 2 workers")


if __name__ == "__main__":  # the killed run of test_killed_augmented_run_resumes_bit_identically
    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(1)  # as the fixture one_torch_thread
    train(Path(sys.argv[1]))
