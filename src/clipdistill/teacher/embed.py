"""`clipdistill embed`: fill the embedding cache of one (teacher, dataset, split).

An image that cannot be embedded is a hole in the cache, not a crash. Why it failed decides
what becomes of the hole (data/store.py): bytes that do not decode are skipped for good; a
failed *read* (a vanished file, no permission, an I/O error) is a RETRY row, embedded again by
the next filler, since the cache is keyed by content and would otherwise say "complete" for
ever after the file is back."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..core.config import check, option
from ..core.errors import ClipDistillError, MissingResourceError
from ..core.locks import exclusive
from ..core.workers import WorkerInit, auto_workers
from ..data.images import LoadedRows
from ..data.options import DataOptions
from ..data.store import KEPT, RETRY, SKIPPED, unwritable, warn_skipped
from .cache import CacheDamagedError, EmbeddingCache, cache_path
from .openclip_teacher import Teacher, create_teacher
from .options import TeacherOptions

log = logging.getLogger(__name__)


@dataclasses.dataclass
class EmbedConfig(TeacherOptions, DataOptions):
    split: str = option("train", "which split to embed (stl10/shapes10: train, test, unlabeled)")
    overwrite: bool = option(False, "rebuild the cache even if one exists (also one made by another teacher)")
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self) -> None:
        self._check_teacher()
        self._check_data()
        check(bool(self.split), "split", "give a split name")


def _collate(items):
    ok = [x for x in items if x[0] is not None]
    x = torch.stack([t for t, _, _ in ok]) if ok else None
    return x, [i for _, i, _ in ok], [(i, *err) for _, i, err in items if err is not None]


def _encode(teacher: Teacher, ds, x, ok_idx: list, where: str) -> np.ndarray:
    """The batch's embeddings, refused whole when any is not finite."""
    emb = teacher.encode_images(x).cpu().numpy()
    bad = ~np.isfinite(emb.astype(np.float16)).all(axis=1)
    if bad.any():
        raise ClipDistillError(
            f"the teacher gave non-finite embeddings (NaN/inf) for {int(bad.sum())} of the images at {where} "
            f"(first: {ds.describe(ok_idx[int(np.flatnonzero(bad)[0])])}) in {teacher.precision}; nothing of that "
            f"batch was kept. Try --precision fp32.")
    return emb


def _loader(teacher: Teacher, ds, rows, batch_size: int, workers: int) -> DataLoader:
    return DataLoader(LoadedRows(ds, teacher.preprocess, rows), batch_size=batch_size, shuffle=False,
                      num_workers=auto_workers(workers), collate_fn=_collate, worker_init_fn=WorkerInit(),
                      pin_memory=teacher.device.type == "cuda")


def fill_cache(teacher: Teacher, ds, path, batch_size: int = 256, workers: int = -1, overwrite: bool = False,
               progress: bool = True) -> EmbeddingCache:
    """Embed every image of `ds` into the cache at `path`, resuming from what is done.

    A complete, intact cache is opened read-only without a lock (so one on a read-only disk
    serves). Otherwise one filler at a time per cache folder (an exclusive file lock): two
    jobs sharing a cache directory, or every rank of `torchrun ... embed`, take turns, and
    the later ones find the cache complete instead of re-creating the array under the first
    one's memmap."""
    import contextlib

    path = Path(path)
    ready = None
    if not overwrite:
        try:
            ready = EmbeddingCache.load(path, teacher.fingerprint(), ds.fingerprint(), len(ds), teacher.embed_dim)
            if not len(ready.retry_rows()):
                log.info("embeddings already complete: %s (%d x %d, skipped %d)", ready.path, ready.count, ready.dim,
                         ready.manifest["skipped"])
                return ready
        except (MissingResourceError, CacheDamagedError):
            pass  # missing, unfinished or damaged: (re)filled below, under the lock
    with contextlib.ExitStack() as stack:
        try:
            path.mkdir(parents=True, exist_ok=True)
            stack.enter_context(exclusive(path / ".lock"))
        except OSError as e:
            return unwritable(e, ready, "embedding cache", path)
        return _fill(teacher, ds, path, batch_size, workers, overwrite, progress)


def _fill(teacher: Teacher, ds, path, batch_size: int, workers: int, overwrite: bool, progress: bool
          ) -> EmbeddingCache:
    cache = EmbeddingCache.open(path, teacher.fingerprint(), ds.fingerprint(), len(ds), teacher.embed_dim,
                                overwrite=overwrite)
    again = cache.start_retry()  # rows an earlier filler could not read: tried after this one's own
    if cache.complete:
        if len(again):
            _retry(teacher, ds, cache, again, batch_size, workers)
        log.info("embeddings already complete: %s (%d x %d, skipped %d)", cache.path, cache.count, cache.dim,
                 cache.manifest["skipped"])
        return cache
    start = cache.done
    if start:
        log.info("resuming %s at %d/%d", cache.path, start, cache.count)
    t0 = time.time()
    _embed_rows(teacher, ds, cache, start, cache.count, batch_size, workers, progress,
                lambda pos, errors: cache.commit(pos, errors))
    if len(again):
        _retry(teacher, ds, cache, again, batch_size, workers)
    rate = (cache.count - start) / max(time.time() - t0, 1e-9)
    log.info("wrote %s (%d x %d float16, %.0f img/s, skipped %d)", cache.path / "embeddings.npy", cache.count,
             cache.dim, rate, cache.manifest["skipped"])
    return cache


def _embed_rows(teacher: Teacher, ds, cache: EmbeddingCache, start: int, end: int, batch_size: int, workers: int,
                progress: bool, commit) -> None:
    """Embed rows [start, end) of `ds` into `cache`, calling `commit(next_row, errors)` after
    each batch is written: the whole cache's manifest, or one rank's slice record. `errors` are
    (row, message, again) for the rows that could not be embedded."""
    from ..core.progress import bar as progress_bar

    # Batches start at multiples of batch_size from `start` (resume points are commit points),
    # so a resumed run computes exactly the batches an uninterrupted one would.
    loader = _loader(teacher, ds, range(start, end), batch_size, workers)
    bar = progress_bar(total=end, initial=start, unit="img", desc=f"embed {cache.path.parent.name}/{cache.path.name}",
                       enabled=progress, end_line=False)  # the callers log the rows embedded and the rate
    pos = start
    for x, ok_idx, errors in loader:
        n = len(ok_idx) + len(errors)
        rows = np.zeros((n, cache.dim), dtype=np.float16)
        valid = np.zeros(n, dtype=np.uint8)
        for i, _, again in errors:
            valid[i - pos] = RETRY if again else SKIPPED
        if x is not None:
            rel = np.asarray(ok_idx) - pos
            rows[rel] = _encode(teacher, ds, x, ok_idx, f"rows {pos}-{pos + n - 1} of {cache.path}")
            valid[rel] = KEPT
        cache.write(pos, rows, valid)
        pos += n
        commit(pos, errors)
        warn_skipped(log, errors)
        bar.update(n)
    bar.close()


def _retry(teacher: Teacher, ds, cache: EmbeddingCache, rows: np.ndarray, batch_size: int, workers: int) -> None:
    """Embed again the rows whose reading failed in an earlier fill."""
    for x, ok_idx, errors in _loader(teacher, ds, rows, batch_size, workers):
        if x is not None:
            cache.write_scattered(np.asarray(ok_idx), np.full(len(ok_idx), KEPT, np.uint8),
                                  embeddings=_encode(teacher, ds, x, ok_idx, f"rows tried again in {cache.path}"))
        if errors:
            cache.write_scattered(np.array([i for i, _, _ in errors]),
                                  np.array([RETRY if again else SKIPPED for _, _, again in errors], np.uint8))
        cache.commit(cache.done, errors, settled=list(ok_idx) + [i for i, _, _ in errors])
        warn_skipped(log, errors)
    log.info("tried %d images of %s again whose reading had failed: %d read now", len(rows), cache.path,
             len(rows) - len(cache.retry_rows()))


def embed(cfg: EmbedConfig, teacher: Optional[Teacher] = None) -> EmbeddingCache:
    """Fill one split's cache; under `torchrun` every rank embeds its own slice (sharded.py)."""
    ds = cfg.open_split(cfg.split, cfg.cache_dir)  # cheap errors first
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from .sharded import embed_sharded

        return embed_sharded(cfg, ds, _embed_rows, teacher)
    teacher = teacher or create_teacher(cfg.teacher, cfg.pretrained, cfg.device, cfg.precision, cfg.cache_dir)
    path = cache_path(cfg.cache_dir, teacher.slug, ds.slug(), cfg.split)
    return fill_cache(teacher, ds, path, cfg.embed_batch_size, cfg.workers, cfg.overwrite, cfg.progress)
