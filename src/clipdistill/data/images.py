"""Opening an image file the same way everywhere (embedding, training, `predict`).

Pillow's `convert("RGB")` is right for 8-bit images but not for the others: a 16-bit PNG
(mode I;16) comes out almost white and a float TIFF (mode F) black, because the values are
clipped instead of scaled. Here they are scaled to 0-255 first. EXIF orientation is applied,
as a photo viewer shows it. Only Pillow and numpy are needed: `predict` runs on devices
without torch.

A file is read first, whole but never past `MAX_FILE_BYTES`, then decoded from memory. That
keeps two failures apart which callers treat differently: `UnreadableImage` says the *bytes*
are not an image (final: the same bytes fail again), any other OSError says the *reading*
failed (a vanished file, no permission, an I/O error: worth trying again later). It also means
a FIFO or a device named `.png` is refused at once instead of read for ever."""

from __future__ import annotations

import io
import os
import re
import stat
import warnings

import numpy as np

# The largest file read as one image: Pillow refuses to decode more than 2 x MAX_IMAGE_PIXELS
# (2 x 89,478,485) pixels, which as uncompressed 8-bit RGB is 512 MiB. A larger file cannot be
# an image we would decode, so it is refused before any of it is read (a tar member of 2 GB
# once cost 4.7 GB of memory to index).
MAX_FILE_BYTES = 512 << 20


class UnreadableImage(OSError):
    """The bytes are not an image Pillow can decode (or are too large to decode safely)."""


def is_final(error: BaseException) -> bool:
    """Whether a failure to load an image is the bytes' own (the same bytes would fail again):
    True for UnreadableImage; False for a failed read, which a later run tries again."""
    return isinstance(error, UnreadableImage)


class LoadedRows:
    """Rows of a dataset, each loaded and passed through `transform`, for a DataLoader (the
    teacher's preprocess when embedding, a resize when filling the pixel store). An unreadable
    image becomes a hole, not a crash: item i is (transform(image), row, None) or
    (None, row, (message, again)), `again` saying whether a later reading may succeed (a failed
    read) or not (a file that is not an image)."""

    def __init__(self, ds, transform, rows):
        self.ds, self.transform, self.rows = ds, transform, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        idx = int(self.rows[i])
        try:
            return self.transform(self.ds.load(idx)), idx, None
        except Exception as e:  # noqa: BLE001 - any unreadable file is skipped and reported
            return None, idx, (f"{self.ds.describe(idx)}: {type(e).__name__}: {e}", not is_final(e))


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a plain file"


def not_regular(mode: int) -> str:
    """Why a file of this st_mode is never read as an image ('' for a regular file)."""
    return "" if stat.S_ISREG(mode) else f"not a regular file ({_kind(mode)}); not read"


def read_bytes(path: str | os.PathLike, limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular file of at most `limit` bytes. A larger file or one that is not a
    regular file: UnreadableImage, with nothing read. Opened without blocking, so a FIFO is
    refused instead of waited on; a failed open or read raises its own OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnreadableImage(not_regular(st.st_mode))
        if st.st_size > limit:
            raise UnreadableImage(f"{st.st_size} bytes, over the {limit}-byte limit for one image file; not read")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise UnreadableImage(f"over the {limit}-byte limit for one image file (it grew while read)")
    return data


_BYTESIO = re.compile(r"<_io\.BytesIO object at 0x[0-9a-f]+>")


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


def open_rgb(path: str | os.PathLike | io.BytesIO):
    """The file (or bytes in memory) decoded now as an 8-bit RGB PIL image. UnreadableImage
    when the bytes cannot be: not an image, truncated, over MAX_FILE_BYTES or over Pillow's
    decompression-bomb limit; the OSError of the read when the file cannot be read."""
    from PIL import Image, ImageOps

    if not isinstance(path, io.BytesIO):
        path = io.BytesIO(read_bytes(path))
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
        raise UnreadableImage(_BYTESIO.sub("it", f"{type(e).__name__}: {e}")) from None


def display_path(path: str | os.PathLike) -> str:
    """A path as text that can always be printed or written to JSON (undecodable bytes of a
    non-UTF-8 file name shown as \\xNN)."""
    raw = os.fsencode(path)
    return raw.decode("utf-8", "backslashreplace")
