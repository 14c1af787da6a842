"""Pluggable feature extractors for Fréchet distance, KID and precision/recall.

Every extractor is an ``nn.Module`` mapping a batch to features [N, D] (float32) and has an
attribute ``feature_dim`` (= D):

- :class:`IdentityFeatures` — the data itself, flattened (2-D toys, low-dimensional vectors).
- :class:`DigitsFeatures` — the 128-d penultimate layer (after ReLU) of a small CNN trained on
  scikit-learn's 8×8 digits (:class:`DigitsClassifier`, weights shipped with the package). This is
  the "classifier features for small data" protocol of SPEC section 4, as MAD (Alemohammad et al.,
  ICLR 2024) used LeNet features for MNIST. The classifier doubles as a judge of sample quality
  (class shares and confidence, :func:`judge_digits`).
- :class:`InceptionFeatures` — Inception-v3 pool3 (2048-d, the TF "2015-12-05" graph) through
  torch-fidelity, images converted to uint8 exactly as written to PNG (SPEC section 4). Optional:
  needs the ``fid`` extra and a local weights file; nothing is ever downloaded.

Images are float [N, C, H, W] in [−1, 1] unless stated otherwise.
Feature extractors always stay in eval mode (``.train()`` is ignored), so a parent module
switching to training mode cannot change them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sims.data.images import from_uint8, to_uint8
from sims.errors import InputError, MissingDependencyError, MissingFileError
from sims.metrics.stats import FeatureStats

__all__ = [
    "IdentityFeatures",
    "DigitsClassifier",
    "DigitsFeatures",
    "InceptionFeatures",
    "build_feature_extractor",
    "compute_stats",
    "judge_digits",
    "load_digits_classifier",
    "load_digits_info",
    "DIGITS_WEIGHTS",
    "DIGITS_INFO",
    "FEATURE_EXTRACTORS",
]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DIGITS_WEIGHTS = WEIGHTS_DIR / "digits_features.safetensors"
DIGITS_INFO = WEIGHTS_DIR / "digits_features.json"
FEATURE_EXTRACTORS = ("identity", "digits", "inception")


class _EvalOnly(nn.Module):
    """Base for extractors: frozen parameters, always in eval mode."""

    feature_dim: int

    def train(self, mode: bool = True) -> "_EvalOnly":  # noqa: D401 - nn.Module API
        """Ignore ``mode``: feature extractors are fixed functions (always eval)."""
        return super().train(False)


# ---------------------------------------------------------------------------------------- identity
class IdentityFeatures(_EvalOnly):
    """The data as features: x [N, ...] → x.reshape(N, -1) as float32 [N, dim].

    For 2-D toys and other low-dimensional data, where the Fréchet distance in data space is the
    natural comparison.

    Args:
        dim: expected flattened dimension D.
    Raises:
        ValueError: (on call) the flattened input does not have ``dim`` columns.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        if int(dim) <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        self.feature_dim = int(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1)
        if x.shape[1] != self.feature_dim:
            raise ValueError(f"IdentityFeatures(dim={self.feature_dim}) got inputs with {x.shape[1]} values per sample")
        return x.float()


# ------------------------------------------------------------------------------------------ digits
def _digits_input(x: torch.Tensor, clamp: bool) -> torch.Tensor:
    """Bring digits batches to float [N, 1, 8, 8] in [−1, 1].

    Accepts [N, 1, 8, 8], [N, 1, 16, 16] (average-pooled 2×2 → 8×8), flattened [N, 64] / [N, 256],
    RGB [N, 3, 8 or 16, 8 or 16] (the channel mean: exact for digits repeated to RGB),
    float in [−1, 1] or uint8 in [0, 255] (converted with x/127.5 − 1).
    """
    if x.dtype == torch.uint8:
        x = from_uint8(x)
    x = x.float()
    if x.ndim == 4 and x.shape[1] == 3:
        x = x.mean(dim=1, keepdim=True)
    if x.ndim == 2 and x.shape[1] in (64, 256):
        side = int(round(x.shape[1] ** 0.5))
        x = x.reshape(x.shape[0], 1, side, side)
    if x.ndim != 4 or x.shape[1] != 1 or tuple(x.shape[2:]) not in ((8, 8), (16, 16)):
        raise ValueError(
            "digits features need digits [N, 1 or 3, 8, 8] or [N, 1 or 3, 16, 16] in [-1, 1] "
            f"(or flattened [N, 64] / [N, 256]); got shape {tuple(x.shape)}"
        )
    if x.shape[-1] == 16:
        x = F.avg_pool2d(x, 2)
    if clamp:
        x = x.clamp(-1.0, 1.0)
    return x


class DigitsClassifier(_EvalOnly):
    """Small CNN classifier for scikit-learn's 8×8 digits; its 128-d penultimate layer gives features.

    Architecture: conv3×3(1→32)-ReLU → conv3×3(32→64)-ReLU → maxpool 2 → conv3×3(64→64)-ReLU →
    maxpool 2 → dense(256→128)-ReLU (the features) → dense(128→10) (logits).
    Trained by ``python -m sims.metrics.train_digits_features`` (see ``digits_features.json`` for
    its held-out accuracy and settings).

    Inputs: digits [N, 1, 8, 8] in [−1, 1] (scikit-learn's x/16·2 − 1), or [N, 1, 16, 16]
    (average-pooled to 8×8), or flattened [N, 64] / [N, 256], or RGB (channel mean), or uint8 [0, 255].

    Args:
        clamp: clip inputs to [−1, 1] first, as writing samples to PNG would (default True).
    """

    feature_dim = 128
    num_classes = 10

    def __init__(self, clamp: bool = True) -> None:
        super().__init__()
        self.clamp = clamp
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 2 * 2, self.feature_dim)
        self.fc2 = nn.Linear(self.feature_dim, self.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (after ReLU): [N, 128] float32."""
        x = _digits_input(x, self.clamp)
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)
        return F.relu(self.fc1(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits [N, 10]."""
        return self.fc2(self.features(x))

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities (softmax of the logits) [N, 10]."""
        return self.forward(x).softmax(dim=1)

    def load(self, path: Union[str, Path, None] = None) -> "DigitsClassifier":
        """Load weights from a safetensors file (default: the shipped ``digits_features.safetensors``).

        Raises:
            FileNotFoundError: the weights file does not exist.
        """
        from safetensors.torch import load_file

        path = Path(path) if path is not None else DIGITS_WEIGHTS
        if not path.is_file():
            raise MissingFileError(
                f"digits classifier weights not found at {path}; regenerate them with "
                f"`python -m sims.metrics.train_digits_features`"
            )
        self.load_state_dict(load_file(str(path)))
        for p in self.parameters():
            p.requires_grad_(False)
        return self.train(False)


def load_digits_classifier(path: Union[str, Path, None] = None, clamp: bool = True) -> DigitsClassifier:
    """The trained digits classifier (frozen, eval mode), from ``path`` or the shipped weights."""
    return DigitsClassifier(clamp=clamp).load(path)


class DigitsFeatures(_EvalOnly):
    """128-d features of the shipped digits classifier (penultimate layer, after ReLU).

    images [N, 1, 8, 8] or [N, 1, 16, 16] in [−1, 1] (or flattened, or uint8) → features [N, 128].
    A smooth, stable feature space for Fréchet distances on digits (SPEC section 5 warns that
    log-probability features were much noisier). The classifier itself is ``self.classifier``.

    Args:
        weights_path: safetensors file; None uses the shipped weights.
        clamp: clip inputs to [−1, 1] (as writing samples to PNG would); default True.
    Raises:
        FileNotFoundError: missing weights. ValueError (on call): a batch of another shape.
    """

    feature_dim = DigitsClassifier.feature_dim

    def __init__(self, weights_path: Union[str, Path, None] = None, clamp: bool = True) -> None:
        super().__init__()
        self.classifier = load_digits_classifier(weights_path, clamp=clamp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(x)


@torch.no_grad()
def judge_digits(
    images: torch.Tensor,
    classifier: Optional[DigitsClassifier] = None,
    threshold: float = 0.9,
    batch_size: int = 2048,
) -> Dict[str, Any]:
    """Judge digit samples with the classifier: class shares and confidence (SPEC section 1, distribution control).

    Args:
        images: [N, 1, 8|16, 8|16] in [−1, 1] (any form :class:`DigitsClassifier` accepts).
        classifier: default the shipped one.
        threshold: a sample is "confident" when its top class probability is ≥ threshold.
    Returns:
        dict with ``class_share`` (list of 10 fractions of argmax predictions, sums to 1),
        ``mean_confidence`` (mean top probability), ``confident_fraction``, ``num_samples``.
    """
    clf = classifier if classifier is not None else load_digits_classifier()
    dev = next(clf.parameters()).device
    probs = torch.cat(
        [clf.probabilities(images[i : i + batch_size].to(dev)).cpu() for i in range(0, images.shape[0], batch_size)]
    )
    conf, pred = probs.max(dim=1)
    share = torch.bincount(pred, minlength=DigitsClassifier.num_classes).double() / max(pred.numel(), 1)
    return {
        "class_share": share.tolist(),
        "mean_confidence": float(conf.mean()),
        "confident_fraction": float((conf >= threshold).float().mean()),
        "num_samples": int(pred.numel()),
    }


# --------------------------------------------------------------------------------------- inception
INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"


class InceptionFeatures(_EvalOnly):
    """Inception-v3 pool3 features (2048-d) of the TF "2015-12-05" graph via torch-fidelity.

    images float [N, C, H, W] in [−1, 1] (C = 1 or 3; grayscale is repeated to RGB) → uint8
    pixels clip(round(127.5·x + 127.5), 0, 255) as written to PNG (SPEC section 4) → torch-fidelity
    resizes to 299×299 like TF1 and returns pool3 features [N, 2048] float32. uint8 input
    [N, C, H, W] in [0, 255] is passed through unchanged.

    Args:
        weights_path: local Inception weights (``pt_inception-2015-12-05-6726825d.pth`` of
            pytorch-fid, the same tensors as torch-fidelity's
            ``weights-inception-2015-12-05-6726825d.pth``). Never downloaded.
    Raises:
        ValueError: ``weights_path`` is None. FileNotFoundError: no file there.
        ImportError: torch-fidelity / torchvision cannot be imported (install the ``fid`` extra).
    """

    feature_dim = 2048

    def __init__(self, weights_path: Union[str, Path, None]) -> None:
        super().__init__()
        hint = f"Inception weights are never downloaded: set sims.inception_weights=PATH to {INCEPTION_FILE}"
        if weights_path is None:
            raise InputError(hint)
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise MissingFileError(f"{hint} (no file at {path})")
        self.net = _torch_fidelity_inception()(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path)
        )
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.train(False)

    @staticmethod
    def to_uint8(x: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] in [−1, 1] → uint8 RGB [N, 3, H, W] (grayscale repeated), PNG rounding."""
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"Inception features need images [N, 1|3, H, W], got {tuple(x.shape)}")
        x = to_uint8(x)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.to_uint8(x))[0]


def _torch_fidelity_inception() -> type:
    """torch-fidelity's ``FeatureExtractorInceptionV3`` class, or MissingDependencyError (the ``fid`` extra)."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except Exception as exc:  # ImportError, or a broken torchvision raising RuntimeError/OSError
        raise MissingDependencyError(
            "Inception features need torch-fidelity and torchvision, which are optional: "
            f"pip install 'sims[fid]' ({type(exc).__name__}: {exc})"
        ) from exc
    return FeatureExtractorInceptionV3


# ------------------------------------------------------------------------------------------ factory
def build_feature_extractor(
    name: str,
    *,
    data_dim: Optional[int] = None,
    inception_weights: Union[str, Path, None] = None,
) -> nn.Module:
    """Build a feature extractor by name: ``identity`` | ``digits`` | ``inception``.

    Args:
        name: extractor name (case-insensitive).
        data_dim: flattened data dimension, required for ``identity``.
        inception_weights: local weights file, required for ``inception``.
    Returns:
        An ``nn.Module`` with ``feature_dim``, mapping batches to features [N, feature_dim].
    Raises:
        ValueError: unknown name, or ``identity`` without ``data_dim``; plus the errors of the
            chosen extractor's constructor.
    """
    key = str(name).lower()
    if key == "identity":
        if data_dim is None:
            raise ValueError("identity features need data_dim (the flattened size of one sample)")
        return IdentityFeatures(data_dim)
    if key == "digits":
        return DigitsFeatures()
    if key == "inception":
        return InceptionFeatures(inception_weights)
    raise InputError(f"unknown feature extractor {name!r}; choose one of {', '.join(FEATURE_EXTRACTORS)}")


def _batch_tensor(batch: Any) -> torch.Tensor:
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("empty batch")
        batch = batch[0]
    if isinstance(batch, np.ndarray):
        batch = torch.from_numpy(batch)
    if not torch.is_tensor(batch):
        raise TypeError(f"batches must be tensors, arrays or (images, labels) tuples, got {type(batch).__name__}")
    return batch


@torch.no_grad()
def compute_stats(
    extractor: nn.Module,
    batches: Iterable[Any],
    device: Union[str, torch.device, None] = None,
    *,
    max_items: int = 0,
    ctx=None,
) -> FeatureStats:
    """Run ``extractor`` over ``batches`` and accumulate :class:`FeatureStats`.

    Args:
        extractor: a feature extractor (moved to ``device``; kept in eval mode).
        batches: iterable of image tensors [B, C, H, W] / vectors [B, d] / numpy arrays, or tuples
            whose first element is that (e.g. (images, labels) from a DataLoader).
        device: where to run the extractor (default: CPU).
        max_items: raw features to keep for KID / precision-recall (see FeatureStats).
        ctx: a :class:`sims.dist.DistContext`: sum the statistics of all its ranks so every rank
            returns the global statistics (each rank passes its own shard of the data); None: this process only.
    Returns:
        The accumulated FeatureStats (D = ``extractor.feature_dim``).
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if isinstance(extractor, nn.Module):
        extractor = extractor.to(dev).eval()
    stats = FeatureStats(dim=getattr(extractor, "feature_dim", None), max_items=max_items)
    for batch in batches:
        x = _batch_tensor(batch).to(dev)
        stats.update(extractor(x))
    if ctx is not None:
        stats.all_reduce(ctx)
    return stats


def load_digits_info() -> Dict[str, Any]:
    """The shipped classifier's training record (test accuracy, settings) from ``digits_features.json``."""
    return json.loads(DIGITS_INFO.read_text(encoding="utf-8"))
