"""Loading teacher embeddings: the cache's memmap vs one `.pt` file per image (the study).

    python benchmarks/bench_cache_load.py [--n 10000] [--dim 512]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import table, timed  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=512)
    args = ap.parse_args()
    from clipdistill.teacher.cache import EmbeddingCache

    rng = np.random.default_rng(0)
    emb = rng.standard_normal((args.n, args.dim)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for i in range(args.n):  # the study's layout: one file per image
            torch.save(torch.from_numpy(emb[i:i + 1]), tmp / f"{i}.pt")
        cache = EmbeddingCache.open(tmp / "cache", {"model": "bench"}, {"name": "bench"}, args.n, args.dim)
        cache.write(0, emb, np.ones(args.n, np.uint8))
        cache.commit(args.n)

        def per_file():
            return torch.cat([torch.load(tmp / f"{i}.pt") for i in range(args.n)])

        def memmap():
            c = EmbeddingCache.load(tmp / "cache")
            order = np.random.default_rng(1).permutation(args.n)  # shuffled, as training reads them
            return torch.from_numpy(np.asarray(c.embeddings[np.sort(order)], dtype=np.float32))

        t_file, a = timed(per_file)
        t_map, b = timed(memmap)
        assert a.shape == b.shape
    rows = [{"layout": "one .pt per image (study)", "seconds": f"{t_file:.3f}", "speed-up": "1.0x"},
            {"layout": "float16 memmap + manifest (clipdistill)", "seconds": f"{t_map:.4f}",
             "speed-up": f"{t_file / t_map:.0f}x"}]
    print(f"loading {args.n} embeddings of dim {args.dim}")
    print(table(rows, ["layout", "seconds", "speed-up"]))


if __name__ == "__main__":
    main()
