"""Approximate search over an embedding cache (`clipdistill search --pool ... --approximate`): a
usearch HNSW graph of the cache's kept rows, built once, kept beside the cache and asked per search.

Why: exact search (knn.py) reads the whole array for every search, about 6 s per million rows on
two cores; the graph answers ten prompts in about 0.2 s whatever the size, after a build that
costs hundreds of scans (benchmarks/bench_ann.md: where it pays off, its recall).

This module never imports usearch: usearch and torch must not share a process (with usearch
imported, torch.jit.script and torch's ONNX export spin), and the process that searches holds the
teacher. The graph is built and asked in a worker process (ann_worker.py, where the graph's
settings, its file and its rule for asking are described): `search` writes the prompts' vectors
to a .npy in a temporary folder, runs `python -m clipdistill.teacher.ann_worker search` with this
Python, and reads the rows and cosines back from .npy files and result.json (no pickle). Starting
the worker (Python, numpy, usearch, opening the cache and the graph) adds about 0.3 s to a search
(benchmarks/bench_ann.md). Its failure comes back as one message naming what failed; without
usearch, as ModuleNotFoundError, which the CLI turns into the `ann` extra's install command.

What it can miss: rows the walk does not reach, so a result may lack a few of the exact top
(recall below 1, measured in benchmarks/bench_ann.md and tests/test_ann.py)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..core.errors import ClipDistillError
from .knn import CHUNK_ROWS, Found

log = logging.getLogger(__name__)

WORKER = "clipdistill.teacher.ann_worker"
COMMAND = [sys.executable, "-m", WORKER]  # this Python (its venv); the arguments follow
MODULE = "usearch"  # the module the worker needs (core/extras.py: the `ann` extra)


class ApproximateSearchError(ClipDistillError):
    """The worker failed: its message names what (a damaged cache, no space, a crash)."""


def require() -> None:
    """Fail early (before embedding a pool) when usearch is not installed; found without importing
    it (core/extras.py), since this process must not."""
    from ..core import extras

    if extras.missing(["ann"]):
        raise ModuleNotFoundError(f"No module named {MODULE!r}", name=MODULE)


@dataclass
class Graph:
    path: Path                      # the index file, beside the cache
    rows: int                       # kept rows in it
    build_seconds: Optional[float]  # None: an earlier search built it
    worker_seconds: float = 0.0     # the worker's own time (open or build, then search)
    wall_seconds: float = 0.0       # the whole call, the worker's start and the files included


def open_index(cache, progress: bool = False) -> Graph:
    """The cache's graph as it is now, built first (in the worker) when there is none."""
    with tempfile.TemporaryDirectory(prefix="clipdistill-ann-") as tmp:
        t0 = time.perf_counter()
        res = _run("open", cache, Path(tmp), progress)
        return _graph(res, time.perf_counter() - t0)


def search(cache, text: np.ndarray, n: int, chunk_rows: int = CHUNK_ROWS, progress: bool = False
           ) -> tuple[Found, Graph]:
    """Top-`n` rows per prompt (rows of `text`) from the cache's graph, each row given to one
    prompt (knn.widen), the similarities exact cosines; the graph is built first when there is
    none. One worker process per call."""
    from ..core import atomic

    with tempfile.TemporaryDirectory(prefix="clipdistill-ann-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        with atomic.replacing(tmp / "queries.npy") as f:
            np.save(f, np.ascontiguousarray(text, np.float32), allow_pickle=False)
        res = _run("search", cache, tmp, progress, "--queries", str(tmp / "queries.npy"), "--n", str(n),
                   "--chunk-rows", str(chunk_rows))
        rows = np.load(tmp / "rows.npy", allow_pickle=False)
        sims = np.load(tmp / "similarity.npy", allow_pickle=False)
        graph = _graph(res, time.perf_counter() - t0)
    cuts = np.cumsum(res["counts"])[:-1]
    found = Found(list(np.split(rows, cuts)), list(np.split(sims, cuts)), int(res["passes"]))
    log.debug("approximate search: %.2f s, of which %.2f s in the worker (the rest: starting it, the files)",
              graph.wall_seconds, graph.worker_seconds)
    return found, graph


def _graph(res: dict, wall: float) -> Graph:
    return Graph(Path(res["index"]), int(res["rows"]), res["built_seconds"], float(res["seconds"]), wall)


def _verbosity() -> int:
    """The worker logs as much as this process would (core/logs.py's levels)."""
    level = logging.getLogger("clipdistill").getEffectiveLevel()
    return 1 if level <= logging.DEBUG else 0 if level <= logging.INFO else -1


def _run(command: str, cache, tmp: Path, progress: bool, *more: str) -> dict:
    """Run the worker with this Python and this clipdistill; its result.json, or the error it says."""
    from ..core import atomic

    package_root = str(Path(__file__).resolve().parents[2])  # the folder that holds clipdistill/
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([package_root, *filter(None, [env.get("PYTHONPATH")])])
    argv = [*COMMAND, command, "--cache", str(cache.path), "--result", str(tmp),
            "--verbosity", str(_verbosity()), *more, *(["--progress"] if progress else [])]
    log.debug("running %s", " ".join(argv))
    proc = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL)  # its logs and progress: our stderr
    result = tmp / "result.json"
    res = atomic.read_json(result) if result.is_file() else None
    if res is not None and "error" in res:
        if res.get("module") and res["module"].split(".")[0] == MODULE:
            raise ModuleNotFoundError(res["error"], name=MODULE)  # the CLI names the `ann` extra
        raise ApproximateSearchError(f"{res['error']}; the exact scan needs no index (drop --approximate)")
    if proc.returncode != 0 or res is None:
        how = (f"was killed by signal {-proc.returncode}" if proc.returncode < 0
               else f"exited with code {proc.returncode}")
        raise ApproximateSearchError(f"the approximate index's worker ({WORKER} {command}, on the embedding cache "
                                     f"{cache.path}) {how} without a result; its messages are above. The exact "
                                     f"scan needs no index (drop --approximate)")
    return res
