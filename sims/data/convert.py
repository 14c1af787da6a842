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
directory is kept in compact arrays (:class:`sims.data.zip_writer.StoredZipWriter`, ~45 bytes per entry; ``zipfile``
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

import json
import os
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Union

from sims.data.image_folder import LABELS_FILE, _is_dataset_folder, image_name
from sims.data.image_transforms import TRANSFORMS, UnreadableImage, encode_png, load_rgb, transform_image
from sims.data.zip_writer import write_dataset
from sims.errors import DatasetError, InputError, OutputExistsError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                    ".ppm", ".pgm", ".pnm")
LABEL_MODES = ("none", "folders")


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


# ------------------------------------------------------------------------------------ writing
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
    per label and the zip directory's ~45 bytes per entry (:class:`sims.data.zip_writer.StoredZipWriter`).

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

    def emit(put) -> None:
        convert_all(put)
        put(LABELS_FILE, _metadata_chunks(label_out, class_names))

    write_dataset(out, emit)
    return result


def skipped_summary(skipped: List[Tuple[str, str]], limit: int = 20) -> str:
    """One line ``skipped K unreadable files: a.jpg, b.png, ...`` (at most ``limit`` names, then ``(+M more)``)."""
    names = [name for name, _ in skipped]
    shown = ", ".join(names[:limit])
    more = f", ... (+{len(names) - limit} more)" if len(names) > limit else ""
    return f"skipped {len(names)} unreadable file{'s' if len(names) != 1 else ''}: {shown}{more}"
