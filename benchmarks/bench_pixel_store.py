"""Does a run's memory stay flat as the pool grows? One epoch of resnet10t over a generated
tar-shard pool (`make-pool --shards`), reading its batches from the pixel store, against
today's other design (every image decoded into one in-memory array) on a pool small enough
to fit; each in a fresh process, its peak resident memory (VmHWM) and training images/s.

The pool's embedding cache is filled first (its own step, "embed s"); the pixel store is
deleted and filled again inside the measured run (decoded by DataLoader workers, written by the
run), so that the fill's memory counts in the run's peak. A pool of N images at S px needs N*S*S*3 bytes of
pixel store on disk (200,000 at 64 px: 2.46 GB) and N*D*2 bytes of embeddings (D = 512 for
ViT-B-32).

    python benchmarks/bench_pixel_store.py [--images 200000] [--small 20000] [--size 64]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import table  # noqa: E402

WORKER = r"""
import json, sys, time
from clipdistill.distill.config import TrainConfig
from clipdistill.distill.train import train
import clipdistill.data.protocol as protocol
kw = json.loads(sys.argv[1])
if not kw.pop("store"):
    protocol.ImageDataset.store_dir = property(lambda self: None, lambda self, v: None)  # today's design: in RAM
t0 = time.time()
res = train(TrainConfig(**kw))
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
from pathlib import Path
epochs = [json.loads(l) for l in (Path(kw["out"]) / "metrics.jsonl").read_text().splitlines() if "train_loss" in l]
print(json.dumps({"vmhwm_mb": int(hwm) / 1024, "img_per_s": epochs[-1]["img_per_s"], "seconds": time.time() - t0,
                  "test_accuracy": res["test_accuracy"]}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=200_000, help="the large pool (read from the store)")
    ap.add_argument("--small", type=int, default=20_000, help="the pool that also fits in memory (both designs)")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--shards", type=int, default=20)
    ap.add_argument("--work", default="runs/bench-pixel-store")
    ap.add_argument("--cache-dir", default=os.environ.get("CLIPDISTILL_CACHE",
                                                          os.path.expanduser("~/.cache/clipdistill")))
    ap.add_argument("--out", default=str(Path(__file__).with_name("pixel_store")))
    args = ap.parse_args()
    from clipdistill.data.datasets import create_dataset
    from clipdistill.data.example_pool import PoolConfig, make_pool
    from clipdistill.data.pixel_store import store_path
    from clipdistill.teacher.tiny import ensure_tiny_teacher

    work = Path(args.work)
    cache = Path(args.cache_dir)
    teacher = str(ensure_tiny_teacher(str(cache)))
    rows = []
    for n, designs in ((args.small, (False, True)), (args.images, (True,))):
        ex = work / f"pool-{n}-{args.size}px"
        if not (ex / "classes.txt").exists():
            t0 = time.time()
            make_pool(PoolConfig(out=str(ex), images=n, size=args.size, duplicates=0, broken=0,
                                 test_per_class=50, shards=args.shards))
            print(f"generated {n} images in {args.shards} shards: {time.time() - t0:.0f} s", flush=True)
        spec = str(ex / "shards" / f"pool-{{000..{args.shards - 1:03d}}}.tar")
        for store in designs:
            kw = dict(dataset="folder", data_root=str(ex / "eval"), pool=[spec], prompts=str(ex / "classes.txt"),
                      data=["unlabeled"], head="text", method="cosine", student="resnet10t", student_size=args.size,
                      epochs=1, augment="none", mixup=0.0, teaching="cached", warmup_epochs=0.0, lr=1e-3,
                      pretrained=teacher, cache_dir=str(cache), progress=False, pick="last", store=store,
                      out=str(work / f"run-{n}-{'store' if store else 'memory'}"))
            # the caches first, in their own process (resumable, shared): not part of the figures
            prep = {**kw, "epochs": 1, "out": str(work / f"prep-{n}")}
            for k in (prep, kw):
                subprocess.run(["rm", "-rf", k["out"]])
            if store:
                ds = create_dataset("folder", "unlabeled", "", pools=(spec,), cache_dir=str(cache))
                shutil.rmtree(store_path(cache, ds.slug(), "unlabeled", args.size), ignore_errors=True)
            t0 = time.time()
            subprocess.run([sys.executable, "-m", "clipdistill", "embed", "--dataset", "folder", "--data-root",
                            kw["data_root"], "--pool", spec, "--split", "unlabeled", "--pretrained", teacher,
                            "--cache-dir", str(cache), "--no-progress"], check=True)
            prep_s = time.time() - t0
            proc = subprocess.run([sys.executable, "-c", WORKER, json.dumps(kw)], capture_output=True, text=True,
                                  env={**os.environ, "PYTHONWARNINGS": "ignore"})
            if proc.returncode:
                sys.exit(proc.stderr[-3000:])
            got = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append({"pool images": n, "design": "pixel store (pread)" if store else "in memory (today)",
                         "pixels GB": round(n * args.size * args.size * 3 / 1e9, 2),
                         "peak RSS (VmHWM) MB": round(got["vmhwm_mb"]), "train img/s": round(got["img_per_s"] or 0),
                         "run s": round(got["seconds"]), "embed s": round(prep_s)})
            print(rows[-1], flush=True)
    md = (f"One epoch of resnet10t at {args.size} px (cosine on the tiny teacher's embedding, cached targets), "
          f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs\n\n"
          + table(rows, list(rows[0])))
    print(md)
    Path(args.out + ".md").write_text(md + "\n")


if __name__ == "__main__":
    main()
