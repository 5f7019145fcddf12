"""Exact search (teacher/knn.py) against the approximate index (teacher/ann.py, `search
--approximate`: a usearch HNSW graph built once from the embedding cache), on bench_search.py's
synthetic float16 embeddings written into a real embedding cache.

Per size, three fresh processes (time and peak resident memory, VmHWM, of each alone): the exact
scan; the index build; the approximate search (open the saved index memory-mapped, search, then
the same search 5 more times: a search after the first). The build and the approximate search run
in ann.py's worker process (usearch must not share a process with torch): their peak is the
worker's, and "worker start" is what a search pays for starting it (its wall time less the time
the worker itself reports). Recall@N: the share of exact search's
results (after each image went to its best prompt) the approximate search also returns, for two
kinds of prompt: near a cluster (like the images of one class) and random (near no cluster: the
harder case for a graph walk).

Sizes above --build-max are scanned exactly only; their build time is extrapolated from the two
largest builds measured (said so in the table), since a build there takes longer than a short
benchmark on two cores allows.

    python benchmarks/bench_ann.py [--sizes 100000,300000,1000000] [--build-max 300000] [--dim 512] [--md FILE]

Writes benchmarks/bench_ann.md (or --md: a small check need not overwrite the table).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine_kind, table  # noqa: E402
from bench_search import blocks, centres  # noqa: E402

HERE = Path(__file__).parent
REPEATS = 5


def make_cache(folder: Path, rows: int, dim: int) -> None:
    from clipdistill.teacher.cache import EmbeddingCache

    cache = EmbeddingCache.open(folder, {"model": "synthetic"}, {"name": f"bench-{rows}"}, rows, dim)
    for a, block in blocks(rows, dim):
        cache.write(a, block.astype(np.float16), np.ones(len(block), np.uint8))
    cache.commit(rows)


def queries(dim: int, prompts: int) -> dict[str, np.ndarray]:
    near = centres(dim)[:prompts] + 2.0 * np.random.default_rng(2).standard_normal((prompts, dim))
    return {"near": near.astype(np.float32),
            "random": np.random.default_rng(1).standard_normal((prompts, dim)).astype(np.float32)}


def child(phase: str, folder: str, prompts: int, n: int) -> None:
    from clipdistill.data.store import release_pages
    from clipdistill.teacher import ann, knn
    from clipdistill.teacher.cache import EmbeddingCache

    cache = EmbeddingCache.load(folder)
    release_pages(cache.embeddings)  # opening checks every row (finite): those pages leave this process ...
    _reset_peak()  # ... and the peak starts again, so it is the phase's own
    text = queries(cache.dim, prompts)
    out: dict = {}
    if phase == "exact":
        for kind, t in text.items():
            t0 = time.perf_counter()
            found = knn.search(cache.embeddings, t, n, cache.valid)
            out[f"{kind}_s"] = time.perf_counter() - t0
            out[kind] = [r.tolist() for r in found.rows]
            out[f"{kind}_sim"] = [float(s.mean()) for s in found.similarity]
    elif phase == "build":  # in the worker: its CPU time and peak are this process's children's
        graph = ann.open_index(cache)
        out.update(seconds=graph.build_seconds, cpu_seconds=_cpu_seconds(resource.RUSAGE_CHILDREN),
                   bytes=graph.path.stat().st_size)
    else:  # each search: one worker that opens the index memory-mapped and asks it
        for kind, t in text.items():
            found, graph = ann.search(cache, t, n)
            assert graph.build_seconds is None, "the index was not there: the build phase failed"
            out[f"{kind}_s"] = graph.wall_seconds
            out[kind] = [r.tolist() for r in found.rows]
            out[f"{kind}_sim"] = [float(s.mean()) for s in found.similarity]
        warm, start = [], []
        for _ in range(REPEATS):
            graph = ann.search(cache, text["near"], n)[1]
            warm.append(graph.wall_seconds)
            start.append(graph.wall_seconds - graph.worker_seconds)
        out["warm_s"], out["start_s"] = statistics.median(warm), statistics.median(start)
    out["peak_mib"] = _peak_mib() if phase == "exact" else _peak_mib(resource.RUSAGE_CHILDREN)
    print(json.dumps(out))


def _peak_mib(who: int = resource.RUSAGE_SELF) -> float:
    """Peak resident memory (Linux: KiB) of this process, or of the largest of its finished children."""
    return resource.getrusage(who).ru_maxrss / 1024


def _reset_peak() -> None:
    """Start VmHWM again from the current resident set (Linux: /proc/PID/clear_refs, 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _cpu_seconds(who: int = resource.RUSAGE_SELF) -> float:
    u = resource.getrusage(who)
    return u.ru_utime + u.ru_stime


def measure(phase: str, folder: Path, args) -> dict:
    with open(folder / "embeddings.npy", "rb") as f:  # every phase reads the array warm, as bench_search does
        while f.read(1 << 24):
            pass
    cmd = [sys.executable, __file__, "--child", phase, "--path", str(folder), "--prompts", str(args.prompts),
           "--n", str(args.n)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    return json.loads(out.stdout.strip().splitlines()[-1])


def recall(approx: list[list[int]], exact: list[list[int]]) -> float:
    return float(np.mean([len(set(a) & set(e)) / len(e) for a, e in zip(approx, exact)]))


def row(size: int, exact: dict, build: dict, approx: dict | None, extrapolated: bool) -> dict:
    b = f"{build['seconds']:.0f}" + (" (extrapolated)" if extrapolated else f" ({build['cpu_seconds']:.0f} CPU s)")
    r = {"rows": f"{size:,}", "exact s": f"{exact['near_s']:.2f}", "exact peak MiB": f"{exact['peak_mib']:.0f}",
         "build s": b, "build peak MiB": "-" if extrapolated else f"{build['peak_mib']:.0f}",
         "index file": f"{build['bytes'] / 2**20:.0f} MiB" + (" (extrapolated)" if extrapolated else "")}
    if approx is None:
        r.update({"approx open + search s": "-", "approx search ms (again)": "-", "worker start ms": "-",
                  "approx peak MiB": "-", "recall@N near": "-", "recall@N random": "-", "cosine lost random": "-"})
        per_search = 0.0
    else:
        r.update({"approx open + search s": f"{approx['near_s']:.3f}",
                  "approx search ms (again)": f"{1000 * approx['warm_s']:.1f}",
                  "worker start ms": f"{1000 * approx['start_s']:.0f}",
                  "approx peak MiB": f"{approx['peak_mib']:.0f}",
                  "recall@N near": f"{recall(approx['near'], exact['near']):.3f}",
                  "recall@N random": f"{recall(approx['random'], exact['random']):.3f}",
                  "cosine lost random": f"{np.mean(exact['random_sim']) - np.mean(approx['random_sim']):.4f}"})
        per_search = approx["near_s"]
    gain = exact["near_s"] - per_search
    r["searches that pay the build"] = f"{math.ceil(build['seconds'] / gain)}" if gain > 0 else "never"
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,300000,1000000")
    ap.add_argument("--build-max", type=int, default=300000, help="larger sizes: exact only, build extrapolated")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--n", type=int, default=100, help="results per prompt (the N of recall@N)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dir", default=None, help="where the synthetic caches go (default: a temporary folder)")
    ap.add_argument("--md", default=str(HERE / "bench_ann.md"), help="where the table goes")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--path", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.path, args.prompts, args.n)
    from clipdistill.teacher import ann_worker

    results, builds, extrapolated = [], [], ""
    t_start, load = time.time(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for size in [int(s) for s in args.sizes.split(",")]:
            folder = Path(tmp) / f"cache-{size}"
            make_cache(folder, size, args.dim)
            exact = measure("exact", folder, args)
            if size <= args.build_max:
                build = measure("build", folder, args)
                approx = measure("approx", folder, args)
                builds.append((size, build))
                results.append(row(size, exact, build, approx, False))
            else:  # t = t2 (n / n2)^b, b from the two largest builds measured; file size per row
                (n1, b1), (n2, b2) = builds[-2:]
                slope = math.log(b2["seconds"] / b1["seconds"]) / math.log(n2 / n1)
                build = {"seconds": b2["seconds"] * (size / n2) ** slope, "bytes": b2["bytes"] * size / n2}
                extrapolated = (f" Build time past {args.build_max:,} rows extrapolated: t = t({n2:,}) x (rows / "
                                f"{n2:,})^{slope:.2f}, the exponent from the builds at {n1:,} and {n2:,} rows; the "
                                f"index file in proportion to the rows.")
                results.append(row(size, exact, build, None, True))
            print(results[-1], flush=True)
            shutil.rmtree(folder)
    md = table(results, list(results[0]))
    print(md)
    cpu = machine_kind()
    head = (f"# Exact search vs the approximate index (usearch HNSW)\n\n"
            f"{time.strftime('%Y-%m-%d')}, `python benchmarks/bench_ann.py --sizes {args.sizes} --build-max "
            f"{args.build_max}` ({cpu} machine, {os.cpu_count()} cores, {args.threads} threads, usearch "
            f"{_usearch_version()}; {round((time.time() - t_start) / 60)} min in all; load average {load:.1f} "
            f"before it: others' jobs share the cores). float16 x {args.dim} synthetic embeddings (bench_search.py's "
            f"clusters) in a real embedding cache, page cache warm; {args.prompts} prompts, {args.n} results each; "
            f"the index: cosine, float16, M={ann_worker.CONNECTIVITY}, efConstruction={ann_worker.EXPANSION_ADD}, "
            f"ef = {ann_worker.EXPANSION_SEARCH} x the count asked. Each phase in a fresh process, peak = VmHWM (the "
            f"interpreter and numpy included; for the build and the approximate search, that of ann.py's worker "
            f"process, where usearch runs) from after the cache was opened (opening reads every row to check it "
            f"is finite; those pages are handed back first). \"approx open + search\": what one `search "
            f"--approximate` pays after the build (start the worker, open the index memory-mapped, one search); "
            f"\"again\": the median of {REPEATS} more such searches; \"worker start\": the part of one that "
            f"is starting the worker (Python, numpy, usearch, the cache opened, the files). recall@N: the share "
            f"of exact search's results the approximate search "
            f"returns too; \"cosine lost\": how much lower the mean similarity of its results is than exact "
            f"search's (whether the rows it missed were near-ties). \"searches that pay the build\": build s / "
            f"(exact s - approx open + search s). Build \"CPU s\": its user + system time (what it would take "
            f"on one free core).{extrapolated}\n\n")
    Path(args.md).write_text(head + md + "\n")


def _usearch_version() -> str:
    """Its distribution's version: usearch is not imported here (ann.py: it stays in the worker)."""
    from importlib.metadata import version

    return version("usearch")


if __name__ == "__main__":
    main()
