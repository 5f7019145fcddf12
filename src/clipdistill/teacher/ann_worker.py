"""The half of approximate search (ann.py) that touches usearch, run as a process of its own:
`python -m clipdistill.teacher.ann_worker open|search --cache DIR --result DIR ...`.

Why a process of its own: usearch and torch must never share one. With `usearch.index` imported,
`torch.jit.script` and torch's ONNX export spin (a three-line script: 2 s alone, still running
after 120 s with usearch imported first; under gdb the ONNX tracer threw std::bad_cast in a loop),
and a pytest process that had imported it hung collecting tests/test_compress.py (nvidia-modelopt
scripts at import). A search's process holds the teacher, so it never imports usearch: ann.py
writes the prompts' vectors to a file, runs this module with the same Python, and reads the rows
back. This module imports numpy, usearch (inside the functions that use it) and torch-free parts
of clipdistill only (tests/test_ann.py checks that no torch is loaded).

The graph (one per cache as it is now):
- cosine, float16 vectors (the cache's own precision: nothing is lost, and the file weighs what
  the cache weighs plus the links), the cache's row numbers as keys, KEPT rows only (a row that
  failed to decode or read is never a candidate).
- `ann-KEY.usearch` in the cache's folder, KEY a digest of all the graph depends on (the cache's
  owner, shape, creation time and `valid` array; the graph's settings): a changed pool, a
  re-embedded cache or a row read on a retry gets another key, so a stale graph is never read, and
  it is deleted once the new one is written. Written atomically (saved in a locked temporary
  folder beside it, then `os.replace`); a lock keeps two searches from building it twice. Opened
  memory-mapped (usearch's `view`): a search makes resident only the pages it visits.
- Asking: per prompt, the graph's candidates, their cosine computed again from the cache in
  float32 (the numbers exact search gives; usearch's own float16 cosine differs by up to about
  1e-3), then the same rule as exact search (knn.widen: each image to the prompt it matches best;
  a prompt left short asks again for twice as many). `expansion_search` is 8 x the count asked: a
  prompt near no cluster of images, whose best matches are near-ties, needs a wide walk (measured
  once on bench_search.py's synthetic 50k rows: 2x found 69% of such prompts' exact top 100, 8x
  94%, for about 40 ms more per 10). A prompt that asks for more than a quarter of the kept rows is
  answered by the exact scan instead: a walk that visits most of the nodes is no faster, and it can
  still miss some.

What comes back, in the --result folder: `result.json` (written last, atomically, so that its
presence means the rest is whole) and, for `search`, `rows.npy` and `similarity.npy` (every
prompt's rows and cosines, best first, one after the other; `counts` in result.json says how many
each). A failure is `{"error": "...", "module": ...}` in result.json (`module`: the one that could
not be imported) and exit code 1; the traceback goes to the log at debug level (`-v`). Logs and
progress go to stderr, which the search's process shares."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..data.store import KEPT, release_pages
from .cache import EmbeddingCache
from .knn import CHUNK_ROWS, Found, _sorted, normalise, top_per_prompt, widen

log = logging.getLogger(__name__)

DTYPE = "f16"          # the cache's precision
CONNECTIVITY = 16      # HNSW's M: links per node (usearch's default)
EXPANSION_ADD = 128    # HNSW's efConstruction (usearch's default)
EXPANSION_SEARCH = 8   # HNSW's ef: this many times the count asked (module docstring)
BUILD_ROWS = 65536     # rows read from the cache and added at a time
EXACT_SHARE = 0.25     # a prompt asking for more than this share of the kept rows is scanned exactly
PREFIX, SUFFIX = "ann-", ".usearch"
RESULT = "result.json"


def _index_class():
    """usearch's Index; ModuleNotFoundError without it (ann.py names the `ann` extra)."""
    from usearch.index import Index

    return Index


class _Cache(EmbeddingCache):
    """The cache read-only without the per-row finite check (a pass over the whole array): the
    search's process opened it with that check an instant before."""

    def check_rows(self, done: int) -> None:
        pass


def index_key(cache) -> str:
    """What the graph depends on, as a short digest (module docstring)."""
    m = cache.manifest
    h = hashlib.sha256(json.dumps({**{k: m.get(k) for k in ("teacher", "dataset", "count", "dim", "done", "created")},
                                   "dtype": DTYPE, "connectivity": CONNECTIVITY, "expansion_add": EXPANSION_ADD},
                                  sort_keys=True, default=str).encode())
    h.update(np.ascontiguousarray(cache.valid).tobytes())
    return h.hexdigest()[:16]


def index_path(cache) -> Path:
    return Path(cache.path) / f"{PREFIX}{index_key(cache)}{SUFFIX}"


@dataclass
class Graph:
    index: object            # usearch.index.Index, memory-mapped
    path: Path
    rows: int                # kept rows in it
    build_seconds: Optional[float]  # None: an earlier search built it


def open_index(cache, progress: bool = False) -> Graph:
    """The cache's graph, memory-mapped; built first when there is none for the cache as it is now."""
    from ..core.locks import exclusive

    path = index_path(cache)
    kept = int((np.asarray(cache.valid) == KEPT).sum())
    with exclusive(Path(cache.path) / ".ann.lock"):
        index = _view(path, kept)
        seconds = None
        if index is None:
            t0 = time.perf_counter()
            build(cache, path, progress)
            seconds = time.perf_counter() - t0
            index = _view(path, kept)
            if index is None:
                raise RuntimeError(f"the index {path} just written cannot be read back")
    return Graph(index, path, kept, seconds)


def _view(path: Path, kept: int):
    """The saved graph memory-mapped, or None when there is none or it is damaged (rebuilt)."""
    if not path.exists():
        return None
    try:
        index = _index_class().restore(path, view=True)
    except (RuntimeError, ValueError, OSError) as e:
        log.warning("the approximate index %s cannot be read (%s); building it again", path, e)
        return None
    if index is None or len(index) != kept:
        log.warning("the approximate index %s holds %s rows, not the %d kept; building it again", path,
                    None if index is None else len(index), kept)
        return None
    return index


def build(cache, path: Path, progress: bool = False) -> None:
    """The graph of the cache's KEPT rows, saved atomically at `path`; other graphs of the cache
    (stale: another key) are deleted."""
    from ..core import atomic
    from ..core.progress import bar as progress_bar

    emb = cache.embeddings
    rows = np.flatnonzero(np.asarray(cache.valid) == KEPT)
    index = _index_class()(ndim=int(emb.shape[1]), metric="cos", dtype=DTYPE, connectivity=CONNECTIVITY,
                           expansion_add=EXPANSION_ADD)
    log.info("building the approximate index of %d rows (once: kept as %s)", len(rows), path)
    bar = progress_bar(total=len(rows), unit="row", desc="build the index", enabled=progress)
    for a in range(0, len(rows), BUILD_ROWS):
        part = rows[a:a + BUILD_ROWS]
        index.add(part.astype(np.uint64), np.ascontiguousarray(emb[part]))  # all cores; usearch normalises
        release_pages(emb)
        bar.update(len(part))
    bar.close()
    with atomic.temporary_folder(path.parent, path.name) as tmp:
        index.save(str(tmp / path.name))
        with open(tmp / path.name, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp / path.name, path)
    for old in Path(cache.path).glob(f"{PREFIX}*{SUFFIX}"):
        if old != path:
            old.unlink(missing_ok=True)


def candidates(graph: Graph, cache, text: np.ndarray, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per prompt (row of `text`), up to k rows the graph finds nearest, as (cosine, rows) best
    first, the cosine computed from the cache as exact search computes it."""
    t = normalise(text)
    index = graph.index
    index.expansion_search = max(64, EXPANSION_SEARCH * k)
    matches = index.search(t, count=k)
    keys = [matches.keys] if len(t) == 1 else [matches[p].keys for p in range(len(t))]
    keys = [np.asarray(r, np.int64) for r in keys]
    union = np.unique(np.concatenate(keys)) if keys else np.empty(0, np.int64)
    sims = normalise(cache.embeddings[union]) @ t.T  # (rows, prompts)
    out = []
    for p, r in enumerate(keys):
        out.append(_sorted(sims[np.searchsorted(union, r), p], r))
    return out


def search(graph: Graph, cache, text: np.ndarray, n: int, chunk_rows: int = CHUNK_ROWS, progress: bool = False
           ) -> Found:
    """Top-`n` rows per prompt from the graph, each row given to one prompt (knn.widen)."""
    total = graph.rows

    def ask(prompts: list[int], k: int) -> list[tuple[np.ndarray, np.ndarray]]:
        if k == 0 or k > EXACT_SHARE * total:
            return top_per_prompt(cache.embeddings, text[prompts], k, cache.valid, chunk_rows, progress)
        return candidates(graph, cache, text[prompts], k)

    return widen(ask, len(text), n, total)


# ------------------------------------------------------------------------------ the process

def _save(path: Path, arr: np.ndarray) -> None:
    from ..core import atomic

    with atomic.replacing(path) as f:
        np.save(f, arr, allow_pickle=False)


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(args: argparse.Namespace) -> dict:
    """One command: open (building if needed) the cache's graph, and for `search` ask it; the
    result's arrays are written into args.result, its counts returned."""
    t0 = time.perf_counter()
    cache = _Cache.load(args.cache)
    graph = open_index(cache, args.progress)
    out = {"index": str(graph.path), "rows": graph.rows, "built_seconds": graph.build_seconds}
    if args.command == "search":
        text = np.load(args.queries, allow_pickle=False)
        if text.ndim != 2 or text.shape[1] != cache.dim:
            raise ValueError(f"{args.queries} holds a {text.shape} array; the cache's rows have {cache.dim} values")
        found = search(graph, cache, text.astype(np.float32), args.n, args.chunk_rows, args.progress)
        empty = np.empty(0, np.int64)
        _save(args.result / "rows.npy", np.concatenate([empty, *[np.asarray(r, np.int64) for r in found.rows]]))
        _save(args.result / "similarity.npy",
              np.concatenate([empty.astype(np.float32), *[np.asarray(s, np.float32) for s in found.similarity]]))
        out.update(counts=[len(r) for r in found.rows], passes=found.passes)
    out.update(seconds=time.perf_counter() - t0, peak_mib=_peak_mib())
    return out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m clipdistill.teacher.ann_worker", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["open", "search"])
    ap.add_argument("--cache", type=Path, required=True, help="the embedding cache's folder")
    ap.add_argument("--result", type=Path, required=True, help="an existing folder for result.json and the arrays")
    ap.add_argument("--queries", type=Path, help="search: a float32 .npy of the prompts' vectors (prompts x dim)")
    ap.add_argument("--n", type=int, default=0, help="search: results per prompt")
    ap.add_argument("--chunk-rows", type=int, default=CHUNK_ROWS)
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--verbosity", type=int, default=0, help="-1 warnings, 0 info, 1 debug (core/logs.py)")
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    from ..core import atomic
    from ..core.logs import setup

    args = parser().parse_args(argv)
    setup(args.verbosity)
    try:
        res = run(args)
        code = 0
    except Exception as e:  # one line for the search's process to say; the traceback at debug level
        log.debug("the approximate index's worker failed", exc_info=True)
        what = "building or opening" if args.command == "open" else "building, opening or asking"
        res = {"error": f"{what} the approximate index of the embedding cache {args.cache} failed: "
                        f"{type(e).__name__}: {e}"}
        if isinstance(e, ModuleNotFoundError):
            res["module"] = e.name
        code = 1
    atomic.write_json(args.result / RESULT, res)
    return code


if __name__ == "__main__":
    sys.exit(main())
