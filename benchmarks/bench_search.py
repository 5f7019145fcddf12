"""Exact search over an embedding cache: chunked (teacher/knn.py, what `clipdistill search --pool`
runs) against brute force (the whole matrix in memory), on synthetic float16 embeddings kept as
a memmap on disk as the cache keeps them.

Each (size, method) runs in a fresh process that reports its time and peak resident memory
(VmHWM), so one row's memory never hides in another's. Both methods must return the same rows.

    python benchmarks/bench_search.py [--sizes 10000,100000,1000000] [--dim 512] [--prompts 10] [--n 100]

Writes benchmarks/bench_search.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import table  # noqa: E402

HERE = Path(__file__).parent


def _peak_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def centres(dim: int) -> np.ndarray:
    """The clusters' centres `blocks` draws the rows around."""
    return np.random.default_rng(0).standard_normal((64, dim)).astype(np.float32)


def blocks(rows: int, dim: int, block: int = 65536):
    """Synthetic embeddings (clustered, so prompts compete for rows), as (start, float32 rows) blocks."""
    rng = np.random.default_rng(0)
    c = rng.standard_normal((64, dim)).astype(np.float32)  # = centres(dim)
    for a in range(0, rows, block):
        b = min(rows, a + block)
        pick = rng.integers(0, len(c), b - a)
        yield a, c[pick] + 2.0 * rng.standard_normal((b - a, dim)).astype(np.float32)


def make(path: Path, rows: int, dim: int) -> None:
    """`blocks` as a float16 .npy, written a block at a time."""
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(rows, dim))
    for a, block in blocks(rows, dim):
        arr[a:a + len(block)] = block
    arr.flush()
    del arr


def child(method: str, path: str, prompts: int, n: int, chunk: int) -> None:
    """One measurement: load nothing but the memmap, search, print JSON."""
    from clipdistill.teacher import knn

    base = _peak_mib()
    emb = np.load(path, mmap_mode="r")
    rng = np.random.default_rng(1)
    text = rng.standard_normal((prompts, emb.shape[1])).astype(np.float32)
    t0 = time.perf_counter()
    if method == "chunked":
        found = knn.search(emb, text, n, chunk_rows=chunk)
        rows = [r.tolist() for r in found.rows]
        passes = found.passes
    else:  # brute force: the whole matrix in float32, every similarity, then the same assignment
        full = knn.normalise(np.asarray(emb))
        sims = knn.normalise(text) @ full.T
        k = min(len(full), n * min(prompts, 4))
        while True:
            top = [np.argsort(-s, kind="stable")[:k] for s in sims]
            picked = knn.one_per_image([(s[t], t) for s, t in zip(sims, top)], n)
            if all(len(r) == n for _, r in picked) or k == len(full):
                break
            k = min(len(full), 2 * k)
        rows = [r.tolist() for _, r in picked]
        passes = 1
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "peak_mib": _peak_mib(), "base_mib": base, "passes": passes,
                      "rows": rows}))


def measure(method: str, path: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--child", method, "--path", str(path), "--prompts", str(args.prompts),
           "--n", str(args.n), "--chunk", str(args.chunk)]
    # drop the file's pages from this machine's page cache would need root; every run reads it warm (the
    # first read below warms it), which is what a repeated search meets
    out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--n", type=int, default=100, help="results per prompt")
    ap.add_argument("--chunk", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dir", default=None, help="where the synthetic arrays go (default: a temporary folder)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--path", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.path, args.prompts, args.n, args.chunk)
    results = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for size in [int(s) for s in args.sizes.split(",")]:
            path = Path(tmp) / f"emb-{size}.npy"
            make(path, size, args.dim)
            with open(path, "rb") as f:  # warm the page cache for both methods alike
                while f.read(1 << 24):
                    pass
            chunked, brute = measure("chunked", path, args), measure("brute", path, args)
            assert chunked["rows"] == brute["rows"], f"{size} rows: chunked and brute force disagree"
            gb = path.stat().st_size / 1e9
            results.append({"rows": f"{size:,}", "array on disk": f"{gb:.2f} GB",
                            "chunked s": f"{chunked['seconds']:.2f}", "chunked peak MiB": f"{chunked['peak_mib']:.0f}",
                            "brute s": f"{brute['seconds']:.2f}", "brute peak MiB": f"{brute['peak_mib']:.0f}",
                            "time ratio": f"{chunked['seconds'] / brute['seconds']:.2f}",
                            "memory ratio": f"{chunked['peak_mib'] / brute['peak_mib']:.2f}",
                            "scans": chunked["passes"], "same rows": "yes"})
            print(results[-1], flush=True)
            path.unlink()
    cols = list(results[0])
    md = table(results, cols)
    print(md)
    head = (f"# Exact search over an embedding cache: chunked vs brute force\n\n"
            f"`python benchmarks/bench_search.py` ({platform.processor() or platform.machine()}, {os.cpu_count()} "
            f"cores, {args.threads} threads; float16 x {args.dim} synthetic embeddings as a memmap, page cache "
            f"warm; {args.prompts} prompts, {args.n} results each, chunks of {args.chunk:,} rows; each run in a "
            f"fresh process, peak = VmHWM, the interpreter and numpy included). Both return the same rows.\n\n")
    (HERE / "bench_search.md").write_text(head + md + "\n")


if __name__ == "__main__":
    main()
