"""Convert a folder of images of any sizes (PNG, JPEG, ...) into an EDM-format data set.

The output is EDM's layout (SPEC section 4): an uncompressed (``ZIP_STORED``) zip, or a folder, of
``00000/img00000000.png`` ... (:func:`sims.data.image_folder.image_name`) plus ``dataset.json``
``{"labels": [["00000/img00000000.png", 6], ...], "class_names": [...]}`` or ``{"labels": null}``.
Images are written in the sorted order of their source paths, as RGB PNGs at
``compress_level=0`` (EDM's "uncompressed PNG", fast to decode in the training loop).

Transforms (the facts of NVlabs/edm and NVlabs/edm2 ``dataset_tool.py``, re-implemented here):

* every input is first converted to RGB with Pillow's ``Image.convert("RGB")``, as EDM2 does:
  grayscale is replicated, palette images are expanded, an alpha channel is dropped (not
  composited), CMYK is converted. 16-bit grayscale (``I;16``) is first mapped to 8 bits as
  ``round(v / 257)`` (Pillow would clip it at 255); 32-bit integer/float images (``I``, ``F``) are
  reported as unreadable. EXIF orientation is not applied (neither tool applies it).
* ``center-crop`` (EDM's ``--transform=center-crop``): crop the central square of side
  ``s = min(H, W)``, rows ``[(H - s) // 2, (H + s) // 2)`` and columns ``[(W - s) // 2, (W + s) // 2)``,
  then resize it to R x R with ``PIL.Image.Resampling.LANCZOS``. On a square input this is
  exactly EDM's default (no ``--transform``) plain LANCZOS resize.
* ``center-crop-dhariwal`` (EDM2's ``--transform=center-crop-dhariwal``, the ADM/guided-diffusion
  ImageNet crop, Dhariwal & Nichol 2021): while ``min(W, H) >= 2R`` halve the image,
  ``(W // 2, H // 2)`` with ``Resampling.BOX``; then resize so the short side is R, to
  ``(round(W * R / min(W, H)), round(H * R / min(W, H)))`` with ``Resampling.BICUBIC``
  (Python's ``round``); then crop R x R at row ``(H' - R) // 2``, column ``(W' - R) // 2``.

Presets (:data:`PRESETS`): ``ffhq`` and ``afhqv2`` are EDM's 64 x 64 conversions (EDM's README runs
``dataset_tool.py --resolution=64x64`` with no transform: a LANCZOS resize of the square sources,
which ``center-crop`` reproduces exactly and keeps well defined for non-square files), without labels
(EDM trains both unconditionally; for AFHQv2 EDM converts every image under the source, the
``train`` and ``test`` folders together). ``imagenet`` takes labels from the class folders (the
``ILSVRC/Data/CLS-LOC/train/n01440764/...`` tree: sorted WordNet ids -> the standard 0..999) and
EDM2's ``center-crop-dhariwal`` at 64 x 64. (EDM's own ImageNet-64 README line used
``--transform=center-crop``; pass that to ``folder`` to reproduce it.)

Labels with ``labels="folders"``: the class of ``DIR/cat/x/a.jpg`` is its top-level folder
``cat``; the sorted class names map to 0..K-1 (as EDM does when it derives labels from folder
names) and ``dataset.json`` also records ``"class_names"`` (index-aligned). Images directly in
``DIR`` are an error then. Classes are taken from the whole listing, so ``max_images`` does not
renumber them. A ``dataset.json`` in the source folder is not read.

Input files: those whose extension is in :data:`IMAGE_EXTENSIONS` (case-insensitive), at any depth,
hidden files/folders and ``__MACOSX`` excluded, symlinked folders not followed (as ``os.walk``);
other files are ignored and counted (:attr:`ConvertResult.num_ignored`). A file Pillow cannot
decode (corrupt, truncated, not an image, unsupported mode) is skipped and listed with the reason
in :attr:`ConvertResult.skipped`; the caller decides whether that is an error (``sims-dataset``
exits non-zero unless ``--skip-unreadable``).

Memory is constant in the number of images: the source tree is walked in sorted order without
listing it (:func:`walk_sorted`), one image is decoded at a time and written at once, and the zip
directory is kept in compact arrays (:class:`StoredZipWriter`, ~45 bytes per entry; ``zipfile``
would keep ~450; measured growth of the peak RSS from 10 k to 100 k images: +10 MB,
benchmarks/data_memory.py). The output appears atomically: it is written under a temporary name
next to ``out`` and renamed when complete, so an interrupted run leaves no ``out`` (an old ``out``
replaced with ``overwrite`` stays intact until the rename).

Sources: NVlabs/edm ``dataset_tool.py`` (``center-crop``, the PNG and ``dataset.json`` layout,
folder-name labels), NVlabs/edm2 ``dataset_tool.py`` (``convert('RGB')``, ``center-crop-dhariwal``),
openai/guided-diffusion ``image_datasets.py`` ``center_crop_arr`` (the crop EDM2 reproduces), the
EDM README (the FFHQ/AFHQv2/ImageNet 64 x 64 commands) and PKWARE's APPNOTE 6.3 (zip records).
"""
from __future__ import annotations

import io
import json
import os
import shutil
import struct
import tempfile
import zlib
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np

from sims.data.image_folder import LABELS_FILE, _is_dataset_folder, image_name
from sims.errors import DatasetError, InputError, OutputExistsError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                    ".ppm", ".pgm", ".pnm")
TRANSFORMS = ("center-crop", "center-crop-dhariwal")
LABEL_MODES = ("none", "folders")
PNG_COMPRESS_LEVEL = 0  # EDM's dataset_tool: compress_level=0, optimize=False


@dataclass(frozen=True)
class Preset:
    """A named conversion: output side ``resolution`` (pixels), ``transform``, ``labels`` mode."""

    resolution: int
    transform: str
    labels: str
    help: str


PRESETS: Dict[str, Preset] = {
    "ffhq": Preset(64, "center-crop", "none", "FFHQ (images1024x1024) -> 64x64, EDM's LANCZOS resize, no labels"),
    "afhqv2": Preset(64, "center-crop", "none", "AFHQv2 (train+test) -> 64x64, EDM's LANCZOS resize, no labels"),
    "imagenet": Preset(64, "center-crop-dhariwal", "folders",
                       "ImageNet CLS-LOC/train -> 64x64, EDM2's center-crop-dhariwal, labels from class folders"),
}


@dataclass
class ConvertResult:
    """What :func:`convert_folder` wrote.

    Attributes:
        out: the output path. num_images: images written. resolution: their side R (pixels).
        channels: 3 (outputs are RGB). class_names: sorted class names (label i = class_names[i])
        or None without labels. skipped: ``(relative path, reason)`` of every unreadable file left
        out, in source order. num_ignored: files without an image extension; ignored: the first
        :data:`MAX_IGNORED_LISTED` of them (relative paths). num_candidates: image files found in the
        source (before ``max_images``).
    """

    out: Path
    num_images: int
    resolution: int
    channels: int = 3
    class_names: Optional[List[str]] = None
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    ignored: List[str] = field(default_factory=list)
    num_ignored: int = 0
    num_candidates: int = 0


MAX_IGNORED_LISTED = 20


class UnreadableImage(Exception):
    """A source file that cannot be decoded into an RGB image (message: the reason)."""


# ------------------------------------------------------------------------------------ listing
def _is_image_file(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def walk_sorted(source: Union[str, Path], on_other: Optional[Callable[[str], None]] = None) -> Iterator[str]:
    """Yield the relative posix paths of the image files under ``source`` in sorted order, streamed.

    Each folder's entries are sorted with folders keyed as ``name + "/"`` and visited in place, which
    is exactly the order of ``sorted()`` over the full relative paths, while holding only the entries
    of the folders on the current path (not a list of all N files). Hidden entries and
    ``__MACOSX`` are skipped; symlinked folders are not followed (as ``os.walk``).

    Args:
        source: the folder. on_other: called with the relative path of each non-image file.
    Raises:
        DatasetError: ``source`` is not a directory.
    """
    root = Path(source).expanduser()
    if not root.is_dir():
        raise DatasetError(f"source folder not found: {root}" if not root.exists()
                           else f"source must be a folder of images, got a file: {root}")

    def visit(path: str, prefix: str) -> Iterator[str]:
        with os.scandir(path) as it:  # os.scandir: much faster than Path.rglob on 10^6 files
            entries = []
            for e in it:
                if e.name.startswith(".") or e.name == "__MACOSX":
                    continue
                is_dir = e.is_dir(follow_symlinks=False)
                if is_dir or e.is_file():
                    entries.append((e.name + "/" if is_dir else e.name, is_dir))
        entries.sort()
        for key, is_dir in entries:
            if is_dir:
                yield from visit(os.path.join(path, key[:-1]), prefix + key)
            elif _is_image_file(key):
                yield prefix + key
            elif on_other is not None:
                on_other(prefix + key)

    yield from visit(str(root), "")


def list_images(source: Union[str, Path]) -> Tuple[List[str], List[str]]:
    """All image files under ``source`` (:func:`walk_sorted` as a list) and the other files, both sorted.

    Raises:
        DatasetError: ``source`` is not a directory.
    """
    other: List[str] = []
    images = list(walk_sorted(source, other.append))
    return images, other


def scan_source(source: Union[str, Path], labels: str = "none") -> Tuple[int, Optional[List[str]], int, List[str]]:
    """One streaming pass over ``source``: count the image files and, with ``labels="folders"``, find
    the classes (the sorted top-level folders holding at least one image; label i = class i).

    Returns:
        ``(num_images, class_names or None, num_other_files, first MAX_IGNORED_LISTED other files)``.
    Raises:
        DatasetError: not a folder; with ``labels="folders"``, an image directly in ``source``.
    """
    other: List[str] = []
    num_other = 0

    def note(rel: str) -> None:
        nonlocal num_other
        num_other += 1
        if len(other) < MAX_IGNORED_LISTED:
            other.append(rel)

    n = 0
    classes = set()
    for rel in walk_sorted(source, note):
        n += 1
        if labels == "folders":
            top, sep, _ = rel.partition("/")
            if not sep:
                raise DatasetError(f"labels from class folders: {rel} is not inside a class sub-folder "
                                   f"(move it, or convert without labels)")
            classes.add(top)
    return n, (sorted(classes) if labels == "folders" else None), num_other, other


# ------------------------------------------------------------------------------------ decoding and transforms
def load_rgb(path: Union[str, Path]):
    """Open an image file as a fully decoded RGB ``PIL.Image`` (the conversion rules of the module docstring).

    Raises:
        UnreadableImage: not an image, corrupt or truncated data, or mode ``I``/``F``.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode.startswith("I;16"):
                arr = np.asarray(im, dtype=np.float64)
                im = Image.fromarray(np.rint(arr / 257.0).astype(np.uint8), mode="L")
            elif im.mode in ("I", "F"):
                raise UnreadableImage(f"unsupported mode {im.mode} (32-bit); convert it to 8-bit RGB")
            return im.convert("RGB")
    except UnreadableImage:
        raise
    except Exception as exc:  # Pillow raises many types on corrupt data (OSError, SyntaxError, ValueError, ...)
        raise UnreadableImage(f"{type(exc).__name__}: {exc}") from None


def center_crop(img, resolution: int):
    """EDM's ``center-crop``: central ``min(W, H)`` square, LANCZOS-resized to ``resolution``^2.

    Args:
        img: ``PIL.Image`` (any size). resolution: output side R in pixels.
    Returns:
        ``PIL.Image`` R x R, same mode.
    """
    from PIL import Image

    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    img = img.crop((left, top, left + s, top + s))
    return img.resize((resolution, resolution), Image.Resampling.LANCZOS)


def center_crop_dhariwal(img, resolution: int):
    """EDM2's ``center-crop-dhariwal`` (ADM's ImageNet crop): BOX-halve while the short side is
    >= 2R, BICUBIC-resize the short side to R, crop the central R x R.

    Args:
        img: ``PIL.Image`` (any size). resolution: output side R in pixels.
    Returns:
        ``PIL.Image`` R x R, same mode.
    """
    from PIL import Image

    while min(img.size) >= 2 * resolution:
        img = img.resize((img.size[0] // 2, img.size[1] // 2), Image.Resampling.BOX)
    scale = resolution / min(img.size)
    img = img.resize((round(img.size[0] * scale), round(img.size[1] * scale)), Image.Resampling.BICUBIC)
    left, top = (img.size[0] - resolution) // 2, (img.size[1] - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


_TRANSFORM_FNS: Dict[str, Callable] = {"center-crop": center_crop, "center-crop-dhariwal": center_crop_dhariwal}


def transform_image(img, transform: str, resolution: int) -> np.ndarray:
    """Apply a named transform (:data:`TRANSFORMS`) to an RGB ``PIL.Image``.

    Returns:
        uint8 ``[R, R, 3]``.
    Raises:
        InputError (a ValueError): unknown transform.
    """
    if transform not in _TRANSFORM_FNS:
        raise InputError(f"unknown transform {transform!r}; choose one of {', '.join(TRANSFORMS)}")
    out = np.asarray(_TRANSFORM_FNS[transform](img, int(resolution)), dtype=np.uint8)
    assert out.shape == (resolution, resolution, 3), out.shape
    return out


def encode_png(arr: np.ndarray) -> bytes:
    """uint8 ``[H, W, 3]`` or ``[H, W, 1]`` -> PNG bytes at EDM's ``compress_level=0``."""
    from PIL import Image

    im = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr, mode="L" if arr.shape[2] == 1 else "RGB")
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL, optimize=False)
    return buf.getvalue()


# ------------------------------------------------------------------------------------ writing
_ZIP64_COUNT_LIMIT = 0xFFFF  # module constants so a test can force the zip64 records on a small zip
_ZIP64_OFFSET_LIMIT = 0xFFFFFFFF
_DOS_DATE, _DOS_TIME = (0 << 9) | (1 << 5) | 1, 0  # 1980-01-01 00:00: the same input gives the same bytes


class StoredZipWriter:
    """Write an uncompressed (``ZIP_STORED``) zip keeping 24 bytes + the name per entry, not a Python object.

    :class:`zipfile.ZipFile` keeps a ``ZipInfo`` (~450 bytes) per entry until ``close()``: ~600 MB
    for ImageNet's 1.28 M images. This writer keeps offsets, sizes and CRC-32s in :mod:`array`
    arrays and the names in one ``bytearray``, and writes standard PKZIP records (APPNOTE 6.3):
    local headers, the central directory and, from 65,535 entries or 4 GiB on, the zip64 end records
    and zip64 extra fields (read by :mod:`zipfile`, ``unzip``, EDM's loader). Every entry is dated
    1980-01-01 00:00, so the bytes depend only on the contents.

    Args:
        f: a binary file opened for writing, seekable (for :meth:`write_streamed`).
    """

    def __init__(self, f) -> None:
        self.f = f
        self.pos = f.tell()
        self._offsets = array("Q")
        self._sizes = array("I")  # entries are < 4 GiB (checked)
        self._crcs = array("I")
        self._name_ends = array("Q")
        self._names = bytearray()

    def _header(self, name: bytes, crc: int, size: int) -> bytes:
        flags = 0 if name.isascii() else 0x800  # bit 11: UTF-8 names
        return struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, flags, 0, _DOS_TIME, _DOS_DATE, crc, size, size,
                           len(name), 0) + name

    def _record(self, name: bytes, offset: int, crc: int, size: int) -> None:
        if size >= 0xFFFFFFFF:
            raise ValueError(f"zip entry {name!r} is {size} bytes; entries must be < 4 GiB")
        self._offsets.append(offset)
        self._sizes.append(size)
        self._crcs.append(crc)
        self._names += name
        self._name_ends.append(len(self._names))

    def writestr(self, name: str, data: bytes) -> None:
        """Add one entry ``name`` with contents ``data`` (stored)."""
        bname = name.encode("utf-8")
        crc = zlib.crc32(data) & 0xFFFFFFFF
        head = self._header(bname, crc, len(data))
        self.f.write(head)
        self.f.write(data)
        self._record(bname, self.pos, crc, len(data))
        self.pos += len(head) + len(data)

    def write_streamed(self, name: str, chunks: Iterator[bytes]) -> None:
        """Add one entry from an iterator of byte chunks (header patched with CRC and size afterwards)."""
        bname = name.encode("utf-8")
        start = self.pos
        self.f.write(self._header(bname, 0, 0))
        crc, size = 0, 0
        for chunk in chunks:
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
            self.f.write(chunk)
        end = self.f.tell()
        self.f.seek(start)
        self.f.write(self._header(bname, crc & 0xFFFFFFFF, size))
        self.f.seek(end)
        self._record(bname, start, crc & 0xFFFFFFFF, size)
        self.pos = end

    def close(self) -> None:
        """Write the central directory and the end records (the file itself is the caller's to close)."""
        cd_start = self.pos
        n = len(self._offsets)
        start = 0
        for i in range(n):
            name = bytes(self._names[start:self._name_ends[i]])
            start = self._name_ends[i]
            off = self._offsets[i]
            extra = b""
            if off >= _ZIP64_OFFSET_LIMIT:
                extra = struct.pack("<HHQ", 0x0001, 8, off)
                off = 0xFFFFFFFF
            version = 45 if extra else 20
            flags = 0 if name.isascii() else 0x800
            rec = struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, (3 << 8) | version, version, flags, 0, _DOS_TIME,
                              _DOS_DATE, self._crcs[i], self._sizes[i], self._sizes[i], len(name), len(extra), 0,
                              0, 0, (0o100644 << 16) & 0xFFFFFFFF, off)
            self.f.write(rec + name + extra)
            self.pos += len(rec) + len(name) + len(extra)
        cd_size = self.pos - cd_start
        if n >= _ZIP64_COUNT_LIMIT or cd_start >= _ZIP64_OFFSET_LIMIT or cd_size >= _ZIP64_OFFSET_LIMIT:
            eocd64 = self.pos
            self.f.write(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, n, n, cd_size, cd_start))
            self.f.write(struct.pack("<IIQI", 0x07064B50, 0, eocd64, 1))
            n16, cd_size32, cd_start32 = min(n, 0xFFFF), min(cd_size, 0xFFFFFFFF), min(cd_start, 0xFFFFFFFF)
        else:
            n16, cd_size32, cd_start32 = n, cd_size, cd_start
        self.f.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, n16, n16, cd_size32, cd_start32, 0))
        self.f.flush()


def _metadata_chunks(labels: Optional[array], class_names: Optional[List[str]]) -> Iterator[bytes]:
    """``dataset.json`` in chunks of 4,096 entries (never one string of all N entries)."""
    if labels is None:
        yield b'{"labels": null}'
        return
    yield b'{"labels": ['
    chunk: List[str] = []
    for i, lab in enumerate(labels):
        chunk.append(("" if i == 0 else ", ") + json.dumps([image_name(i), int(lab)]))
        if len(chunk) == 4096:
            yield "".join(chunk).encode("utf-8")
            chunk = []
    yield "".join(chunk).encode("utf-8")
    yield b'], "class_names": ' + json.dumps(class_names).encode("utf-8") + b"}"


def convert_folder(
    source: Union[str, Path],
    out: Union[str, Path],
    resolution: int,
    transform: str = "center-crop",
    labels: str = "none",
    max_images: Optional[int] = None,
    overwrite: bool = False,
    progress: bool = True,
    on_skip: Optional[Callable[[str, str], None]] = None,
) -> ConvertResult:
    """Convert every image under ``source`` into an EDM-format data set at ``out`` (streamed, atomic).

    Two streaming passes over the source tree (:func:`scan_source` counts the files and finds the
    classes, then the conversion); memory does not grow with the number of images beyond 8 bytes
    per label and the zip directory's ~45 bytes per entry (:class:`StoredZipWriter`).

    Args:
        source: folder of images (any depth, any sizes; see the module docstring).
        out: ``*.zip`` (stored, uncompressed) or a folder path.
        resolution: output side R in pixels (>= 1).
        transform: ``"center-crop"`` or ``"center-crop-dhariwal"`` (:data:`TRANSFORMS`).
        labels: ``"none"`` (``{"labels": null}``) or ``"folders"`` (top-level folder = class).
        max_images: stop after writing this many images (unreadable files do not count); None: all.
        overwrite: replace an existing ``out`` (a folder only if it holds nothing but PNGs and
            ``dataset.json``).
        progress: show a tqdm bar (images written / to write) on stderr.
        on_skip: called as ``on_skip(relative_path, reason)`` for each unreadable file.
    Returns:
        A :class:`ConvertResult`.
    Raises:
        DatasetError: source missing or holding no image files; no readable image; an image
            outside a class folder with ``labels="folders"``; a class folder appearing mid-run.
        InputError (a ValueError): bad ``resolution``, ``transform``, ``labels`` or ``max_images``.
        OutputExistsError (an InputError and FileExistsError): ``out`` exists and ``overwrite`` is
            False (or it is a folder with other files).
    """
    from tqdm import tqdm

    source = Path(source).expanduser()
    out = Path(out).expanduser()
    resolution = int(resolution)
    if resolution < 1:
        raise InputError(f"resolution must be >= 1, got {resolution}")
    if transform not in TRANSFORMS:
        raise InputError(f"unknown transform {transform!r}; choose one of {', '.join(TRANSFORMS)}")
    if labels not in LABEL_MODES:
        raise InputError(f"unknown labels mode {labels!r}; choose one of {', '.join(LABEL_MODES)}")
    if max_images is not None and int(max_images) < 1:
        raise InputError(f"max_images must be >= 1, got {max_images}")
    if out.exists():
        if not overwrite:
            raise OutputExistsError(f"output exists: {out} (add --overwrite to replace it)")
        if out.is_dir() and not _is_dataset_folder(out):
            raise OutputExistsError(f"refusing to overwrite {out}: it holds files other than PNGs and {LABELS_FILE}")

    num_files, class_names, num_other, other = scan_source(source, labels)
    if num_files == 0:
        raise DatasetError(f"no image files ({', '.join(IMAGE_EXTENSIONS[:3])}, ...) in {source}")
    class_index = {c: i for i, c in enumerate(class_names)} if class_names is not None else None
    target = num_files if max_images is None else min(num_files, int(max_images))
    label_out: Optional[array] = array("q") if class_index is not None else None
    result = ConvertResult(out=out, num_images=0, resolution=resolution, class_names=class_names,
                           ignored=other, num_ignored=num_other, num_candidates=num_files)

    def convert_all(put: Callable[[str, bytes], None]) -> None:
        bar = tqdm(total=target, unit="img", desc=f"converting {source.name}", disable=not progress,
                   mininterval=0.5, dynamic_ncols=True)
        try:
            for rel in walk_sorted(source):
                if result.num_images >= target:
                    break
                cls = None
                if class_index is not None:
                    cls = class_index.get(rel.partition("/")[0])
                    if cls is None or "/" not in rel:
                        raise DatasetError(f"{source} changed during the conversion: {rel} is not in a class "
                                           f"folder seen before")
                try:
                    img = load_rgb(source / rel)
                except UnreadableImage as exc:
                    result.skipped.append((rel, str(exc)))
                    if on_skip is not None:
                        on_skip(rel, str(exc))
                    continue
                arr = transform_image(img, transform, resolution)
                del img
                put(image_name(result.num_images), encode_png(arr))
                if label_out is not None:
                    label_out.append(cls)
                result.num_images += 1
                bar.update(1)
        finally:
            bar.close()
        if result.num_images == 0:
            raise DatasetError(f"none of the {num_files} image files in {source} could be read "
                               f"(first: {result.skipped[0][0]}: {result.skipped[0][1]})")

    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".zip":
        from sims.utils import atomic_write

        def write_zip(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                zw = StoredZipWriter(f)
                convert_all(zw.writestr)
                zw.write_streamed(LABELS_FILE, _metadata_chunks(label_out, class_names))
                zw.close()

        if out.is_dir():
            shutil.rmtree(out)
        atomic_write(out, write_zip)
        return result

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        def put(name: str, data: bytes) -> None:
            p = tmp / name
            p.parent.mkdir(exist_ok=True)
            p.write_bytes(data)

        convert_all(put)
        with open(tmp / LABELS_FILE, "wb") as meta:
            for chunk in _metadata_chunks(label_out, class_names):
                meta.write(chunk)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return result


def skipped_summary(skipped: List[Tuple[str, str]], limit: int = 20) -> str:
    """One line ``skipped K unreadable files: a.jpg, b.png, ...`` (at most ``limit`` names, then ``(+M more)``)."""
    names = [name for name, _ in skipped]
    shown = ", ".join(names[:limit])
    more = f", ... (+{len(names) - limit} more)" if len(names) > limit else ""
    return f"skipped {len(names)} unreadable file{'s' if len(names) != 1 else ''}: {shown}{more}"
