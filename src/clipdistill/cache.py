"""The embedding cache: one float16 array per (teacher, dataset, split) plus a manifest.

Teacher outputs are computed once into one contiguous `.npy` that training reads with a
memmap (nanoGPT's `prepare.py` idea), instead of the study's one `.pt` file per image.
The manifest records who made the array (teacher and dataset fingerprints) and how far
it got (`done`), so a killed run resumes where it stopped and a cache made by another
teacher or preprocess is refused instead of silently mixed in."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import numpy as np

from . import atomic
from .errors import CacheMismatchError, MissingResourceError

MANIFEST = "manifest.json"
ARRAY = "embeddings.npy"
VALID = "valid.npy"
FORMAT_VERSION = 1


def cache_path(cache_dir: str | Path, teacher_slug: str, dataset_slug: str, split: str) -> Path:
    return Path(cache_dir) / "embeddings" / teacher_slug / dataset_slug / split


def _diff(old: dict, new: dict) -> str:
    keys = sorted(set(old) | set(new))
    return "; ".join(f"{k}: cached {old.get(k)!r} vs now {new.get(k)!r}" for k in keys if old.get(k) != new.get(k))


class EmbeddingCache:
    """Rows `[0, done)` of `embeddings.npy` are final; `valid.npy` marks rows whose image
    could not be read (0), which readers skip."""

    def __init__(self, path: Path, manifest: dict, mode: str):
        self.path = Path(path)
        self.manifest = manifest
        self.embeddings = np.load(self.path / ARRAY, mmap_mode=mode)
        self.valid = np.load(self.path / VALID, mmap_mode=mode)

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str | Path, teacher: dict, dataset: dict, count: int, dim: int,
             overwrite: bool = False) -> "EmbeddingCache":
        """Open for writing: create, or continue a cache made by the same teacher and data."""
        path = Path(path)
        mf = path / MANIFEST
        if mf.exists() and not overwrite:
            manifest = atomic.read_json(mf)
            problems = []
            if manifest.get("teacher") != teacher:
                problems.append("teacher differs (" + _diff(manifest.get("teacher", {}), teacher) + ")")
            if manifest.get("dataset") != dataset:
                problems.append("dataset differs (" + _diff(manifest.get("dataset", {}), dataset) + ")")
            if (manifest.get("count"), manifest.get("dim")) != (count, dim):
                problems.append(f"shape differs: cached {manifest.get('count')}x{manifest.get('dim')}, now {count}x{dim}")
            if problems:
                raise CacheMismatchError(
                    f"the embedding cache {path} was made by another teacher or dataset: {'; '.join(problems)}. "
                    f"Refusing to mix them. Rebuild it with --overwrite, or use another --cache-dir.")
            if (path / ARRAY).exists() and (path / VALID).exists():
                return cls(path, manifest, "r+")
        path.mkdir(parents=True, exist_ok=True)
        for name in (MANIFEST, ARRAY, VALID):
            (path / name).unlink(missing_ok=True)
        np.lib.format.open_memmap(path / ARRAY, mode="w+", dtype=np.float16, shape=(count, dim)).flush()
        np.lib.format.open_memmap(path / VALID, mode="w+", dtype=np.uint8, shape=(count,)).flush()
        manifest = {"format": FORMAT_VERSION, "teacher": teacher, "dataset": dataset, "count": count, "dim": dim,
                    "dtype": "float16", "done": 0, "complete": count == 0, "skipped": 0, "skipped_items": [],
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "array": ARRAY, "valid": VALID}
        atomic.write_json(mf, manifest)
        return cls(path, manifest, "r+")

    @classmethod
    def load(cls, path: str | Path, teacher: Optional[dict] = None) -> "EmbeddingCache":
        """Open a complete cache read-only (what training uses)."""
        path = Path(path)
        mf = path / MANIFEST
        if not mf.exists():
            raise MissingResourceError(f"no embedding cache at {path}; run `clipdistill embed` for that split first")
        manifest = atomic.read_json(mf)
        if not manifest.get("complete"):
            raise MissingResourceError(f"the embedding cache {path} is incomplete ({manifest.get('done')}/"
                                       f"{manifest.get('count')}); run `clipdistill embed` again to finish it")
        if teacher is not None and manifest.get("teacher") != teacher:
            raise CacheMismatchError(f"the embedding cache {path} was made by another teacher "
                                     f"({_diff(manifest['teacher'], teacher)}); rebuild it with --overwrite")
        return cls(path, manifest, "r")

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

    def summary(self) -> str:
        return json.dumps({k: self.manifest[k] for k in ("count", "dim", "done", "complete", "skipped")})


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
