"""An independent digits judge: multinomial logistic regression on raw pixels.

SIMS distribution control (Alemohammad et al., arXiv 2408.16333, distribution control; SPEC §1)
is measured by the class shares a classifier assigns to samples. The shipped CNN
(:class:`sims.metrics.features.DigitsClassifier`) both *chooses* the auxiliary's synthetic set and
could *measure* the result, which would let the judge's own mistakes look like success. This module
gives a second judge of a different family (linear in the 64 pixels, no convolutions, no shared
training code), used for neither composition nor selection, only for the report.

Model: p(k | x) = softmax(W·x + b)_k with x the 8×8 image flattened to 64 values in [−1, 1]
(16×16 inputs are 2×2 average-pooled first, as the CNN does). W [10, 64], b [10], float32, stored
in ``weights/pixel_digits.safetensors`` (≈ 3 kB). Training (``python -m sims.metrics.pixel_judge``):
scikit-learn ``LogisticRegression`` (lbfgs, multinomial, C chosen by 5-fold CV on the training split)
on the same split as the CNN (``train_test_split(test_size=0.25, stratify=y, random_state=0)``); the
record, with held-out accuracy, is ``weights/pixel_digits.json``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np
import torch

from sims.errors import MissingFileError, WeightsError
from sims.metrics.features import WEIGHTS_DIR, _digits_input

PIXEL_WEIGHTS = WEIGHTS_DIR / "pixel_digits.safetensors"
PIXEL_INFO = WEIGHTS_DIR / "pixel_digits.json"
PIXEL_C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)

__all__ = ["PixelDigitsClassifier", "load_pixel_digits_classifier", "train_pixel_digits", "PIXEL_WEIGHTS",
           "PIXEL_INFO", "load_pixel_digits_info"]


class PixelDigitsClassifier(torch.nn.Module):
    """Linear softmax classifier on the 64 raw pixels of an 8×8 digit (frozen, eval mode).

    images [N, 1, 8, 8] or [N, 1, 16, 16] in [−1, 1] (or flattened [N, 64] / [N, 256], or uint8)
    → probabilities [N, 10] (rows sum to 1). Inputs are clipped to [−1, 1] as a PNG would.

    Raises:
        ValueError: (on call) a batch of another shape.
    """

    num_classes = 10

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("weight", torch.zeros(10, 64))
        self.register_buffer("bias", torch.zeros(10))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits W·x + b [N, 10] for images as accepted by the class."""
        x = _digits_input(x, clamp=True).reshape(x.shape[0], 64)
        return x @ self.weight.t() + self.bias

    @torch.no_grad()
    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """softmax(logits) [N, 10], float32."""
        return torch.softmax(self.logits(x).float(), dim=1)

    forward = probabilities

    def load(self, path: Union[str, Path, None] = None) -> "PixelDigitsClassifier":
        """Load ``weight`` [10, 64] and ``bias`` [10] from a safetensors file (default: shipped).

        Raises:
            MissingFileError: no file. WeightsError: other tensors or shapes.
        """
        from safetensors.torch import load_file

        path = Path(path) if path is not None else PIXEL_WEIGHTS
        if not path.is_file():
            raise MissingFileError(f"pixel digits judge weights not found at {path}: regenerate them with "
                                   "`python -m sims.metrics.pixel_judge`")
        state = load_file(str(path))
        if set(state) != {"weight", "bias"} or tuple(state["weight"].shape) != (10, 64) \
                or tuple(state["bias"].shape) != (10,):
            raise WeightsError(f"{path} is not a pixel digits judge (want weight [10, 64] and bias [10], got "
                               f"{ {k: tuple(v.shape) for k, v in state.items()} })")
        self.load_state_dict({k: v.float() for k, v in state.items()})
        return self.train(False)


def load_pixel_digits_classifier(path: Union[str, Path, None] = None) -> PixelDigitsClassifier:
    """The pixel-space logistic-regression judge, from ``path`` or the shipped weights."""
    return PixelDigitsClassifier().load(path)


def load_pixel_digits_info() -> Dict[str, Any]:
    """The shipped judge's training record (``pixel_digits.json``: C, CV and held-out accuracy)."""
    return json.loads(PIXEL_INFO.read_text(encoding="utf-8"))


def _split():
    from sklearn.model_selection import train_test_split

    from sims.data.digits import load_digits_arrays

    images, labels = load_digits_arrays(8)
    x = images.reshape(len(images), 64).double().numpy()
    y = labels.numpy()
    return train_test_split(x, y, test_size=0.25, stratify=y, random_state=0)


def train_pixel_digits(C: Optional[float] = None) -> tuple[PixelDigitsClassifier, Dict[str, Any]]:
    """Fit the judge deterministically on the CNN's training split (1,347 real digits).

    Args:
        C: inverse L2 strength; None picks it from :data:`PIXEL_C_GRID` by 5-fold stratified CV
            (``shuffle=True, random_state=0``) on the training split only (the held-out 450 stay unseen).
    Returns:
        ``(classifier, record)``; the record holds C, CV accuracy, train/held-out accuracy, the split.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    t0 = time.time()
    x_tr, x_te, y_tr, y_te = _split()
    def make(c):  # lbfgs, multinomial
        return LogisticRegression(C=c, max_iter=5000, tol=1e-8)

    cv = {}
    if C is None:
        folds = StratifiedKFold(5, shuffle=True, random_state=0)
        cv = {str(c): float(cross_val_score(make(c), x_tr, y_tr, cv=folds).mean()) for c in PIXEL_C_GRID}
        C = float(max(PIXEL_C_GRID, key=lambda c: cv[str(c)]))
    model = make(C).fit(x_tr, y_tr)
    clf = PixelDigitsClassifier()
    clf.weight.copy_(torch.from_numpy(model.coef_).float())
    clf.bias.copy_(torch.from_numpy(model.intercept_).float())
    clf.train(False)
    ours = clf.probabilities(torch.from_numpy(x_te).float()).numpy()
    if not np.allclose(ours, model.predict_proba(x_te), atol=1e-4):
        raise WeightsError("pixel judge: torch probabilities differ from scikit-learn's predict_proba")
    record = {
        "model": "multinomial logistic regression on 64 raw pixels, softmax(W x + b)",
        "C": C, "cv_accuracy": cv, "cv": "StratifiedKFold(5, shuffle=True, random_state=0) on the training split",
        "train_accuracy": float(model.score(x_tr, y_tr)), "test_accuracy": float(model.score(x_te, y_te)),
        "num_train": int(len(y_tr)), "num_test": int(len(y_te)),
        "split": "sklearn train_test_split(test_size=0.25, stratify=y, random_state=0) (the CNN's split)",
        "input": "sklearn load_digits images x/16*2-1 in [-1,1], flattened row-major to 64",
        "solver": "LogisticRegression(C, max_iter=5000, tol=1e-8), lbfgs",
        "train_seconds": round(time.time() - t0, 2),
        "command": "python -m sims.metrics.pixel_judge",
    }
    return clf, record


def main() -> None:  # pragma: no cover - regenerates the shipped file
    """Train and write ``pixel_digits.safetensors`` and its JSON record."""
    import sklearn
    from safetensors.torch import save_file

    from sims.utils import sha256_file

    clf, record = train_pixel_digits()
    save_file({"weight": clf.weight.contiguous(), "bias": clf.bias.contiguous()}, str(PIXEL_WEIGHTS))
    record.update(sklearn_version=sklearn.__version__, torch_version=torch.__version__,
                  weights_sha256=sha256_file(PIXEL_WEIGHTS), weights_bytes=PIXEL_WEIGHTS.stat().st_size)
    PIXEL_INFO.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":  # pragma: no cover
    main()
