"""Arrays computed once per split and kept on disk: one `.npy` per array plus a manifest.

The design behind the embedding cache (teacher outputs) and the pixel store (decoded,
resized images): each array has one row per image of the split, filled in order; the
manifest records who made it (the `owner`: dataset and teacher fingerprints, pixel side)
and how far it got (`done`), so a killed filler resumes where it stopped and arrays made
from other data are refused instead of silently mixed in. `valid` says what became of each
row's image: KEPT (1), SKIPPED (0: its bytes are not an image that decodes; final, listed in
`skipped_items`) or RETRY (2: the *reading* failed — a vanished file, no permission, an I/O
error, a shard the reader could not open — listed in `retry_items` by row). Readers use KEPT
rows only; the next filler tries RETRY rows again, so a failure that depends on the reader,
not on the content the store is keyed by, is never remembered as final.

Nothing on disk is trusted blindly: opening checks the manifest against the arrays (file
sizes, shapes, dtypes, `done <= count`, `complete` only when every row is done) plus each
kind's own row check (finite embeddings). A writer rebuilds a damaged store (it is only a
cache) and says so; a reader refuses it with the command that rebuilds it. Space for every
array is reserved when it is created: a memmap written past a full disk dies of SIGBUS
with no message, a reservation fails with one."""

from __future__ import annotations

import errno
import logging
import mmap
import os
import time
from pathlib import Path
from typing import Optional

import numpy as np

from ..core import atomic
from ..core.errors import CacheMismatchError, ClipDistillError, MissingResourceError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
VALID = "valid.npy"
SKIPPED, KEPT, RETRY = 0, 1, 2  # the values of valid.npy


class CacheDamagedError(ClipDistillError):
    """A store's files disagree with its manifest, or its rows fail their check."""


class CacheStaleError(CacheDamagedError):
    """The same images by name (dataset, folder, split) whose content changed since they were
    stored: a user who edits their --eval folder or regenerates it in place. Handled as a damaged
    store is: a writer rebuilds it (saying so), a reader refuses it with the rebuild command. It
    used to be a mismatch, refused everywhere with 'delete that folder': hand work for a change
    that only means the cache is out of date."""


# Keys of a dataset fingerprint that say what the images are now, not which images they are;
# a store whose dataset differs in these alone is out of date, not someone else's.
CONTENT_KEYS = frozenset({"n", "listing_sha1", "content_sha1"})


def unwritable(e: OSError, ready: Optional["ArrayStore"], what: str, path) -> "ArrayStore":
    """A store that had to be written met a folder it cannot write (read-only, not ours): it is
    served as it is when `ready` (complete but for reads to try again), else refused naming the
    fix. Any other OSError is raised again."""
    if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
        raise e
    if ready is None:
        raise ClipDistillError(f"the {what} {path} must be (re)built but cannot be written ({e.strerror}); "
                               f"give a writable --cache-dir") from None
    log.warning("%d images of the %s %s could not be read before and are not tried again: it cannot be written "
                "(%s)", len(ready.retry_rows()), what, path, e.strerror)
    return ready


def warn_skipped(logger: logging.Logger, errors) -> None:
    """Say what became of each image that could not be stored: (row, message, again)."""
    for _, message, again in errors:
        if again:
            logger.warning("could not read %s; it is tried again next time", message)
        else:
            logger.warning("skipped unreadable image %s", message)


def _diff(old: dict, new: dict) -> str:
    keys = sorted(set(old) | set(new))
    return "; ".join(f"{k}: cached {old.get(k)!r} vs now {new.get(k)!r}" for k in keys if old.get(k) != new.get(k))


def _only_content_changed(manifest: dict, owner: dict, shape: Optional[dict]) -> bool:
    """True when the stored owner differs from `owner` in the dataset's content keys alone (the
    count of rows may follow the content)."""
    old, new = manifest.get("dataset"), owner.get("dataset")
    if not isinstance(old, dict) or not isinstance(new, dict):
        return False
    if any(k != "dataset" and want is not None and manifest.get(k) != want for k, want in owner.items()):
        return False
    changed = {k for k in set(old) | set(new) if old.get(k) != new.get(k)}
    if not changed or not changed <= CONTENT_KEYS:
        return False
    return shape is None or all(manifest.get(k) == v for k, v in shape.items() if k != "count")


def open_array(path: Path, dtype, shape: tuple, mode: str) -> np.ndarray:
    """The .npy at `path` as a memmap, or CacheDamagedError saying what is wrong with it."""
    if not path.is_file():
        raise CacheDamagedError(f"{path.name} is missing")
    try:
        # Read-only first: numpy's "r+" pads a truncated file with zeros instead of failing.
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
        if arr.dtype != np.dtype(dtype) or arr.shape != shape:
            raise CacheDamagedError(f"{path.name} is {arr.dtype} {arr.shape}, the manifest says {np.dtype(dtype)} "
                                    f"{shape}")
        if mode != "r":
            del arr
            arr = np.load(path, mmap_mode=mode, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:  # a broken header, a truncated file
        raise CacheDamagedError(f"{path.name} cannot be read ({type(e).__name__}: {str(e)[:100]})") from None
    return arr


def release_pages(arr: np.ndarray) -> None:
    """Unmap a flushed memmap's pages from this process (MADV_DONTNEED): the data stays in the
    file and the page cache, but written pages no longer count in the filler's resident memory,
    which would otherwise grow by the whole array (2.5 GB for 200,000 images at 64 px)."""
    mm = getattr(arr, "_mmap", None)
    if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        try:
            mm.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):  # a platform without it: only memory is at stake
            pass


def _reserve(path: Path, dtype, shape: tuple) -> None:
    try:
        arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
        arr.flush()
        del arr
        with open(path, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            path.unlink(missing_ok=True)
            raise atomic.disk_full(path, e) from None
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)):
            raise


class ArrayStore:
    """Rows `[0, done)` of every array are final. A kind of store says which arrays it holds
    (`layout`), what owns it (`owner`), its size keys (`shape`) and how to talk about it."""

    FORMAT = 2  # 2: checked on open (sizes, shapes, row checks)
    kind = "array store"             # "the {kind} {path} ..."
    owner_words = "other data"       # "... was made by {owner_words}"
    fill_command = "the command that made it"   # "run {fill_command} first / again to finish it"
    rebuild_command = "delete that folder (it is only a cache: the next command makes it again)"

    def __init__(self, path: Path, manifest: dict, mode: str):
        self.path = Path(path)
        self.manifest = manifest
        self.arrays = {}
        try:
            layout = self.layout(manifest)
        except (KeyError, TypeError, ValueError) as e:
            raise CacheDamagedError(f"{MANIFEST} lacks what it must say ({type(e).__name__}: {e})") from None
        for name, (file, dtype, shape) in layout.items():
            self.arrays[name] = open_array(self.path / file, dtype, shape, mode)
        self.valid = self.arrays["valid"]
        done = self.done
        if not 0 <= done <= self.count:
            raise CacheDamagedError(f"the manifest says {done} rows are done of {self.count}")
        if self.complete != (done == self.count):
            raise CacheDamagedError(f"the manifest says complete={self.complete} with {done} of {self.count} rows done")
        self.check_rows(done)

    # ------------------------------------------------------------------ what a kind says
    @classmethod
    def layout(cls, manifest: dict) -> dict[str, tuple[str, str, tuple]]:
        """name -> (file, dtype, shape) of every array, `valid` included, from the manifest."""
        return {"valid": (VALID, "uint8", (int(manifest["count"]),))}

    def check_rows(self, done: int) -> None:
        """Raise CacheDamagedError when a finished row cannot be right (e.g. non-finite)."""

    # ------------------------------------------------------------------ opening
    @classmethod
    def _read_manifest(cls, path: Path) -> dict:
        try:
            manifest = atomic.read_json(path / MANIFEST)
        except ClipDistillError as e:
            raise CacheDamagedError(str(e)) from None
        if not isinstance(manifest, dict) or manifest.get("format") != cls.FORMAT:
            raise CacheDamagedError(f"{MANIFEST} is of format "
                                    f"{manifest.get('format') if isinstance(manifest, dict) else '?'}"
                                    f", not {cls.FORMAT} (made by another version of clipdistill)")
        return manifest

    @classmethod
    def _check_owner(cls, path: Path, manifest: dict, owner: dict, shape: Optional[dict]) -> None:
        problems = []
        for key, want in owner.items():
            if want is not None and manifest.get(key) != want:
                got = manifest.get(key)
                detail = (_diff(got, want) if isinstance(got, dict) and isinstance(want, dict)
                          else f"{got!r} vs {want!r}")
                problems.append(f"{key} differs ({detail})")
        if shape is not None and any(manifest.get(k) != v for k, v in shape.items()):
            problems.append(f"shape differs: cached {'x'.join(str(manifest.get(k)) for k in shape)}, now "
                            f"{'x'.join(str(v) for v in shape.values())}")
        if problems and _only_content_changed(manifest, owner, shape):
            change = _diff(manifest["dataset"], owner["dataset"])
            raise CacheStaleError(f"its images changed since they were stored ({change})")
        if problems:
            raise CacheMismatchError(
                f"the {cls.kind} {path} was made by {cls.owner_words}: {'; '.join(problems)}. "
                f"Refusing to mix them: {cls.rebuild_command}, or use another --cache-dir.")

    @classmethod
    def open_for_writing(cls, path: str | Path, owner: dict, shape: dict, extra: Optional[dict] = None,
                         overwrite: bool = False):
        """Continue a store made by the same owner at the same shape, or create one. A damaged
        store is rebuilt (with a warning naming what was wrong)."""
        path = Path(path)
        if (path / MANIFEST).exists() and not overwrite:
            try:
                manifest = cls._read_manifest(path)
                cls._check_owner(path, manifest, owner, shape)
                return cls(path, manifest, "r+")
            except CacheStaleError as e:
                log.warning("the %s %s is out of date: %s; rebuilding it", cls.kind, path, e)
            except CacheDamagedError as e:
                log.warning("the %s %s is damaged (%s); rebuilding it", cls.kind, path, e)
        return cls._create(path, owner, shape, extra or {})

    @classmethod
    def _create(cls, path: Path, owner: dict, shape: dict, extra: dict):
        path.mkdir(parents=True, exist_ok=True)
        manifest = {"format": cls.FORMAT, **owner, **shape, **extra, "done": 0, "complete": shape["count"] == 0,
                    "skipped": 0, "skipped_items": [], "retry_items": {}, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        layout = cls.layout(manifest)
        for name in [MANIFEST] + [f for f, _, _ in layout.values()]:
            (path / name).unlink(missing_ok=True)
        for file, dtype, shp in layout.values():
            _reserve(path / file, dtype, shp)
        atomic.write_json(path / MANIFEST, manifest)
        return cls(path, manifest, "r+")

    @classmethod
    def load_complete(cls, path: str | Path, owner: Optional[dict] = None, shape: Optional[dict] = None):
        """Open a complete store read-only (what training uses); needs no write access.
        Incomplete: MissingResourceError; damaged: CacheDamagedError; foreign: CacheMismatchError."""
        path = Path(path)
        if not (path / MANIFEST).exists():
            raise MissingResourceError(f"no {cls.kind} at {path}; run {cls.fill_command} first")
        try:
            manifest = cls._read_manifest(path)
            if owner is not None:
                cls._check_owner(path, manifest, owner, shape)
            if not manifest.get("complete"):
                raise MissingResourceError(f"the {cls.kind} {path} is incomplete ({manifest.get('done')}/"
                                           f"{manifest.get('count')}); run {cls.fill_command} again to finish it")
            return cls(path, manifest, "r")
        except CacheDamagedError as e:
            state = "out of date" if isinstance(e, CacheStaleError) else "damaged"
            raise type(e)(f"the {cls.kind} {path} is {state}: {e}. Run the same command with write "
                                    f"access to it (it is rebuilt), or {cls.rebuild_command}") from None

    # ------------------------------------------------------------------ state
    @property
    def done(self) -> int:
        return int(self.manifest["done"])

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    @property
    def count(self) -> int:
        return int(self.manifest["count"])

    def valid_indices(self) -> np.ndarray:
        return np.flatnonzero(np.asarray(self.valid[: self.done]) == KEPT)

    def retry_rows(self) -> np.ndarray:
        """Done rows whose reading failed: a filler tries them again. A store written before
        failures were told apart (no `retry_items` in its manifest) tries every skipped row
        once, which sorts them."""
        want = RETRY if "retry_items" in self.manifest else SKIPPED
        return np.flatnonzero(np.asarray(self.valid[: self.done]) == want)

    def start_retry(self) -> np.ndarray:
        """The rows to try again, for a filler holding the store's lock. An older store's skipped
        rows are first marked RETRY (their messages cannot be told apart), so that a retry cut
        short by a kill goes on next time instead of leaving rows skipped without a word."""
        if "retry_items" not in self.manifest:
            rows = self.retry_rows()
            self.valid[rows] = RETRY
            self.manifest["skipped_items"] = []
            self.manifest["retry_items"] = {}
            self.commit(self.done, [(r, "skipped by an earlier version of clipdistill; tried again", True)
                                    for r in rows])
        return self.retry_rows()

    # ------------------------------------------------------------------ writing
    def write_rows(self, start: int, valid: np.ndarray, **rows: np.ndarray) -> None:
        end = start + len(valid)
        for name, value in rows.items():
            arr = self.arrays[name]
            arr[start:end] = value.astype(arr.dtype, copy=False)
        self.valid[start:end] = valid.astype(np.uint8)

    def write_scattered(self, rows: np.ndarray, valid: np.ndarray, **values: np.ndarray) -> None:
        """Rewrite some done rows (those tried again), anywhere in the arrays."""
        rows = np.asarray(rows, dtype=np.int64)
        for name, value in values.items():
            arr = self.arrays[name]
            arr[rows] = value.astype(arr.dtype, copy=False)
        self.valid[rows] = valid.astype(np.uint8)

    def commit(self, done: int, skipped_items=(), settled=()) -> None:
        """Make rows [0, done) durable, then say so: data first, manifest second.

        `skipped_items`: what failed in these rows, each `(row, message, again)` (`again`: the
        reading failed, tried again later) or, from older callers, a final message. `settled`:
        rows tried again, whose earlier retry entries are dropped first."""
        for arr in self.arrays.values():
            arr.flush()
            release_pages(arr)
        skipped = list(self.manifest.get("skipped_items", []))
        settled = {int(r) for r in settled}
        retry = {k: v for k, v in self.manifest.get("retry_items", {}).items() if int(k) not in settled}
        for item in skipped_items:
            if isinstance(item, str):
                skipped.append(item)
                continue
            row, message, again = item
            if again:
                retry[str(int(row))] = message
            else:
                skipped.append(message)
        self.manifest["skipped_items"] = skipped
        self.manifest["retry_items"] = dict(sorted(retry.items(), key=lambda kv: int(kv[0])))
        self.manifest["skipped"] = len(skipped) + len(retry)
        self.manifest["done"] = int(done)
        self.manifest["complete"] = done >= self.count
        self.manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        atomic.write_json(self.path / MANIFEST, self.manifest)
