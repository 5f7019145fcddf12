"""The pixel store: a split's images decoded once, resized to one side, as one uint8 array on
disk (an `ArrayStore`: manifest, fingerprint, resumable, checked on open).

Folders and pools are files: decoding them again for every run costs minutes, and holding them
decoded in RAM costs N x S x S x 3 bytes (a million images at 96 px: 27.6 GB). The store is built
once per (images, side) under the cache folder and shared by every run that reads them; runs
read their batches with `pread` (`StoredPixels`), not through a memory map, so the pages they
touched stay in the kernel's page cache and not in the run's resident memory: a run's footprint
no longer grows with the number of images. Files are decoded in parallel by DataLoader workers
while the store is filled. An image whose reading failed (not its bytes: see data/store.py) is
a RETRY row, decoded again by the next filler."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Optional

import numpy as np

from ..core.errors import MissingResourceError
from ..core.locks import exclusive
from ..core.workers import WorkerInit, auto_workers
from .images import LoadedRows
from .store import KEPT, RETRY, SKIPPED, VALID, ArrayStore, CacheDamagedError, unwritable, warn_skipped

log = logging.getLogger(__name__)

ARRAY = "pixels.npy"
RESIZE = "PIL bilinear, whole image to a square"


def store_path(cache_dir: str | os.PathLike, dataset_slug: str, split: str, size: int) -> Path:
    return Path(cache_dir) / "pixels" / dataset_slug / split / f"{size}px"


class PixelStore(ArrayStore):
    """`pixels.npy` (count x size x size x 3, uint8), owned by a dataset fingerprint and a side."""

    kind = "pixel store"
    owner_words = "other images or at another side"
    fill_command = "the same command with write access to the cache folder"
    rebuild_command = "delete that folder"

    @classmethod
    def layout(cls, manifest: dict) -> dict:
        n, s = int(manifest["count"]), int(manifest["size"])
        return {"pixels": (ARRAY, "uint8", (n, s, s, 3)), **super().layout(manifest)}

    @property
    def size(self) -> int:
        return int(self.manifest["size"])

    def reader(self) -> "StoredPixels":
        return StoredPixels(self.path / ARRAY, self.count, self.size)

    def __repr__(self) -> str:
        return f"PixelStore({self.path}, {self.done}/{self.count} at {self.size} px, complete={self.complete})"


class StoredPixels:
    """Rows of a complete store's array, read with `pread` into fresh arrays: what the trainer
    gathers its batches from (`images[rows]`), in place of an in-memory array."""

    def __init__(self, file: Path, count: int, size: int):
        self.file, self.shape, self.dtype = Path(file), (count, size, size, 3), np.dtype(np.uint8)
        head = np.load(self.file, mmap_mode="r", allow_pickle=False)
        self.offset = int(head.offset)
        del head
        self.row_bytes = size * size * 3
        self._fd: Optional[int] = None
        self._pid = -1

    def __len__(self) -> int:
        return self.shape[0]

    def _handle(self) -> int:
        if self._fd is None or self._pid != os.getpid():  # a forked worker opens its own
            self._fd, self._pid = os.open(self.file, os.O_RDONLY), os.getpid()
        return self._fd

    def read(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        out = np.empty((len(rows),) + self.shape[1:], dtype=np.uint8)
        if not len(rows):
            return out
        if rows.min() < 0 or rows.max() >= self.shape[0]:
            raise IndexError(f"rows outside 0..{self.shape[0] - 1} of {self.file}")
        fd, flat = self._handle(), out.reshape(len(rows), -1)
        order = np.argsort(rows, kind="stable")
        i = 0
        while i < len(order):  # consecutive rows in one read
            j = i
            while j + 1 < len(order) and rows[order[j + 1]] == rows[order[j]] + 1 and order[j + 1] == order[j] + 1:
                j += 1
            start, n = int(rows[order[i]]), j - i + 1
            view = memoryview(flat[order[i]: order[i] + n]).cast("B")
            got = os.preadv(fd, [view], self.offset + start * self.row_bytes)
            if got != n * self.row_bytes:
                raise CacheDamagedError(f"{self.file} is shorter than its manifest says (row {start})")
            i = j + 1
        return out

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            return self.read(np.array([int(key)]))[0]
        if isinstance(key, slice):
            return self.read(np.arange(*key.indices(self.shape[0])))
        return self.read(np.asarray(key))

    def __array__(self, dtype=None, copy=None):
        a = self.read(np.arange(self.shape[0]))
        return a if dtype is None else a.astype(dtype)

    def __del__(self):
        if self._fd is not None and self._pid == os.getpid():
            with contextlib.suppress(OSError):
                os.close(self._fd)


class _Resized:
    """An image as `size` x `size` uint8 pixels (bilinear), as the store holds it."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, im) -> np.ndarray:
        from PIL import Image

        if im.size != (self.size, self.size):
            im = im.resize((self.size, self.size), Image.BILINEAR)
        return np.asarray(im, dtype=np.uint8)


def _outcome(items, size: int):
    """A batch of LoadedRows items as (rows, pixels, valid, skipped items for `commit`)."""
    pixels = np.zeros((len(items), size, size, 3), dtype=np.uint8)
    valid = np.full(len(items), KEPT, dtype=np.uint8)
    errors = []
    for k, (im, idx, err) in enumerate(items):
        if err is None:
            pixels[k] = im
        else:
            valid[k] = RETRY if err[1] else SKIPPED
            errors.append((idx, *err))
    return np.array([idx for _, idx, _ in items], dtype=np.int64), pixels, valid, errors


def _collate(items):
    return items


def fill_pixel_store(ds, cache_dir: str | os.PathLike, size: int, workers: int = -1, batch: int = 256,
                     progress: bool = False) -> PixelStore:
    """The complete store of `ds` at `size` px, filled (or finished) first if need be. One
    filler at a time per store (a file lock): the others wait, then find it complete."""
    path = store_path(cache_dir, ds.slug(), ds.split, size)
    owner, shape = {"dataset": ds.fingerprint(), "resize": RESIZE}, {"count": len(ds), "size": int(size)}
    ready = None
    try:
        ready = PixelStore.load_complete(path, owner, shape)
        if not len(ready.retry_rows()):
            return ready
    except (MissingResourceError, CacheDamagedError):
        pass
    try:
        path.mkdir(parents=True, exist_ok=True)
        with exclusive(path / ".lock"):
            store = PixelStore.open_for_writing(path, owner, shape, {"dtype": "uint8", "array": ARRAY,
                                                                     "valid": VALID})
            again = store.start_retry()  # rows an earlier filler could not read: before this one's own
            if not store.complete:
                _fill(store, ds, size, workers, batch, progress)
            if len(again):
                _retry(store, ds, size, again, workers, batch)
    except OSError as e:
        return unwritable(e, ready, "pixel store", path)
    return store


def _fill(store: PixelStore, ds, size: int, workers: int, batch: int, progress: bool) -> None:
    from torch.utils.data import DataLoader

    from ..core.progress import bar as progress_bar

    start = store.done
    if start:
        log.info("resuming %s at %d/%d", store.path, start, store.count)
    loader = DataLoader(LoadedRows(ds, _Resized(size), range(start, store.count)), batch_size=batch, shuffle=False,
                        num_workers=auto_workers(workers), collate_fn=_collate,
                        worker_init_fn=WorkerInit())
    bar = progress_bar(total=store.count, initial=start, unit="img", desc=f"decode {ds.split} images at {size} px",
                       enabled=progress, end_line=False)  # the "wrote" line below ends it
    pos, t0 = start, time.time()
    for items in loader:
        _, pixels, valid, errors = _outcome(items, size)
        store.write_rows(pos, valid, pixels=pixels)
        pos += len(items)
        store.commit(pos, errors)
        warn_skipped(log, errors)
        bar.update(len(items))
    bar.close()
    log.info("wrote %s (%d images at %d px, %.0f img/s, skipped %d)", store.path / ARRAY, store.count, size,
             (pos - start) / max(time.time() - t0, 1e-9), store.manifest["skipped"])


def _retry(store: PixelStore, ds, size: int, rows: np.ndarray, workers: int, batch: int) -> None:
    """Decode again the rows whose reading failed in an earlier fill."""
    from torch.utils.data import DataLoader

    loader = DataLoader(LoadedRows(ds, _Resized(size), rows), batch_size=batch, shuffle=False,
                        num_workers=auto_workers(workers), collate_fn=_collate, worker_init_fn=WorkerInit())
    for items in loader:
        idx, pixels, valid, errors = _outcome(items, size)
        store.write_scattered(idx, valid, pixels=pixels)
        store.commit(store.done, errors, settled=idx)
        warn_skipped(log, errors)
    log.info("tried %d images of %s again whose reading had failed: %d read now", len(rows), store.path,
             len(rows) - len(store.retry_rows()))
