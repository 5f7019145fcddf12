"""The embedding cache: one float16 array per (teacher, dataset, split) plus a manifest.

Teacher outputs are computed once into one contiguous `.npy` that training reads with a
memmap (nanoGPT's `prepare.py` idea), instead of the study's one `.pt` file per image.
The manifest records who made the array (teacher and dataset fingerprints) and how far
it got (`done`), so a killed run resumes where it stopped and a cache made by another
teacher or preprocess is refused instead of silently mixed in.

Nothing on disk is trusted blindly: opening checks the manifest against the arrays (file
sizes, shapes, dtypes, `done <= count`, `complete` only when every row is done) and that the
finished rows are finite. A writer rebuilds a damaged cache (it is only a cache) and says
so; a reader refuses it with the command that rebuilds it."""

from __future__ import annotations

import errno
import logging
import os
import time
from pathlib import Path
from typing import Optional

import numpy as np

from ..core import atomic
from ..core.errors import CacheMismatchError, ClipDistillError, MissingResourceError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
ARRAY = "embeddings.npy"
VALID = "valid.npy"
FORMAT_VERSION = 2  # 2: checked on open (sizes, shapes, finiteness)


class CacheDamagedError(ClipDistillError):
    """The cache's files disagree with its manifest or hold non-finite rows."""


def cache_path(cache_dir: str | Path, teacher_slug: str, dataset_slug: str, split: str) -> Path:
    return Path(cache_dir) / "embeddings" / teacher_slug / dataset_slug / split


def _diff(old: dict, new: dict) -> str:
    keys = sorted(set(old) | set(new))
    return "; ".join(f"{k}: cached {old.get(k)!r} vs now {new.get(k)!r}" for k in keys if old.get(k) != new.get(k))


def _open_array(path: Path, dtype, shape: tuple, mode: str) -> np.ndarray:
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


def _first_non_finite(emb: np.ndarray, done: int, chunk: int = 65536) -> Optional[int]:
    for i in range(0, done, chunk):
        bad = ~np.isfinite(np.asarray(emb[i:min(done, i + chunk)])).all(axis=1)
        if bad.any():
            return i + int(np.flatnonzero(bad)[0])
    return None


class EmbeddingCache:
    """Rows `[0, done)` of `embeddings.npy` are final; `valid.npy` marks rows whose image
    could not be read (0), which readers skip."""

    def __init__(self, path: Path, manifest: dict, mode: str):
        self.path = Path(path)
        self.manifest = manifest
        shape = (int(manifest["count"]), int(manifest["dim"]))
        self.embeddings = _open_array(self.path / ARRAY, np.float16, shape, mode)
        self.valid = _open_array(self.path / VALID, np.uint8, shape[:1], mode)
        done = self.done
        if not 0 <= done <= self.count:
            raise CacheDamagedError(f"the manifest says {done} rows are done of {self.count}")
        if self.complete != (done == self.count):
            raise CacheDamagedError(f"the manifest says complete={self.complete} with {done} of {self.count} rows done")
        bad = _first_non_finite(self.embeddings, done)
        if bad is not None:
            raise CacheDamagedError(f"row {bad} holds a non-finite embedding (NaN or inf)")

    # ------------------------------------------------------------------ opening
    @staticmethod
    def _read_manifest(path: Path) -> dict:
        try:
            manifest = atomic.read_json(path / MANIFEST)
        except ClipDistillError as e:
            raise CacheDamagedError(str(e)) from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
            raise CacheDamagedError(f"{MANIFEST} is of format {manifest.get('format') if isinstance(manifest, dict) else '?'}"
                                    f", not {FORMAT_VERSION} (made by another version of clipdistill)")
        return manifest

    @staticmethod
    def _check_owner(path: Path, manifest: dict, teacher: dict, dataset: Optional[dict], count: Optional[int],
                     dim: Optional[int]) -> None:
        problems = []
        if manifest.get("teacher") != teacher:
            problems.append("teacher differs (" + _diff(manifest.get("teacher", {}), teacher) + ")")
        if dataset is not None and manifest.get("dataset") != dataset:
            problems.append("dataset differs (" + _diff(manifest.get("dataset", {}), dataset) + ")")
        if count is not None and (manifest.get("count"), manifest.get("dim")) != (count, dim):
            problems.append(f"shape differs: cached {manifest.get('count')}x{manifest.get('dim')}, now {count}x{dim}")
        if problems:
            raise CacheMismatchError(
                f"the embedding cache {path} was made by another teacher or dataset: {'; '.join(problems)}. "
                f"Refusing to mix them. Rebuild it with --overwrite, or use another --cache-dir.")

    @classmethod
    def open(cls, path: str | Path, teacher: dict, dataset: dict, count: int, dim: int,
             overwrite: bool = False) -> "EmbeddingCache":
        """Open for writing: continue a cache made by the same teacher and data, or create
        one. A damaged cache is rebuilt (with a warning naming what was wrong)."""
        path = Path(path)
        if (path / MANIFEST).exists() and not overwrite:
            try:
                manifest = cls._read_manifest(path)
                cls._check_owner(path, manifest, teacher, dataset, count, dim)
                return cls(path, manifest, "r+")
            except CacheDamagedError as e:
                log.warning("the embedding cache %s is damaged (%s); rebuilding it", path, e)
        return cls._create(path, teacher, dataset, count, dim)

    @classmethod
    def _create(cls, path: Path, teacher: dict, dataset: dict, count: int, dim: int) -> "EmbeddingCache":
        path.mkdir(parents=True, exist_ok=True)
        for name in (MANIFEST, ARRAY, VALID):
            (path / name).unlink(missing_ok=True)
        for name, dtype, shape in ((ARRAY, np.float16, (count, dim)), (VALID, np.uint8, (count,))):
            try:
                arr = np.lib.format.open_memmap(path / name, mode="w+", dtype=dtype, shape=shape)
                arr.flush()
                del arr
                # Reserve the blocks now: a memmap written past a full disk dies of SIGBUS, with no message.
                with open(path / name, "r+b") as f:
                    os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    (path / name).unlink(missing_ok=True)
                    raise atomic.disk_full(path / name, e) from None
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)):
                    raise
        manifest = {"format": FORMAT_VERSION, "teacher": teacher, "dataset": dataset, "count": count, "dim": dim,
                    "dtype": "float16", "done": 0, "complete": count == 0, "skipped": 0, "skipped_items": [],
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "array": ARRAY, "valid": VALID}
        atomic.write_json(path / MANIFEST, manifest)
        return cls(path, manifest, "r+")

    @classmethod
    def load(cls, path: str | Path, teacher: Optional[dict] = None, dataset: Optional[dict] = None,
             count: Optional[int] = None, dim: Optional[int] = None) -> "EmbeddingCache":
        """Open a complete cache read-only (what training uses); needs no write access.
        Incomplete: MissingResourceError; damaged: CacheDamagedError; foreign: CacheMismatchError."""
        path = Path(path)
        if not (path / MANIFEST).exists():
            raise MissingResourceError(f"no embedding cache at {path}; run `clipdistill embed` for that split first")
        try:
            manifest = cls._read_manifest(path)
            if teacher is not None:
                cls._check_owner(path, manifest, teacher, dataset, count, dim)
            if not manifest.get("complete"):
                raise MissingResourceError(f"the embedding cache {path} is incomplete ({manifest.get('done')}/"
                                           f"{manifest.get('count')}); run `clipdistill embed` again to finish it")
            return cls(path, manifest, "r")
        except CacheDamagedError as e:
            raise CacheDamagedError(f"the embedding cache {path} is damaged: {e}. Run the same command with write "
                                    f"access to it (it is rebuilt), or `clipdistill embed --overwrite`") from None

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

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    def valid_indices(self) -> np.ndarray:
        return np.flatnonzero(np.asarray(self.valid[: self.done]) == 1)

    # ------------------------------------------------------------------ writing
    def write(self, start: int, rows: np.ndarray, valid: np.ndarray) -> None:
        end = start + len(rows)
        self.embeddings[start:end] = rows.astype(np.float16)
        self.valid[start:end] = valid.astype(np.uint8)

    def commit(self, done: int, skipped_items: list[str] = ()) -> None:
        """Make rows [0, done) durable, then say so: data first, manifest second."""
        self.embeddings.flush()
        self.valid.flush()
        self.manifest["skipped_items"] = (self.manifest.get("skipped_items", []) + list(skipped_items))
        self.manifest["skipped"] = len(self.manifest["skipped_items"])
        self.manifest["done"] = int(done)
        self.manifest["complete"] = done >= self.count
        self.manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        atomic.write_json(self.path / MANIFEST, self.manifest)

    def __repr__(self) -> str:
        return f"EmbeddingCache({self.path}, {self.done}/{self.count}x{self.dim}, complete={self.complete})"


class EmbeddedDataset:
    """`(image, label, teacher_embedding)` by index: a dataset joined with its cache.

    Only readable rows are exposed; embeddings are read through the memmap, so opening
    100,000 of them costs nothing until they are used."""

    def __init__(self, dataset, cache: "EmbeddingCache"):
        if len(dataset) != cache.count:
            raise CacheMismatchError(f"{cache.path} holds {cache.count} rows but the dataset has {len(dataset)}; "
                                     f"rebuild it with --overwrite")
        self.dataset, self.cache = dataset, cache
        self.index = cache.valid_indices()

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        row = int(self.index[i])
        image, label = self.dataset[row]
        return image, label, np.asarray(self.cache.embeddings[row], dtype=np.float32)
