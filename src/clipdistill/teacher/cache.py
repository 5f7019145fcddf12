"""The embedding cache: one float16 array per (teacher, dataset, split) plus a manifest, an
`ArrayStore` (data/store.py: manifest, resume, checks on open, shared with the pixel store).

Teacher outputs are computed once into one contiguous `.npy` that training reads with a
memmap (nanoGPT's `prepare.py` idea), instead of the study's one `.pt` file per image.
The manifest records who made the array (teacher and dataset fingerprints) and how far
it got (`done`), so a killed run resumes where it stopped and a cache made by another
teacher or preprocess is refused instead of silently mixed in.

Nothing on disk is trusted blindly: opening checks the manifest against the arrays (file
sizes, shapes, dtypes, `done <= count`, `complete` only when every row is done) and that the
finished rows are finite. A writer rebuilds a damaged cache (it is only a cache) and says
so; a reader refuses it with the command that rebuilds it.

A row whose image could not be *read* (not decoded: data/store.py's RETRY) does not make the
cache less complete for training, which uses kept rows only; the next `embed` tries it again."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np

from ..data.store import VALID, ArrayStore, CacheDamagedError, open_array  # noqa: F401 - CacheDamagedError re-exported

log = logging.getLogger(__name__)

ARRAY = "embeddings.npy"


def cache_path(cache_dir: str | Path, teacher_slug: str, dataset_slug: str, split: str) -> Path:
    return Path(cache_dir) / "embeddings" / teacher_slug / dataset_slug / split


def _first_non_finite(emb: np.ndarray, done: int, chunk: int = 65536) -> Optional[int]:
    for i in range(0, done, chunk):
        bad = ~np.isfinite(np.asarray(emb[i:min(done, i + chunk)])).all(axis=1)
        if bad.any():
            return i + int(np.flatnonzero(bad)[0])
    return None


class EmbeddingCache(ArrayStore):
    """`embeddings.npy` (count x dim, float16), owned by a (teacher, dataset) pair."""

    kind = "embedding cache"
    owner_words = "another teacher or dataset"
    fill_command = "`clipdistill embed` for that split"
    rebuild_command = ("delete that folder (it is only a cache: the next command that needs it embeds the split "
                       "again; `clipdistill embed --overwrite` with the same teacher and data does it at once)")

    @classmethod
    def layout(cls, manifest: dict) -> dict:
        return {"embeddings": (ARRAY, "float16", (int(manifest["count"]), int(manifest["dim"]))),
                **super().layout(manifest)}

    def check_rows(self, done: int) -> None:
        bad = _first_non_finite(self.embeddings, done)
        if bad is not None:
            raise CacheDamagedError(f"row {bad} holds a non-finite embedding (NaN or inf)")

    @property
    def embeddings(self) -> np.ndarray:
        return self.arrays["embeddings"]

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @classmethod
    def open(cls, path: str | Path, teacher: dict, dataset: dict, count: int, dim: int,
             overwrite: bool = False) -> "EmbeddingCache":
        """Open for writing: continue a cache made by the same teacher and data, or create
        one. A damaged cache is rebuilt (with a warning naming what was wrong)."""
        return cls.open_for_writing(path, {"teacher": teacher, "dataset": dataset}, {"count": count, "dim": dim},
                                    {"dtype": "float16", "array": ARRAY, "valid": VALID}, overwrite)

    @classmethod
    def load(cls, path: str | Path, teacher: Optional[dict] = None, dataset: Optional[dict] = None,
             count: Optional[int] = None, dim: Optional[int] = None) -> "EmbeddingCache":
        """Open a complete cache read-only (what training uses); needs no write access.
        Incomplete: MissingResourceError; damaged: CacheDamagedError; foreign: CacheMismatchError."""
        owner = {"teacher": teacher, "dataset": dataset} if teacher is not None else None
        shape = {"count": count, "dim": dim} if count is not None else None
        return cls.load_complete(path, owner, shape)

    def write(self, start: int, rows: np.ndarray, valid: np.ndarray) -> None:
        self.write_rows(start, valid, embeddings=rows)

    def __repr__(self) -> str:
        return f"EmbeddingCache({self.path}, {self.done}/{self.count}x{self.dim}, complete={self.complete})"

