"""A streaming reader of EDM-format data sets (a zip or folder of PNGs + ``dataset.json``, SPEC section 4).

:class:`ImageZipDataset` reads one image per ``__getitem__`` instead of holding the data set in
memory (:class:`~sims.data.datasets.ArrayDataset`), for data sets too large for RAM (ImageNet-64:
1.28 M x 3 x 64 x 64 float32 = 63 GB). Items are the same as :func:`~sims.data.image_folder.load_image_folder`
gives: the same files in the same (sorted) order, the same labels and the same float32 values
``x = p / 127.5 - 1`` (:func:`sims.data.images.from_hwc_uint8`).

How a zip is read: the constructor parses the central directory once (:mod:`zipfile`) and keeps
per entry only its local-header offset, sizes, method and CRC-32 in numpy arrays, and the names
as one bytes blob (~65 bytes per image: 6.3 MB for 100 k images, ~85 MB for 1.28 M), so the
object pickles cheaply and a DataLoader worker does not re-parse the directory. (While it runs, the
:mod:`zipfile` pass holds ~600 bytes per entry: ~60 MB and 2-4 s for 100 k entries on a 2-core
machine; it is freed and, with glibc, returned to the OS by ``malloc_trim`` so that forked workers
do not inherit it.) Each process opens its own read-only file descriptor lazily on its first item
(the descriptor is never pickled; a forked worker notices the pid change and opens its own) and
reads an entry with ``os.pread``: the 30-byte local header, then the data (stored, or deflated via
:mod:`zlib`), whose size and CRC-32 are checked. A folder is read file by file. In a DataLoader
worker the first read also calls ``gc.freeze()`` (:func:`_freeze_inherited_objects`), which keeps
the worker's private memory at ~20 MB instead of ~55 MB (benchmarks/data_memory.py, 100 k images).

Validation: the first image is decoded eagerly (square, ``resolution``, 1 or 3 channels); each
item is checked against it when read; errors are one-line :class:`~sims.errors.DatasetError`
naming the file, as in :mod:`sims.data.image_folder`.

:func:`open_image_dataset` picks the in-memory reader for data sets whose float32 tensor would
fit under a byte threshold and this streaming reader above it.
"""
from __future__ import annotations

import os
import struct
import zipfile
import zlib
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from sims.data.datasets import ArrayDataset, StoredItems
from sims.data.image_folder import _decode_png, load_image_folder
from sims.data.images import from_hwc_uint8
from sims.data.zip_index import _build_index, _trim_heap
from sims.errors import DatasetError

DEFAULT_IN_MEMORY_MAX_BYTES = 2 * 1024**3  # 2 GiB of float32 pixels
_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # PKZIP local file header, 30 bytes
_LOCAL_MAGIC = b"PK\x03\x04"


_FROZEN_PID: Optional[int] = None


def _freeze_inherited_objects() -> None:
    """In a DataLoader worker, once: ``gc.freeze()`` the objects it inherited from the parent.

    A forked worker shares the parent's pages copy-on-write, but CPython's full collections write to
    the header of every tracked object, copying each page of the inherited Python heap into the
    worker (measured: ~35 MB of private memory per worker for a parent with torch imported). Moving
    them to the permanent generation, as the :mod:`gc` documentation suggests for forked servers,
    stops that; the cost is that cyclic garbage made before this point in the worker is never freed.
    Nothing happens outside DataLoader worker processes.
    """
    global _FROZEN_PID
    pid = os.getpid()
    if _FROZEN_PID == pid:
        return
    _FROZEN_PID = pid
    from torch.utils.data import get_worker_info

    if get_worker_info() is not None:
        import gc

        gc.freeze()



def _item_desc(c: int) -> str:
    return "grayscale" if c == 1 else "RGB"


class ImageZipDataset(StoredItems, Dataset):
    """An EDM-format zip or folder read image by image (map-style, safe with DataLoader workers).

    Args:
        path: a ``.zip`` (stored or deflated entries) or a folder in EDM's format.
        resolution: the side R every image must have; None: every image must match the first.
        use_labels: items carry one-hot labels (``label_dim = max label + 1``, EDM's rule).
        xflip: EDM's x-flip doubling: item ``i + N`` is item ``i`` mirrored left-right.

    ``__getitem__(i)`` returns ``(x, label)``: ``x`` float32 ``[C, H, W]`` in [-1, 1], ``label``
    float32 one-hot ``[label_dim]`` or ``zeros(0)``. Attributes as :class:`ArrayDataset`:
    ``labels`` (int64 tensor ``[N]`` from ``dataset.json`` or None), ``label_dim``, ``xflip``,
    ``name``, and the properties ``item_shape``, ``is_image``, ``channels``, ``resolution``,
    ``dim``, ``num_classes``; plus ``num_items`` (N, without the flipped copies), ``names``
    (file name of stored item i: :meth:`file_name`) and ``class_names`` (from ``dataset.json``
    ``"class_names"`` if present, else None).

    Raises:
        DatasetError: at construction, everything :func:`~sims.data.image_folder.read_image_folder`
            checks except the per-image checks beyond the first (missing path, not a zip, no PNGs,
            first image unreadable/non-square/wrong size/unsupported mode, malformed labels, an
            unlabelled image, ``use_labels`` without labels, encrypted or non-deflate entries);
            on reading an item, an unreadable or corrupt file (CRC mismatch, truncated zip) or one
            whose size/channels differ from the first image.
    """

    def __init__(
        self,
        path: Union[str, Path],
        resolution: Optional[int] = None,
        use_labels: bool = False,
        xflip: bool = False,
    ) -> None:
        path = Path(path).expanduser()
        index = _build_index(path, resolution)  # every transient (zip directory, name sets) dies in there
        if len(index["name_end"]) >= 10_000:
            _trim_heap()
        labels = index.pop("labels")
        if use_labels and labels is None:
            raise DatasetError(f'data.use_labels=true but {path} has no labels (no dataset.json or "labels": null)')
        c, h, w = index.pop("shape")
        first = index.pop("first")
        class_names = index.pop("class_names")
        self._is_zip: bool = index.pop("is_zip")
        self._names_blob: bytes = index.pop("names_blob")
        self._name_end: np.ndarray = index.pop("name_end")
        for key in ("offset", "csize", "usize", "method", "crc"):
            setattr(self, "_" + key, index.pop(key, None))
        self._order = np.arange(len(self._name_end), dtype=np.int64)  # item -> entry (subset() narrows it)
        self.path = path
        self._shape = (int(c), int(h), int(w))  # [C, H, W]
        self._first = first
        self.labels: Optional[torch.Tensor] = labels
        self.label_dim: int = int(labels.max()) + 1 if use_labels and labels is not None and labels.numel() else 0
        self.xflip: bool = bool(xflip)
        self.name: str = str(path)
        self.class_names: Optional[List[str]] = class_names
        self._fd: Optional[int] = None
        self._pid: Optional[int] = None

    # ------------------------------------------------------------------ pickling / file handle
    def __getstate__(self):
        state = self.__dict__.copy()
        state["_fd"] = None  # each process opens its own descriptor
        state["_pid"] = None
        return state

    def _file(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            try:
                self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
            except OSError as exc:
                raise DatasetError(f"cannot open {self.path}: {exc}") from None
            self._pid = os.getpid()
        return self._fd

    def close(self) -> None:
        """Close this process's file descriptor (it is reopened on the next read)."""
        if self._fd is not None and self._pid == os.getpid():
            try:
                os.close(self._fd)
            except OSError:
                pass
        self._fd = None
        self._pid = None

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    # ------------------------------------------------------------------ raw access
    def file_name(self, index: int) -> str:
        """The relative file name (e.g. ``00000/img00000000.png``) of stored item ``index`` (0..N-1)."""
        j = int(self._order[index])
        start = int(self._name_end[j - 1]) if j > 0 else 0
        return self._names_blob[start:int(self._name_end[j])].decode("utf-8")

    def _where(self, name: str) -> str:
        return f"{self.path}:{name}" if self._is_zip else str(self.path / name)

    def _read_bytes(self, j: int, name: str) -> bytes:
        if not self._is_zip:
            try:
                with open(self.path / name, "rb") as f:
                    return f.read()
            except OSError as exc:
                raise DatasetError(f"cannot read {self._where(name)}: {exc}") from None
        fd = self._file()
        off, csize = int(self._offset[j]), int(self._csize[j])
        try:
            head = os.pread(fd, _LOCAL_HEADER.size, off)
            if len(head) != _LOCAL_HEADER.size or head[:4] != _LOCAL_MAGIC:
                raise DatasetError(f"corrupt zip: bad local header for {self._where(name)} (was the file changed?)")
            name_len, extra_len = _LOCAL_HEADER.unpack(head)[9:11]
            raw = os.pread(fd, csize, off + _LOCAL_HEADER.size + name_len + extra_len)
        except OSError as exc:
            raise DatasetError(f"cannot read {self._where(name)}: {exc}") from None
        if len(raw) != csize:
            raise DatasetError(f"truncated zip: {self._where(name)} has {len(raw)} of {csize} bytes")
        if int(self._method[j]) == zipfile.ZIP_DEFLATED:
            try:
                raw = zlib.decompress(raw, -15)
            except zlib.error as exc:
                raise DatasetError(f"corrupt zip entry {self._where(name)}: {exc}") from None
        if len(raw) != int(self._usize[j]) or (zlib.crc32(raw) & 0xFFFFFFFF) != int(self._crc[j]):
            raise DatasetError(f"corrupt zip entry {self._where(name)}: CRC-32 mismatch")
        return raw

    def read_pixels(self, index: int) -> np.ndarray:
        """Stored item ``index`` (0..N-1, no flip) as uint8 ``[H, W, C]``, validated against the first image.

        Raises:
            IndexError: index out of range. DatasetError: as the class docstring (reading).
        """
        n = self.num_items
        index = int(index)
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} stored items")
        _freeze_inherited_objects()
        name = self.file_name(index)
        where = self._where(name)
        arr = _decode_png(self._read_bytes(int(self._order[index]), name), where)
        if not arr.flags.writeable:  # Pillow's arrays are read-only views; torch warns on those
            arr = arr.copy()
        h, w, c = arr.shape
        c0, h0, w0 = self._shape
        if (h, w) != (h0, w0):
            raise DatasetError(f"expected {w0}x{h0} like {self._where(self._first)}, got {w}x{h} in {where}")
        if c != c0:
            raise DatasetError(f"inconsistent channels: {where} has {c} ({_item_desc(c)}) but "
                               f"{self._where(self._first)} has {c0}")
        return arr

    # ------------------------------------------------------------------ Dataset protocol
    def _stored_item(self, i: int) -> torch.Tensor:
        return from_hwc_uint8(self.read_pixels(i)[None])[0]  # float32 [C, H, W]

    def get_batch(self, indices: Union[Sequence[int], np.ndarray, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Items at ``indices`` (flip-aware, like ``__getitem__``) as ``(x [B, C, H, W], labels [B, label_dim])``."""
        idx = [int(i) for i in (indices.tolist() if hasattr(indices, "tolist") else indices)]
        if not idx:
            return torch.empty((0,) + self.item_shape), torch.empty((0, self.label_dim))
        items = [self[i] for i in idx]
        return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])

    # ------------------------------------------------------------------ shape information
    @property
    def num_items(self) -> int:
        """Stored items N (``len(self)`` is 2N with ``xflip``)."""
        return int(self._order.shape[0])

    @property
    def item_shape(self) -> tuple:
        """Shape of one item: ``(C, H, W)``."""
        return tuple(self._shape)

    # ------------------------------------------------------------------ derived data sets
    def subset(self, indices: Union[Sequence[int], torch.Tensor, np.ndarray, slice]) -> "ImageZipDataset":
        """A new reader of the stored items at ``indices`` (not the x-flipped copies); ``label_dim``,
        ``xflip`` and ``name`` carry over (as :meth:`ArrayDataset.subset`)."""
        if isinstance(indices, slice):
            idx = np.arange(self.num_items, dtype=np.int64)[indices]
        else:
            idx = torch.as_tensor(np.asarray(indices), dtype=torch.long).reshape(-1).numpy()
        new = object.__new__(ImageZipDataset)
        new.__dict__.update(self.__getstate__())
        new._order = self._order[idx]
        new.labels = self.labels[torch.as_tensor(idx)] if self.labels is not None else None
        return new

    def __repr__(self) -> str:
        return (f"ImageZipDataset(name={self.name!r}, items={self.num_items}, shape={self.item_shape}, "
                f"label_dim={self.label_dim}, xflip={self.xflip})")


def open_image_dataset(
    path: Union[str, Path],
    resolution: Optional[int] = None,
    use_labels: bool = False,
    xflip: bool = False,
    in_memory_max_bytes: int = DEFAULT_IN_MEMORY_MAX_BYTES,
) -> Union[ArrayDataset, ImageZipDataset]:
    """Open an EDM-format zip/folder in memory when small, streaming when large.

    The size estimate is ``N x C x H x W x 4`` bytes (the float32 tensor :class:`ArrayDataset`
    holds; x-flip does not copy data), with N the number of PNGs and C, H, W from the first image.

    Args:
        path, resolution, use_labels, xflip: as :class:`ImageZipDataset` /
            :func:`~sims.data.image_folder.load_image_folder`.
        in_memory_max_bytes: the threshold (default 2 GiB); 0 always streams.
    Returns:
        :func:`~sims.data.image_folder.load_image_folder`'s :class:`ArrayDataset` (every image read
        and validated now) if the estimate is <= ``in_memory_max_bytes``, else an
        :class:`ImageZipDataset` (images read and validated per item).
    Raises:
        DatasetError: as the chosen reader.
    """
    stream = ImageZipDataset(path, resolution=resolution, use_labels=use_labels, xflip=xflip)
    estimate = stream.num_items * stream.dim * 4
    if estimate <= int(in_memory_max_bytes):
        stream.close()
        return load_image_folder(path, resolution, use_labels=use_labels, xflip=xflip)
    return stream
