"""Real data sets (layer 3 of DESIGN.md): every source becomes one in-memory :class:`ArrayDataset`.

Sources: scikit-learn digits (:mod:`sims.data.digits`), 2-D/3-D toys (:mod:`sims.data.toys`),
EDM-format folders/zips (:mod:`sims.data.image_folder`, SPEC section 4) and CIFAR-10 python
batches (:mod:`sims.data.cifar10`). :func:`load_real_dataset` picks one from a :class:`DataConfig`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from sims.data.cifar10 import load_cifar10, read_cifar10
from sims.data.datasets import ArrayDataset, DatasetError
from sims.data.images import from_hwc_uint8, from_uint8, quantize, to_hwc_uint8, to_uint8
from sims.data.digits import load_digits_arrays
from sims.data.image_folder import image_name, load_image_folder, read_image_folder, write_image_folder
from sims.data.toys import TOY_DIMS, TOY_NAMES, make_toy, toy_dim

if TYPE_CHECKING:  # pragma: no cover
    from sims.config import DataConfig

DATASET_NAMES = ("digits", "toy2d", "folder", "cifar10")

__all__ = [
    "ArrayDataset",
    "DATASET_NAMES",
    "DatasetError",
    "TOY_DIMS",
    "TOY_NAMES",
    "from_hwc_uint8",
    "from_uint8",
    "quantize",
    "to_hwc_uint8",
    "to_uint8",
    "image_name",
    "load_cifar10",
    "load_digits_arrays",
    "load_image_folder",
    "load_real_dataset",
    "make_toy",
    "read_cifar10",
    "read_image_folder",
    "toy_dim",
    "write_image_folder",
]


def load_real_dataset(cfg: "DataConfig") -> ArrayDataset:
    """Load the real data set a :class:`~sims.config.DataConfig` describes.

    ``cfg.name``:
      - ``digits``: scikit-learn digits, ``[1797, C, R, R]``, R = ``cfg.resolution`` in {8, 16}, 10 classes;
        C = ``cfg.channels``: 1, or 3 (the gray value repeated to RGB).
      - ``toy2d``: ``make_toy(cfg.toy, cfg.num_samples, cfg.noise, cfg.seed)`` as ``[n, d]`` (no labels).
      - ``folder``: EDM zip/folder at ``cfg.path``; images must be ``cfg.resolution`` square.
      - ``cifar10``: python batches at ``cfg.path``; split ``cfg.split`` if the config has that
        field, else ``train``; ``cfg.resolution`` must be 32.
    Then ``cfg.max_size`` keeps the first ``max_size`` items, ``cfg.use_labels`` makes items carry
    one-hot labels, ``cfg.xflip`` doubles image data sets with mirrored copies.

    Returns:
        An :class:`ArrayDataset` (images in [-1, 1]).
    Raises:
        ValueError: unknown ``cfg.name`` (lists the choices) or toy.
        DatasetError: missing ``cfg.path``; any data set problem (see the loaders); image channels
            other than ``cfg.channels``; ``use_labels`` on data without labels; ``xflip`` on toys;
            ``max_size`` < 1.
    """
    name = cfg.name
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown data set data.name={name!r}; choose one of {', '.join(DATASET_NAMES)}")
    use_labels = bool(cfg.use_labels)
    if name == "toy2d":
        if use_labels:
            raise DatasetError("data.use_labels=true but toy data sets have no labels (set data.use_labels=false)")
        if cfg.xflip:
            raise DatasetError("data.xflip=true applies to images only (set data.xflip=false for toy data)")
        ds = ArrayDataset(make_toy(cfg.toy, cfg.num_samples, cfg.noise, cfg.seed), name=f"toy-{cfg.toy}")
    elif name == "digits":
        images, labels = load_digits_arrays(cfg.resolution)
        if cfg.channels == 3:  # gray repeated to RGB: exercises RGB networks (e.g. an imported EDM one) on real data
            images = images.repeat(1, 3, 1, 1)
        ds = ArrayDataset(images, labels, label_dim=10 if use_labels else 0, xflip=cfg.xflip, name="digits")
    else:
        if not cfg.path:
            what = "a folder or .zip of PNGs" if name == "folder" else "the cifar-10-batches-py folder"
            raise DatasetError(f"data.name={name} needs data.path (set data.path=... to {what})")
        if name == "folder":
            from sims.data.zip_dataset import open_image_dataset

            # in memory below a size, else streamed from the zip by each DataLoader worker
            ds = open_image_dataset(cfg.path, cfg.resolution, use_labels=use_labels, xflip=cfg.xflip)
        else:
            if cfg.resolution != 32:
                raise DatasetError(f"CIFAR-10 images are 32x32, got data.resolution={cfg.resolution} (set data.resolution=32)")
            ds = load_cifar10(cfg.path, cfg.split, use_labels=use_labels, xflip=cfg.xflip)
    if ds.is_image and ds.channels != cfg.channels:
        raise DatasetError(f"data.channels={cfg.channels} but {ds.name} has {ds.channels} channels (set data.channels={ds.channels})")
    if cfg.max_size is not None:
        if cfg.max_size < 1:
            raise DatasetError(f"data.max_size must be >= 1 or null, got {cfg.max_size}")
        stored = ds.data.shape[0] if hasattr(ds, "data") else ds.num_items
        if cfg.max_size < stored:
            ds = ds.subset(slice(0, cfg.max_size))
    return ds
