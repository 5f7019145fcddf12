"""`torchrun --nproc_per_node N -m clipdistill embed`: every rank embeds its own slice of the
split into the one shared array, so N GPUs embed a large pool N times faster.

Ranks coordinate through the process group's key-value store (torchrun's rendezvous), never
in a collective that could wait for hours: rank 0 opens (or creates, or continues) the cache
under its folder lock and says so; each rank embeds its contiguous block of the rows left,
flushing after every batch and recording its progress in CACHE/slices/RANK-of-N.json (a
killed job resumes each slice where it stopped); rank 0 waits for every slice, merges what
each skipped, and commits the manifest (the cache is complete only then). A rank that fails
posts its message in the store and every other rank stops with it within a second or two; a
rank killed outright has no message to post, and torchrun stops the others at once. The
cache folder must be on a filesystem every rank sees (one machine: any; several: a shared one).

Rows equal a one-process run's up to the rounding another batch composition gives."""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from pathlib import Path

import numpy as np

from ..core import atomic
from ..core.device import resolve_device
from ..core.distributed import RankFailed, _store, cleanup, failure_text, init_distributed, local_device, wait_for
from ..core.errors import ClipDistillError, MissingResourceError
from ..core.locks import exclusive
from .cache import CacheDamagedError, EmbeddingCache, cache_path

log = logging.getLogger(__name__)

FAILED = "clipdistill/embed/failed"


def blocks(start: int, end: int, world: int) -> list[tuple[int, int]]:
    """[start, end) cut into `world` contiguous blocks of (nearly) equal size."""
    cuts = np.linspace(start, end, world + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:])]


def _slice_file(path: Path, rank: int, world: int) -> Path:
    return path / "slices" / f"{rank}-of-{world}.json"


def embed_sharded(cfg, ds, embed_rows, teacher=None) -> EmbeddingCache:
    """`embed_rows(teacher, ds, cache, start, end, batch, workers, progress, commit)` embeds a
    block of rows (embed.py's, handed over so that the two modules do not import each other)."""
    from .openclip_teacher import create_teacher

    info = init_distributed(resolve_device(cfg.device))
    store = _store()
    try:
        try:
            device = local_device(resolve_device(cfg.device), info)
            teacher = teacher or create_teacher(cfg.teacher, cfg.pretrained, str(device), cfg.precision,
                                                cfg.cache_dir)
            path = cache_path(cfg.cache_dir, teacher.slug, ds.slug(), cfg.split)
            owner = (teacher.fingerprint(), ds.fingerprint(), len(ds), teacher.embed_dim)
            with contextlib.ExitStack() as stack:
                if info.is_main:
                    path.mkdir(parents=True, exist_ok=True)
                    stack.enter_context(exclusive(path / ".lock"))  # no other job fills it meanwhile
                    cache = EmbeddingCache.open(path, *owner, overwrite=cfg.overwrite)
                    store.set("clipdistill/embed/ready", str(cache.done))
                else:
                    wait_for(["clipdistill/embed/ready"], FAILED, store=store)
                    cache = EmbeddingCache(path, EmbeddingCache._read_manifest(path), "r+")
                if not cache.complete:
                    _my_slice(teacher, ds, cache, info, cfg, embed_rows)
                store.set(f"clipdistill/embed/done/{info.rank}", "1")
                if info.is_main:
                    wait_for([f"clipdistill/embed/done/{r}" for r in range(info.world_size)], FAILED, store=store)
                    if not cache.complete:
                        _merge(cache, info.world_size)
                    store.set("clipdistill/embed/complete", "1")
                else:
                    wait_for(["clipdistill/embed/complete"], FAILED, store=store)
            return EmbeddingCache.load(path, *owner)
        except RankFailed as e:
            raise ClipDistillError(f"stopped: {e}") from None
        except BaseException as e:
            with contextlib.suppress(Exception):
                if not store.check([FAILED]):
                    store.set(FAILED, f"rank {info.rank} failed: {failure_text(e)}")
            raise
    finally:
        cleanup(info)


def _my_slice(teacher, ds, cache: EmbeddingCache, info, cfg, embed_rows) -> None:
    """Embed this rank's block of the rows not yet done, resuming from its slice record."""
    start, end = blocks(cache.done, cache.count, info.world_size)[info.rank]
    record_path = _slice_file(cache.path, info.rank, info.world_size)
    record = {"start": start, "end": end, "done": start, "skipped_items": [], "created": cache.manifest["created"]}
    if record_path.is_file():
        with contextlib.suppress(ClipDistillError, TypeError, KeyError):
            old = atomic.read_json(record_path)
            if all(old.get(k) == record[k] for k in ("start", "end", "created")) and start <= old["done"] <= end:
                record = old
                log.info("rank %d resumes its slice at %d (rows %d-%d)", info.rank, old["done"], start, end)
    store = _store()

    def commit(pos: int, errors: list[str]) -> None:
        for arr in cache.arrays.values():
            arr.flush()
        record["done"] = int(pos)
        record["skipped_items"] = record["skipped_items"] + list(errors)
        atomic.write_json(record_path, record)
        if store.check([FAILED]):  # another rank failed: stop at this batch, the rows so far are kept
            raise RankFailed(store.get(FAILED).decode("utf-8", "replace"))

    record_path.parent.mkdir(parents=True, exist_ok=True)
    t0, first = time.time(), record["done"]
    if first < end:
        embed_rows(teacher, ds, cache, first, end, cfg.embed_batch_size, cfg.workers,
                   cfg.progress and info.is_main, commit)
    atomic.write_json(record_path, {**record, "done": end})
    log.info("rank %d embedded rows %d-%d (%.0f img/s)", info.rank, start, end,
             (end - first) / max(time.time() - t0, 1e-9))


def _merge(cache: EmbeddingCache, world: int) -> None:
    """Every slice done: the manifest says so (the rows were flushed by their ranks)."""
    skipped: list[str] = []
    for r, (start, end) in enumerate(blocks(cache.done, cache.count, world)):
        record = atomic.read_json(_slice_file(cache.path, r, world))
        if record.get("done") != end or record.get("start") != start:
            raise MissingResourceError(f"{cache.path}: rank {r}'s slice {start}-{end} is not done "
                                       f"({record.get('done')}); run the same command again to finish it")
        skipped += record.get("skipped_items", [])
    fresh = EmbeddingCache(cache.path, cache.manifest, "r+")  # re-read what the other ranks wrote
    try:
        fresh.check_rows(fresh.count)
    except CacheDamagedError as e:
        raise ClipDistillError(f"{cache.path}: {e}") from None
    cache.commit(cache.count, skipped)
    shutil.rmtree(cache.path / "slices", ignore_errors=True)
    log.info("wrote %s (%d x %d float16 from %d ranks, skipped %d)", cache.path / "embeddings.npy", cache.count,
             cache.dim, world, cache.manifest["skipped"])

