"""CIFAR-10 from the official python pickle batches, read with pickle and numpy (no torchvision).

Source: Krizhevsky 2009, https://www.cs.toronto.edu/~kriz/cifar.html, "CIFAR-10 python version".
The folder ``cifar-10-batches-py`` holds ``data_batch_1`` .. ``data_batch_5`` (train, 50,000
images) and ``test_batch`` (10,000); each is a pickled dict with ``b"data"``: uint8
``[10000, 3072]`` (per row 1024 red, then 1024 green, then 1024 blue values of a 32x32 image in
row-major order) and ``b"labels"``: 10,000 ints in 0..9. The downloaded archive
``cifar-10-python.tar.gz`` can be read directly as well.

The pickles are read with a restricted unpickler that can build only plain containers and numpy
arrays, so a tampered file cannot run code.
"""
from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path
from typing import Tuple, Union

import numpy as np

from sims.data.datasets import ArrayDataset, DatasetError
from sims.data.images import from_uint8

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_SPLITS = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_RESOLUTION = 32

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _load_batch(raw: bytes, where: str) -> Tuple[np.ndarray, np.ndarray]:
    try:
        batch = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:  # pickle raises many types on a corrupt file
        raise DatasetError(f"cannot read CIFAR-10 batch {where}: {exc}") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DatasetError(f"{where} is not a CIFAR-10 batch (expected a dict with b'data' and b'labels')")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (data.shape[0],):
        raise DatasetError(f"{where}: expected uint8 data [N, 3072] and N labels, got {data.dtype} {data.shape} and {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DatasetError(f"{where}: labels outside 0..9")
    return data.reshape(-1, 3, 32, 32), labels


def read_cifar10(path: Union[str, Path], split: str = "train") -> Tuple[np.ndarray, np.ndarray]:
    """Read CIFAR-10 pixels and labels from the python batches.

    Args:
        path: the ``cifar-10-batches-py`` folder, a folder that contains it, or
            ``cifar-10-python.tar.gz``.
        split: ``train`` (data_batch_1..5, 50,000 images) or ``test`` (test_batch, 10,000).
    Returns:
        ``(pixels, labels)``: uint8 ``[N, 3, 32, 32]`` (RGB) and int64 ``[N]`` in 0..9, in batch order.
    Raises:
        DatasetError: path missing, a batch file missing, unreadable or malformed.
        ValueError: unknown split.
    """
    if split not in CIFAR10_SPLITS:
        raise ValueError(f"unknown CIFAR-10 split {split!r}; choose one of {', '.join(CIFAR10_SPLITS)}")
    path = Path(path).expanduser()
    if not path.exists():
        raise DatasetError(f"data set not found: {path} (set data.path=... to the {CIFAR10_FOLDER} folder)")
    if path.is_dir() and (path / CIFAR10_FOLDER).is_dir() and not (path / CIFAR10_SPLITS[split][0]).exists():
        path = path / CIFAR10_FOLDER
    datas, labels = [], []
    if path.is_dir():
        for fname in CIFAR10_SPLITS[split]:
            f = path / fname
            if not f.is_file():
                raise DatasetError(f"CIFAR-10 batch not found: {f} (data.path must be the {CIFAR10_FOLDER} folder)")
            d, l = _load_batch(f.read_bytes(), str(f))
            datas.append(d)
            labels.append(l)
    else:
        try:
            with tarfile.open(path) as tar:
                members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
                for fname in CIFAR10_SPLITS[split]:
                    if fname not in members:
                        raise DatasetError(f"CIFAR-10 batch {fname} not found in {path}")
                    fobj = tar.extractfile(members[fname])
                    assert fobj is not None
                    d, l = _load_batch(fobj.read(), f"{path}:{members[fname].name}")
                    datas.append(d)
                    labels.append(l)
        except (tarfile.TarError, OSError) as exc:
            raise DatasetError(f"not a CIFAR-10 folder or readable tar archive: {path} ({exc})") from None
    return np.concatenate(datas), np.concatenate(labels)


def load_cifar10(
    path: Union[str, Path], split: str = "train", use_labels: bool = False, xflip: bool = False
) -> ArrayDataset:
    """CIFAR-10 as an :class:`ArrayDataset` of float32 images ``[N, 3, 32, 32]`` in [-1, 1] (``x = p/127.5 - 1``).

    Labels are always stored; with ``use_labels`` they are returned one-hot with ``label_dim = 10``.
    Raises what :func:`read_cifar10` raises.
    """
    pixels, labels = read_cifar10(path, split)
    return ArrayDataset(
        from_uint8(pixels), labels, label_dim=10 if use_labels else 0, xflip=xflip, name=f"cifar10-{split}"
    )
