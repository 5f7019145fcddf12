"""What every dataset offers the rest of the pipeline, in one place.

A dataset is one split (`train`, `unlabeled`, `test`, ...) of a named source. The teacher
stages need `classes`, `prompts` (one zero-shot prompt per class), `templates` (optional,
averaged as open_clip's zero-shot classifier does), a `fingerprint()` that keys every cache
made from it, and a `slug()` that names those cache folders; the student stages need its
`targets` and its `pixels()`. `load(i)` gives one decoded image. Datasets that hold their
pixels in memory (STL10, shapes10) return them from `pixels()` as they are; folders decode
every file once at a chosen side. Each is also a torch `Dataset` of `(image, label)`."""

from __future__ import annotations

import abc
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np
import torch.utils.data

log = logging.getLogger(__name__)

# Side at which datasets without a native size (folders of photos) are decoded for students.
DEFAULT_DECODE_SIZE = 96


class ImageDataset(torch.utils.data.Dataset, abc.ABC):
    name: str = ""
    split: str = ""
    classes: list[str]
    prompts: list[str]
    templates: Optional[list[str]] = None
    targets: np.ndarray  # int64, -1 where the label is unknown

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def load(self, i: int):
        """Image `i` as an RGB PIL image; raises OSError (data.images.UnreadableImage) when it cannot be read."""

    @abc.abstractmethod
    def fingerprint(self) -> dict:
        """What identifies the images (not where they are cached): enters every cache manifest."""

    @abc.abstractmethod
    def slug(self) -> str:
        """A readable folder name for this dataset's caches; the fingerprint is the real key."""

    native_size: Optional[int] = None  # side of the in-memory pixels, if the dataset has one

    def __getitem__(self, i: int):
        return self.load(i), int(self.targets[i])

    def describe(self, i: int) -> str:
        """Where item i comes from, for messages about it."""
        return f"{self.name} {self.split} item {i}"

    # Where the decoded pixels are kept on disk (data/pixel_store.py); None: decoded into memory.
    store_dir: Optional[str] = None

    def pixels(self, decode_size: Optional[int] = None, progress: bool = False):
        """All images as uint8 (N, H, W, 3): an array, or rows read on demand from the pixel
        store (`StoredPixels`, indexed like one). This default decodes every file once at
        `decode_size` (default 96 px): into the pixel store under `store_dir` when there is one
        (built once, shared by every run, read without holding it in memory), else into an
        in-memory array. An unreadable file becomes a black image, which the embedding cache's
        valid mask keeps out of training."""
        size = decode_size or DEFAULT_DECODE_SIZE
        cached = getattr(self, "_pixels", None)
        if cached is not None and cached.shape[1] == size:
            return cached
        if self.store_dir:
            from .pixel_store import fill_pixel_store

            self._pixels = fill_pixel_store(self, self.store_dir, size, progress=progress).reader()
            return self._pixels
        from PIL import Image

        from ..core.progress import bar

        out = np.zeros((len(self), size, size, 3), dtype=np.uint8)

        def decode(i: int) -> None:
            try:
                out[i] = np.asarray(self.load(i).resize((size, size), Image.BILINEAR), dtype=np.uint8)
            except OSError:  # reported when the embedding cache was built
                pass

        with ThreadPoolExecutor(max_workers=4) as pool:
            list(bar(pool.map(decode, range(len(self))), total=len(self), desc=f"decode {self.split} images",
                     enabled=progress, unit="img"))
        self._pixels = out
        return out


class InMemoryDataset(ImageDataset):
    """A split whose pixels are one uint8 array `data` (N, H, W, 3)."""

    data: np.ndarray

    def __len__(self) -> int:
        return len(self.data)

    @property
    def native_size(self) -> int:  # type: ignore[override]
        return int(self.data.shape[1])

    def load(self, i: int):
        from PIL import Image

        return Image.fromarray(self.data[i])

    def pixels(self, decode_size: Optional[int] = None, progress: bool = False) -> np.ndarray:
        """The array itself: students resize batches on the fly to their own side."""
        return self.data


class FileDataset(ImageDataset):
    """A split whose images are files (`self.files`), decoded on demand: labelled folders and
    pools. Prompts default to "a photo of a CLASS"."""

    files: list

    def default_prompts(self) -> list[str]:
        return [f"a photo of a {c.replace('_', ' ')}" for c in self.classes]

    def __len__(self) -> int:
        return len(self.files)

    def load(self, i: int):
        from .images import open_rgb

        return open_rgb(self.files[i])

    def describe(self, i: int) -> str:
        from .images import display_path

        return display_path(self.files[i])

