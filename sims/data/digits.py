"""scikit-learn's handwritten digits: 1,797 real 8x8 scans, 10 classes, bundled with scikit-learn.

Source: the UCI "Optical Recognition of Handwritten Digits" test set as shipped by
``sklearn.datasets.load_digits`` (no download). Pixel values are integers 0..16.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from sims.data.datasets import DatasetError

DIGITS_RESOLUTIONS = (8, 16)
DIGITS_NUM_CLASSES = 10


def load_digits_arrays(resolution: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """The digits as images in [-1, 1] and their class labels.

    Scaling: ``x = v / 16 * 2 - 1`` for scikit-learn's values ``v`` in 0..16. At resolution 16 the
    8x8 images are upsampled with ``torch.nn.functional.interpolate(mode="bilinear",
    align_corners=False, antialias=False)``; bilinear weights are convex, so values stay in [-1, 1].

    Args:
        resolution: 8 (native) or 16.
    Returns:
        ``(images, labels)``: float32 ``[1797, 1, R, R]`` in [-1, 1] and int64 ``[1797]`` in 0..9,
        in scikit-learn's order.
    Raises:
        DatasetError: any other resolution.
    """
    from sklearn.datasets import load_digits

    if int(resolution) not in DIGITS_RESOLUTIONS:
        raise DatasetError(
            f"digits are 8x8 (native) or 16x16 (upsampled); got data.resolution={resolution} (set data.resolution=8 or 16)"
        )
    bunch = load_digits()
    images = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32))  # [N, 8, 8], 0..16
    images = (images / 16.0 * 2.0 - 1.0).unsqueeze(1)  # [N, 1, 8, 8] in [-1, 1]
    if resolution != 8:
        images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=False)
    labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    return images.contiguous(), labels
