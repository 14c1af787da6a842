"""Inception-v3 weights of seeded random values, in torch-fidelity's format.

sims never downloads weights (Inception weights come only from a path the user gives), so what
needs the network but not its trained weights -- the parity test against torch-fidelity, the GPU
check's FD timing -- uses such a file with :class:`sims.metrics.features.InceptionFeatures`.
"""
from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Union

import torch

from sims.metrics.features import _torch_fidelity_inception


def random_inception_weights(path: Union[str, Path], seed: int = 0) -> Path:
    """Write an Inception-v3 weights file of seeded random values in torch-fidelity's format.

    For what needs the network but not its trained weights (none can be downloaded here): the
    parity test against torch-fidelity and the GPU check's timing. The file is a ``torch.save``d
    state dict of ``FeatureExtractorInceptionV3`` with the network's own keys, shapes and dtypes.
    Conv weights ~ N(0, 2/fan_in) (He), so the activations keep their scale through the ~100 layers
    and the pool3 features [N, 2048] are neither 0 nor huge (PyTorch's default init with BatchNorm
    statistics (0, 1) leaves them all but constant); BatchNorm: γ ~ U(0.8, 1.2), β ~ N(0, 0.1²),
    running mean ~ N(0, 0.1²), running var ~ U(0.8, 1.2); the final dense layer (not used for FID)
    N(0, 0.01²).

    Args:
        path: file to write (its folder must exist).
        seed: seed of the CPU generator that draws every value.
    Returns:
        ``Path(path)``; load it with ``InceptionFeatures(path)``.
    Raises:
        MissingDependencyError: torch-fidelity / torchvision cannot be imported.
    """
    base = _torch_fidelity_inception()

    class _ShapesOnly(base):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # keep the module as built
            return None

    with tempfile.TemporaryDirectory() as d:
        empty = Path(d) / "empty.pth"
        torch.save({}, empty)
        shapes = {k: (v.shape, v.dtype) for k, v in
                  _ShapesOnly("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
                  .state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, (shape, dtype) in shapes.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.zeros(shape, dtype=dtype)
        elif len(shape) == 4:
            state[key] = torch.randn(shape, generator=g) * math.sqrt(2.0 / (shape[1] * shape[2] * shape[3]))
        elif key.endswith(("running_var", "bn.weight")):
            state[key] = 0.8 + 0.4 * torch.rand(shape, generator=g)
        elif key.endswith(("running_mean", "bn.bias")):
            state[key] = 0.1 * torch.randn(shape, generator=g)
        else:  # fc.weight, fc.bias
            state[key] = 0.01 * torch.randn(shape, generator=g)
    torch.save(state, path)
    return Path(path)
