"""The compact index of an EDM-format zip or folder, built once for :class:`~sims.data.zip_dataset.ImageZipDataset`.

:func:`_build_index` validates the listing, the labels and the first image and returns, per entry,
only its local-header offset, sizes, method and CRC-32 in numpy arrays and the names as one bytes
blob (see the docstring of :mod:`sims.data.zip_dataset` for the memory this saves);
:func:`_trim_heap` returns the freed :mod:`zipfile` objects' memory to the OS.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

from sims.data.image_folder import LABELS_FILE, _decode_png, _read_labels, _Source
from sims.errors import DatasetError


def _trim_heap() -> None:
    """Return freed heap memory to the OS (glibc ``malloc_trim``; elsewhere a no-op): building the
    index of a large zip frees ~600 bytes per entry of :mod:`zipfile` objects that forked DataLoader
    workers would otherwise inherit as resident pages."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _build_index(path: Path, resolution: Optional[int]) -> dict:
    """Validate the data set's listing, labels and first image; return the compact index.

    Keys: ``is_zip``, ``names_blob`` (UTF-8 names concatenated), ``name_end`` (int64 ``[N]`` end
    offsets), ``shape`` ``(C, H, W)``, ``first`` (first name), ``labels`` (int64 tensor or None),
    ``class_names``; for zips ``offset``, ``csize``, ``usize`` (int64 ``[N]``), ``method`` (uint8),
    ``crc`` (uint32): local-header offset, compressed/uncompressed size, method, CRC-32 per entry.
    Kept in one function so the ~600 bytes per entry of transient :mod:`zipfile` objects are freed
    together when it returns (less heap for forked DataLoader workers to inherit).
    """
    src = _Source(path)
    try:
        if not src.images:
            raise DatasetError(f"no PNG images in {path} (expected e.g. 00000/img00000000.png)")
        label_map = _read_labels(src)
        out = {"class_names": _read_class_names(src), "first": src.images[0], "is_zip": src.zip is not None}
        first = src.images[0]
        arr = _decode_png(src.read(first), src.where(first))
        h, w, c = arr.shape
        if h != w:
            raise DatasetError(f"images must be square, got {w}x{h} in {src.where(first)}")
        if resolution is not None and w != int(resolution):
            raise DatasetError(f"expected {resolution}x{resolution}, got {w}x{h} in {src.where(first)} "
                               f"(set data.resolution={w} or resize the data set)")
        out["shape"] = (int(c), int(h), int(w))
        names = src.images
        if src.zip is not None:
            infos = [src.zip.getinfo(n) for n in names]
            for info in infos:
                if info.flag_bits & 0x1:
                    raise DatasetError(f"encrypted zip entry {src.where(info.filename)} is not supported")
                if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                    raise DatasetError(f"zip entry {src.where(info.filename)} uses compression method "
                                       f"{info.compress_type}; re-zip stored (zip -0) or deflated")
            out["offset"] = np.fromiter((i.header_offset for i in infos), dtype=np.int64, count=len(infos))
            out["csize"] = np.fromiter((i.compress_size for i in infos), dtype=np.int64, count=len(infos))
            out["usize"] = np.fromiter((i.file_size for i in infos), dtype=np.int64, count=len(infos))
            out["method"] = np.fromiter((i.compress_type for i in infos), dtype=np.uint8, count=len(infos))
            out["crc"] = np.fromiter((i.CRC for i in infos), dtype=np.uint32, count=len(infos))
        out["labels"] = None
        if label_map is not None:
            missing = [n for n in names if n not in label_map]
            if missing:
                raise DatasetError(f"{src.where(missing[0])} has no label in {src.where(LABELS_FILE)} "
                                   f"({len(missing)} unlabelled images)")
            out["labels"] = torch.from_numpy(np.fromiter((label_map[n] for n in names), dtype=np.int64, count=len(names)))
        out["names_blob"] = "".join(names).encode("utf-8")
        out["name_end"] = np.cumsum(np.fromiter((len(n.encode("utf-8")) for n in names), dtype=np.int64,
                                                count=len(names)))
        return out
    finally:
        src.close()


def _read_class_names(src: _Source) -> Optional[List[str]]:
    """``"class_names"`` from ``dataset.json`` (written by :mod:`sims.data.convert`), or None."""
    if LABELS_FILE not in src.all_names:
        return None
    try:
        meta = json.loads(src.read(LABELS_FILE).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None  # _read_labels reports it
    names = meta.get("class_names") if isinstance(meta, dict) else None
    return [str(n) for n in names] if isinstance(names, list) else None
