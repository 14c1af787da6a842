"""EDM-format image data sets: a folder or an uncompressed zip of PNGs plus ``dataset.json``.

Format (SPEC section 4, the layout of EDM's ``dataset_tool.py`` output): PNG files at any depth,
conventionally ``00000/img00000000.png`` (1,000 per sub-folder), and optionally at the top level
``dataset.json`` = ``{"labels": [["00000/img00000000.png", 6], ...]}`` (integer class per file)
or ``{"labels": null}``. Images are ordered by their path (sorted), so item ``i`` is the same
file on every machine. Grayscale PNGs give C = 1, RGB PNGs C = 3; pixels ``p`` in 0..255 map to
``x = p / 127.5 - 1`` in [-1, 1].

Reading and writing use Pillow (PNG), :mod:`zipfile` and :mod:`json`.
"""
from __future__ import annotations

import io
import json
import os
import posixpath
import zipfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from sims.data.datasets import ArrayDataset, ArrayLike, DatasetError
from sims.data.images import from_uint8
from sims.data.zip_writer import write_dataset

LABELS_FILE = "dataset.json"
_MODE_CHANNELS = {"L": 1, "RGB": 3}
_MODE_CONVERT = {"1": "L", "P": "RGB"}  # bilevel -> grayscale, palette -> RGB


def image_name(index: int) -> str:
    """EDM's file name for item ``index``: ``{index // 1000:05d}/img{index:08d}.png``."""
    return f"{index // 1000:05d}/img{index:08d}.png"


# ---------------------------------------------------------------------------------------- reading
class _Source:
    """Uniform read access to a folder or a zip: sorted PNG names (posix, relative) and bytes."""

    def __init__(self, path: Path):
        self.path = path
        self.zip: Optional[zipfile.ZipFile] = None
        if path.is_dir():
            names = []
            for root, dirs, files in os.walk(path):
                dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__MACOSX"]
                for f in files:
                    names.append(Path(root, f).relative_to(path).as_posix())
        elif path.is_file():
            try:
                self.zip = zipfile.ZipFile(path)
            except (zipfile.BadZipFile, OSError) as exc:
                raise DatasetError(f"not a folder or a readable zip file: {path} ({exc})") from None
            names = [n for n in self.zip.namelist() if not n.endswith("/")]
        else:
            raise DatasetError(f"data set not found: {path} (set data.path=...)")
        self.all_names = set(names)
        self.images = sorted(n for n in names if n.lower().endswith(".png") and not _hidden(n))
        self.image_set = set(self.images)

    def where(self, name: str) -> str:
        return f"{self.path}:{name}" if self.zip is not None else str(self.path / name)

    def read(self, name: str) -> bytes:
        try:
            if self.zip is not None:
                return self.zip.read(name)
            return (self.path / name).read_bytes()
        except (OSError, zipfile.BadZipFile, KeyError) as exc:
            raise DatasetError(f"cannot read {self.where(name)}: {exc}") from None

    def close(self) -> None:
        if self.zip is not None:
            self.zip.close()


def _hidden(name: str) -> bool:
    parts = name.split("/")
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _decode_png(raw: bytes, where: str) -> np.ndarray:
    """PNG bytes -> uint8 ``[H, W, C]`` (C = 1 or 3). Raises DatasetError naming ``where``."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(raw)) as im:
            im.load()
            mode = im.mode
            if mode in _MODE_CONVERT:
                im = im.convert(_MODE_CONVERT[mode])
            if im.mode not in _MODE_CHANNELS:
                hint = "; drop the alpha channel (convert to RGB)" if "A" in im.mode else "; convert to 8-bit grayscale or RGB"
                raise DatasetError(f"unsupported image mode {im.mode} in {where}{hint}")
            arr = np.asarray(im, dtype=np.uint8)
    except DatasetError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"cannot read image {where}: {exc}") from None
    return arr[:, :, None] if arr.ndim == 2 else arr


def _read_labels(src: _Source) -> Optional[Dict[str, int]]:
    if LABELS_FILE not in src.all_names:
        return None
    where = src.where(LABELS_FILE)
    try:
        meta = json.loads(src.read(LABELS_FILE).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"cannot parse {where}: {exc}") from None
    if not isinstance(meta, dict) or "labels" not in meta:
        raise DatasetError(f'{where} must be {{"labels": [[file, class], ...]}} or {{"labels": null}}')
    entries = meta["labels"]
    if entries is None:
        return None
    if not isinstance(entries, list):
        raise DatasetError(f'{where}: "labels" must be a list of [file, class] pairs or null')
    labels: Dict[str, int] = {}
    for entry in entries:
        ok = isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], str)
        ok = ok and isinstance(entry[1], int) and not isinstance(entry[1], bool) and entry[1] >= 0
        if not ok:
            raise DatasetError(f"{where}: bad label entry {entry!r} (expected [file, class >= 0])")
        name = posixpath.normpath(entry[0].replace("\\", "/"))
        if name not in src.image_set:
            raise DatasetError(f"{where} labels {entry[0]!r}, which is not in the data set {src.path}")
        labels[name] = entry[1]
    return labels


def read_image_folder(
    path: Union[str, Path], resolution: Optional[int] = None
) -> Tuple[np.ndarray, Optional[np.ndarray], List[str]]:
    """Read an EDM-format folder or zip into memory, validating every image.

    Args:
        path: a directory or a zip file (stored or deflated) in the format of the module docstring.
        resolution: the side R every image must have; None: every image must match the first.
    Returns:
        ``(pixels, labels, names)``: uint8 ``[N, C, H, W]``; int64 ``[N]`` class labels or None when
        there is no ``dataset.json`` or it says ``{"labels": null}``; the sorted relative file names.
    Raises:
        DatasetError (one line, naming the file): path missing; not a zip; no PNGs; unreadable or
        corrupt PNG; unsupported mode (alpha, 16-bit); non-square image; size other than
        ``resolution`` (or than the first image); grayscale and RGB mixed; malformed
        ``dataset.json``; a label for a file that is not there; an image without a label.
    """
    path = Path(path).expanduser()
    src = _Source(path)
    try:
        if not src.images:
            raise DatasetError(f"no PNG images in {path} (expected e.g. 00000/img00000000.png)")
        label_map = _read_labels(src)
        pixels: Optional[np.ndarray] = None
        first = ""
        for i, name in enumerate(src.images):
            where = src.where(name)
            arr = _decode_png(src.read(name), where)
            h, w, c = arr.shape
            if h != w:
                raise DatasetError(f"images must be square, got {w}x{h} in {where}")
            if resolution is not None and w != int(resolution):
                raise DatasetError(
                    f"expected {resolution}x{resolution}, got {w}x{h} in {where} (set data.resolution={w} or resize the data set)"
                )
            if pixels is None:
                pixels = np.empty((len(src.images), c, h, w), dtype=np.uint8)
                first = where
            elif (h, w) != pixels.shape[2:]:
                raise DatasetError(f"expected {pixels.shape[3]}x{pixels.shape[2]} like {first}, got {w}x{h} in {where}")
            elif c != pixels.shape[1]:
                raise DatasetError(
                    f"inconsistent channels: {where} has {c} ({'grayscale' if c == 1 else 'RGB'}) but {first} has {pixels.shape[1]}"
                )
            pixels[i] = arr.transpose(2, 0, 1)
        labels = None
        if label_map is not None:
            missing = [n for n in src.images if n not in label_map]
            if missing:
                raise DatasetError(
                    f"{src.where(missing[0])} has no label in {src.where(LABELS_FILE)} ({len(missing)} unlabelled images)"
                )
            labels = np.array([label_map[n] for n in src.images], dtype=np.int64)
        assert pixels is not None
        return pixels, labels, list(src.images)
    finally:
        src.close()


def load_image_folder(
    path: Union[str, Path],
    resolution: Optional[int] = None,
    use_labels: bool = False,
    xflip: bool = False,
) -> ArrayDataset:
    """An EDM-format folder/zip as an :class:`ArrayDataset` of images ``[N, C, R, R]`` in [-1, 1].

    Args:
        path, resolution: as :func:`read_image_folder`.
        use_labels: return one-hot labels (``label_dim = max label + 1``, EDM's rule); labels are
            stored on the data set either way when the folder has them.
        xflip: EDM's x-flip augmentation (see :class:`ArrayDataset`).
    Raises:
        DatasetError: everything :func:`read_image_folder` raises, and ``use_labels`` on a data set
            without labels.
    """
    pixels, labels, _ = read_image_folder(path, resolution)
    if use_labels and labels is None:
        raise DatasetError(f"data.use_labels=true but {path} has no labels (no dataset.json or \"labels\": null)")
    label_dim = (int(labels.max()) + 1) if use_labels and labels is not None else 0
    return ArrayDataset(from_uint8(pixels), labels, label_dim=label_dim, xflip=xflip, name=str(path))


# ---------------------------------------------------------------------------------------- writing
def _to_nhwc_uint8(images: ArrayLike, layout: Optional[str]) -> np.ndarray:
    arr = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if arr.dtype != np.uint8:
        raise TypeError(f"write_image_folder expects uint8 pixels, got {arr.dtype} (quantise with sims.data.images.to_uint8)")
    if arr.ndim == 3:
        return arr[..., None]
    if arr.ndim != 4:
        raise ValueError(f"images must be [N, H, W], [N, H, W, C] or [N, C, H, W], got shape {arr.shape}")
    if layout is None:
        if arr.shape[1] in (1, 3) and arr.shape[3] not in (1, 3):
            layout = "NCHW"
        elif arr.shape[3] in (1, 3):
            layout = "NHWC"
        else:
            raise ValueError(f"cannot tell the channel axis of shape {arr.shape}: pass layout='NCHW' or 'NHWC'")
    if layout == "NCHW":
        arr = arr.transpose(0, 2, 3, 1)
    elif layout != "NHWC":
        raise ValueError(f"layout must be 'NCHW' or 'NHWC', got {layout!r}")
    if arr.shape[3] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got {arr.shape[3]}")
    return arr


def _encode_png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img, mode="L" if img.shape[2] == 1 else "RGB").save(buf, format="PNG")
    return buf.getvalue()


def _is_dataset_folder(path: Path) -> bool:
    for root, _, files in os.walk(path):
        for f in files:
            if not (f.lower().endswith(".png") or (f == LABELS_FILE and Path(root) == path)):
                return False
    return True


def write_image_folder(
    path: Union[str, Path],
    images: ArrayLike,
    labels: Optional[ArrayLike] = None,
    layout: Optional[str] = None,
    overwrite: bool = False,
) -> Path:
    """Write images in EDM's data set format: a folder, or a stored (uncompressed) zip if ``path`` ends in ``.zip``.

    Files are ``00000/img00000000.png`` ... (:func:`image_name`) plus ``dataset.json`` with
    ``{"labels": [[name, class], ...]}`` or ``{"labels": null}`` (SPEC section 4). The output appears
    atomically: it is written under a temporary name next to ``path`` and renamed.

    Args:
        path: output folder or ``*.zip`` file.
        images: uint8 tensor/array ``[N, H, W, C]``, ``[N, C, H, W]`` (C = 1 or 3) or ``[N, H, W]``.
        labels: int class labels ``[N]`` (>= 0) or None.
        layout: ``"NCHW"`` or ``"NHWC"``; None guesses from where the size-1/3 axis is.
        overwrite: replace an existing output (a folder only if it holds nothing but PNGs and
            ``dataset.json``).
    Returns:
        ``path`` as a Path.
    Raises:
        TypeError: pixels not uint8. ValueError: bad shape, labels of the wrong length or negative.
        FileExistsError: the output exists and ``overwrite`` is False (or the folder holds other files).
    """
    path = Path(path).expanduser()
    arr = _to_nhwc_uint8(images, layout)
    n = arr.shape[0]
    label_list = None
    if labels is not None:
        lab = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        if lab.shape != (n,) or not np.issubdtype(lab.dtype, np.integer) or (n and lab.min() < 0):
            raise ValueError(f"labels must be {n} integers >= 0, got shape {lab.shape} dtype {lab.dtype}")
        label_list = [[image_name(i), int(lab[i])] for i in range(n)]
    meta = json.dumps({"labels": label_list}).encode("utf-8")
    if path.exists():
        if not overwrite:
            raise FileExistsError(f"output exists: {path} (choose another path or pass overwrite)")
        if path.is_dir() and not _is_dataset_folder(path):
            raise FileExistsError(f"refusing to overwrite {path}: it holds files other than PNGs and {LABELS_FILE}")

    def emit(put) -> None:
        for i in range(n):
            put(image_name(i), _encode_png(arr[i]))
        put(LABELS_FILE, meta)

    write_dataset(path, emit)
    return path
