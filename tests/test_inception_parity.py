"""Inception parity: ``sims-fid --features inception`` on a PNG folder equals torch-fidelity's own
FID (``torch_fidelity.calculate_metrics(fid=True)``) between the same two folders, to 1e-3.

No real Inception weights can be had here, so both sides load one weights file in torch-fidelity's
format (a ``torch.save``d state dict of ``FeatureExtractorInceptionV3``) filled with seeded random
values (:func:`sims.metrics.inception_weights.random_inception_weights`); what is compared is the
whole path from PNG bytes to FID: reading (uint8 RGB, grayscale repeated), the TF1-compatible
resize inside the extractor, the pool3 features, the statistics and the Fréchet distance.

Runs only where torch-fidelity (and a torchvision that matches torch) imports; elsewhere it is
skipped. A venv that runs it here (x86-64, Python 3.11): ``pip install torch==2.14.1 torchvision==0.29.1``,
then ``pip install torch-fidelity`` and ``pip install -e '.[test]'``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.inception

torch_fidelity = pytest.importorskip("torch_fidelity")
try:
    import torch_fidelity.feature_extractor_inceptionv3  # noqa: F401 - the import is what is checked
except Exception as exc:  # noqa: BLE001 - e.g. a torchvision built for another torch (RuntimeError)
    pytest.skip(f"torch-fidelity cannot import here: {type(exc).__name__}: {exc}", allow_module_level=True)

from sims.metrics.inception_weights import random_inception_weights  # noqa: E402 - after the skip

NUM_IMAGES = 12  # per folder; Inception at 299x299 costs ~1 s of CPU per image


def write_folders(root: Path):
    """Two PNG folders of different kinds: 8x8 grayscale digits (as sims-sample writes digits
    samples: mode L) and 16x16 RGB smooth random images."""
    from PIL import Image
    from sklearn.datasets import load_digits

    a, b = root / "digits", root / "rgb"
    a.mkdir()
    b.mkdir()
    digits = np.rint(load_digits().images[:NUM_IMAGES] * (255.0 / 16.0)).astype(np.uint8)
    for i, img in enumerate(digits):
        Image.fromarray(img, mode="L").save(a / f"{i:06d}.png")
    rng = np.random.default_rng(0)
    coarse = rng.uniform(0, 255, size=(NUM_IMAGES, 4, 4, 3))
    for i, c in enumerate(coarse):
        img = np.asarray(Image.fromarray(c.astype(np.uint8), mode="RGB").resize((16, 16), Image.BILINEAR))
        noisy = np.clip(img.astype(np.int16) + rng.integers(-20, 21, size=img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy, mode="RGB").save(b / f"{i:06d}.png")
    return a, b


@pytest.fixture(scope="module")
def parity_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("inception")
    weights = random_inception_weights(root / "weights-inception-random.pth")
    a, b = write_folders(root)
    return root, weights, a, b


def torch_fidelity_fid(a: Path, b: Path, weights: Path) -> float:
    metrics = torch_fidelity.calculate_metrics(input1=str(a), input2=str(b), fid=True, cuda=False, cache=False,
                                               verbose=False, save_cpu_ram=True,
                                               feature_extractor_weights_path=str(weights))
    return float(metrics["frechet_inception_distance"])


def sims_reference(folder: Path, weights: Path, out: Path) -> Path:
    """The folder's Inception statistics computed by sims (``build_reference`` on its images)."""
    from sims.cli.fid import read_samples, sample_files
    from sims.data.datasets import ArrayDataset
    from sims.dist import single_process
    from sims.stages.evaluate import build_reference, make_extractor

    ctx = single_process()
    ext = make_extractor("inception", data_dim=0, inception_weights=str(weights), device=ctx.device)
    build_reference(ctx, ext, "inception", ArrayDataset(read_samples(sample_files(folder)), name=folder.name),
                    pr_size=0, save_to=out)
    return out


def sims_fid(folder: Path, ref: Path, weights: Path, out: Path) -> dict:
    from sims.cli.fid import main

    assert main([str(folder), "--ref", str(ref), "--features", "inception", "--inception-weights", str(weights),
                 "--accelerator", "cpu", "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_random_weights_give_informative_features(parity_setup):
    from sims.metrics import InceptionFeatures

    _, weights, _, _ = parity_setup
    ext = InceptionFeatures(weights)
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    f = ext(x)
    assert f.shape == (4, 2048) and torch.isfinite(f).all()
    assert (f > 0).float().mean() > 0.2  # not dead after the last ReLU
    assert f.std(0).mean() > 1e-4 * f.abs().mean()  # differs from image to image


def test_sims_fid_equals_torch_fidelity_fid(parity_setup):
    """sims-fid reads the grayscale folder; build_reference reads the RGB one; torch-fidelity both."""
    root, weights, digits, rgb = parity_setup
    expected = torch_fidelity_fid(digits, rgb, weights)
    ref = sims_reference(rgb, weights, root / "rgb-inception.npz")
    result = sims_fid(digits, ref, weights, root / "fid.json")
    print(f"torch-fidelity FID {expected!r}  sims-fid FD {result['fd']!r}  "
          f"abs diff {abs(result['fd'] - expected):.3g}  rel diff {abs(result['fd'] - expected) / expected:.3g}")
    assert result["num_samples"] == NUM_IMAGES and result["features"] == "inception"
    assert expected > 1.0  # a real difference between the folders, not a degenerate 0
    assert result["fd"] == pytest.approx(expected, rel=1e-3, abs=1e-3)
