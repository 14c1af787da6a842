"""Decoding, EDM's resize/crop transforms and PNG encoding of one image, for :mod:`sims.data.convert`.

:func:`load_rgb` opens any image file as RGB (Pillow's ``convert("RGB")``, 16-bit grayscale mapped
to 8 bits); :func:`transform_image` applies ``center-crop`` (EDM) or ``center-crop-dhariwal``
(EDM2/ADM); :func:`encode_png` writes EDM's uncompressed PNG. The exact rules and their sources
are listed in the docstring of :mod:`sims.data.convert`.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Callable, Dict, Union

import numpy as np

from sims.errors import InputError

TRANSFORMS = ("center-crop", "center-crop-dhariwal")
PNG_COMPRESS_LEVEL = 0  # EDM's dataset_tool: compress_level=0, optimize=False


class UnreadableImage(Exception):
    """A source file that cannot be decoded into an RGB image (message: the reason)."""


def load_rgb(path: Union[str, Path]):
    """Open an image file as a fully decoded RGB ``PIL.Image`` (the conversion rules in :mod:`sims.data.convert`).

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
