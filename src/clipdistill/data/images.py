"""Opening an image file the same way everywhere (embedding, training, `predict`).

Pillow's `convert("RGB")` is right for 8-bit images but not for the others: a 16-bit PNG
(mode I;16) comes out almost white and a float TIFF (mode F) black, because the values are
clipped instead of scaled. Here they are scaled to 0-255 first. EXIF orientation is applied,
as a photo viewer shows it. Only Pillow and numpy are needed: `predict` runs on devices
without torch."""

from __future__ import annotations

import os
import warnings

import numpy as np


class UnreadableImage(OSError):
    """The file is not an image Pillow can decode (or is too large to decode safely)."""


def _scaled_to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    a = a.astype(np.float64)
    finite = a[np.isfinite(a)]
    hi = float(finite.max()) if finite.size else 0.0
    lo = float(finite.min()) if finite.size else 0.0
    if mode.startswith("I;16") or (mode == "I" and lo >= 0 and hi <= 65535 and hi > 255):
        a = a / 257.0  # 16-bit: 65535 -> 255
    elif mode == "F" and lo >= 0 and hi <= 1.0:
        a = a * 255.0  # float images in [0, 1]
    elif hi > 255 or lo < 0:
        a = (a - lo) * (255.0 / max(hi - lo, 1e-12))  # other ranges: stretched to 0-255
    return np.clip(np.nan_to_num(a), 0, 255).round().astype(np.uint8)


def to_rgb(im):
    """A PIL image in any mode -> 8-bit RGB, scaling high-bit-depth and float data."""
    from PIL import Image

    if im.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        gray = _scaled_to_uint8(np.asarray(im), im.mode)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if im.mode == "RGB":
        return im
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        return im.convert("RGBA").convert("RGB")
    return im.convert("RGB")


def open_rgb(path: str | os.PathLike):
    """The file decoded now as an 8-bit RGB PIL image; UnreadableImage (naming the file)
    when it cannot be: not an image, truncated, or over Pillow's decompression-bomb limit."""
    from PIL import Image, ImageOps

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()  # decode now: a truncated file fails here, not later in a batch
                try:
                    im = ImageOps.exif_transpose(im)
                except Exception:  # noqa: BLE001 - a broken EXIF block must not lose the image
                    pass
                return to_rgb(im)
    except Image.DecompressionBombError as e:
        raise UnreadableImage(f"too large to decode safely ({e})") from None
    except (OSError, ValueError, SyntaxError, MemoryError) as e:  # PIL's ways of saying "not an image I can read"
        if isinstance(e, UnreadableImage):
            raise
        raise UnreadableImage(f"{type(e).__name__}: {e}") from None


def display_path(path: str | os.PathLike) -> str:
    """A path as text that can always be printed or written to JSON (undecodable bytes of a
    non-UTF-8 file name shown as \\xNN)."""
    raw = os.fsencode(path)
    return raw.decode("utf-8", "backslashreplace")
