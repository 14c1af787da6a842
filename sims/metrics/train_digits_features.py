"""Train the digits feature classifier shipped as ``sims/metrics/weights/digits_features.safetensors``.

    python -m sims.metrics.train_digits_features [--out DIR] [--epochs 60] [--seed 0]

Data: scikit-learn's bundled digits (1,797 8×8 scans, values 0..16 scaled to x/16·2 − 1), a
stratified 75/25 train/test split (``random_state=0``); the test split is never trained on and the
test accuracy is written to ``digits_features.json`` next to the weights. Augmentation: random
shifts of up to one pixel (background −1 filled in) and small Gaussian pixel noise (std 0.05), so
the features react smoothly to slightly-off samples. AdamW with a cosine learning-rate decay.
Deterministic on CPU for a given torch version and thread count (seeded generator, one thread);
takes well under a minute on one CPU core.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F

from sims.metrics.features import WEIGHTS_DIR, DigitsClassifier
from sims.utils import atomic_write, atomic_write_json

SPLIT_SEED = 0
TEST_FRACTION = 0.25


def digits_split(seed: int = SPLIT_SEED) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn digits as ([N,1,8,8] in [−1,1], labels [N]) for a stratified train/test split.

    Returns:
        (x_train [1347,1,8,8], y_train [1347], x_test [450,1,8,8], y_test [450]) for the defaults.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0) * 2.0 - 1.0
    y = d.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=TEST_FRACTION, stratify=y, random_state=seed)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    return t(x_tr)[:, None], t(y_tr), t(x_te)[:, None], t(y_te)


def _augment(x: torch.Tensor, gen: torch.Generator, noise: float) -> torch.Tensor:
    """Random shift by −1..1 pixel in each axis (pad with background −1) plus Gaussian noise."""
    n = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)  # [n,1,10,10]
    dy = torch.randint(0, 3, (n,), generator=gen)
    dx = torch.randint(0, 3, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(8)[None]).view(n, 1, 8, 1).expand(n, 1, 8, 10)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(8)[None]).view(n, 1, 1, 8).expand(n, 1, 8, 8)
    out = out.gather(3, cols)
    return out + noise * torch.randn(out.shape, generator=gen)


@torch.no_grad()
def accuracy(model: DigitsClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` on (x [N,1,8,8], y [N])."""
    model.train(False)
    return float((model(x).argmax(1) == y).float().mean())


def train(epochs: int = 60, batch_size: int = 64, lr: float = 2e-3, weight_decay: float = 1e-4,
          noise: float = 0.05, seed: int = 0) -> Tuple[DigitsClassifier, dict]:
    """Train a :class:`DigitsClassifier` on the train split; returns (model, record with accuracies)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr, x_te, y_te = digits_split()
    model = DigitsClassifier(clamp=False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(x_tr.shape[0] / batch_size)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    t0 = time.time()
    for epoch in range(epochs):
        perm = torch.randperm(x_tr.shape[0], generator=gen)
        for i in range(0, x_tr.shape[0], batch_size):
            idx = perm[i : i + batch_size]
            loss = F.cross_entropy(model(_augment(x_tr[idx], gen, noise)), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if (epoch + 1) % 10 == 0 or epoch == epochs - 1:
            print(f"epoch {epoch + 1:3d}  loss {loss.item():.4f}  test acc {accuracy(model, x_te, y_te):.4f}", flush=True)
    record = {
        "test_accuracy": round(accuracy(model, x_te, y_te), 6),
        "train_accuracy": round(accuracy(model, x_tr, y_tr), 6),
        "num_train": int(x_tr.shape[0]),
        "num_test": int(x_te.shape[0]),
        "split": f"sklearn train_test_split(test_size={TEST_FRACTION}, stratify=y, random_state={SPLIT_SEED})",
        "input": "sklearn load_digits images [N,1,8,8], x/16*2-1 in [-1,1]",
        "features": "ReLU(fc1) 128-d penultimate layer",
        "architecture": "conv3x3(1-32)-relu, conv3x3(32-64)-relu, maxpool2, conv3x3(64-64)-relu, maxpool2, fc(256-128)-relu, fc(128-10)",
        "settings": {
            "epochs": epochs, "batch_size": batch_size, "optimizer": "AdamW", "lr": lr,
            "lr_schedule": "cosine to 0 per step", "weight_decay": weight_decay,
            "augmentation": f"random shift -1..1 px (pad -1), gaussian noise std {noise}", "seed": seed,
            "threads": torch.get_num_threads(),
        },
        "torch_version": torch.__version__,
        "train_seconds": round(time.time() - t0, 1),
        "command": "python -m sims.metrics.train_digits_features",
    }
    model.clamp = True
    return model, record


def main(argv=None) -> None:
    """Train, evaluate on the held-out split, and write weights + json (atomically)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=WEIGHTS_DIR, help="output folder (default: the package's weights/)")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (fixed for reproducibility)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    model, record = train(epochs=args.epochs, seed=args.seed)

    from safetensors.torch import save_file

    weights = args.out / "digits_features.safetensors"
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    atomic_write(weights, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    record["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    record["weights_bytes"] = weights.stat().st_size
    atomic_write_json(args.out / "digits_features.json", record)
    print(json.dumps({k: record[k] for k in ("test_accuracy", "train_accuracy", "train_seconds", "weights_bytes")}))


if __name__ == "__main__":
    main()
