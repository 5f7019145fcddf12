"""Which recipe turns prompts + a small unlabeled pool into a good student? (not a speed benchmark)

Builds the example pool of `clipdistill make-pool` (3,000 shapes10 images of all ten classes,
64 px, nested folders, 150 duplicates, 6 broken files; prompts and a labelled test folder for
four classes), then runs `fit-prompts` with the tiny teacher: its defaults, then one change at
a time, and on other pools (other class subsets, a smaller pool). Prints the README's table
and writes it with every figure to benchmarks/fit_prompts_ablation.{md,json}. Finished rows
are reused when run again (each row's OUT is kept under --work).

    python benchmarks/fit_prompts_ablation.py [--work DIR] [--only NAME,...] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import table  # noqa: E402

DEFAULT_CLASSES = ["circle", "star", "heart", "crescent"]


def subset(seed: int) -> list[str]:
    from clipdistill.data.shapes10 import CLASSES

    return [CLASSES[i] for i in sorted(np.random.default_rng(seed).choice(len(CLASSES), 4, replace=False))]


# name: (pool: (images, classes, seed), fit-prompts overrides, what changes). The one-change rows
# compare with `epochs-40` (the first default); `default` is the defaults of fit-prompts now.
P = (3000, DEFAULT_CLASSES, 0)
ROWS = {
    "default": (P, {}, "the defaults: --epochs 0 = about 4,000 steps (95 epochs of this pool)"),
    "epochs-40": (P, {"epochs": 40}, "40 epochs"),
    "epochs-20": (P, {"epochs": 20}, "20 epochs"),
    "kl": (P, {"epochs": 40, "method": "kl"}, "40 epochs, KL on the prompts' probabilities instead of the embedding"),
    "mse": (P, {"epochs": 40, "method": "mse"}, "40 epochs, MSE to the embedding instead of cosine"),
    "cached": (P, {"epochs": 40, "teaching": "cached"},
               "40 epochs, teacher targets of the plain image (cached), student on augmented views"),
    "no-augment": (P, {"epochs": 40, "augment": "none", "mixup": 0.0},
                   "40 epochs, no augmentation, no mixup (targets cached: identical)"),
    "no-mixup": (P, {"epochs": 40, "mixup": 0.0}, "40 epochs, no mixup"),
    "curated": (P, {"epochs": 40, "keep_threshold": 0.9, "negatives": "drop"},
                "40 epochs, curated: only images the teacher gives >= 0.9 to one prompt"),
    "pool-1000-40": ((1000, DEFAULT_CLASSES, 0), {"epochs": 40}, "a pool of 1,000 images, 40 epochs"),
    "pool-1000": ((1000, DEFAULT_CLASSES, 0), {}, "a pool of 1,000 images, the defaults"),
    "subset-1-40": ((3000, subset(1), 1), {"epochs": 40}, "other classes (pool seed 1), 40 epochs"),
    "subset-1": ((3000, subset(1), 1), {}, "other classes (pool seed 1), the defaults"),
    "subset-2-40": ((3000, subset(2), 2), {"epochs": 40}, "other classes (pool seed 2), 40 epochs"),
    "subset-2": ((3000, subset(2), 2), {}, "other classes (pool seed 2), the defaults"),
}


def build_pool(work: Path, images: int, classes: list[str], seed: int) -> Path:
    from clipdistill.data.example_pool import PoolConfig, make_pool

    out = work / f"pool-{images}-{'-'.join(classes)}-s{seed}"
    if not (out / "truth.json").is_file():
        make_pool(PoolConfig(out=str(out), images=images, classes=classes, seed=seed))
    return out


def run_row(name: str, work: Path, cache_dir: str) -> dict:
    from clipdistill.fit.config import FitConfig
    from clipdistill.fit.pipeline import fit_prompts

    (images, classes, seed), overrides, what = ROWS[name]
    pool = build_pool(work, images, classes, seed)
    cfg = FitConfig(prompts=str(pool / "classes.txt"), pool=[str(pool / "pool")], eval=str(pool / "eval"),
                    out=str(work / "fits" / name), cache_dir=cache_dir, progress=False, **overrides)
    t0 = time.time()
    s = fit_prompts(cfg)
    train = json.loads((Path(cfg.out) / "run" / "result.json").read_text())
    return {"row": name, "what": what, "pool": images, "classes": ",".join(classes),
            "curated": f"{s['curation']['kept']}/{s['curation']['scored']}", "method": cfg.method,
            "augment": f"{cfg.augment}{'+mixup' if cfg.mixup else ''}", "teaching": train["teaching"],
            "epochs": train["epochs"], "teacher": round(s["teacher_zero_shot_accuracy"], 2),
            "student": round(s["student"]["test_accuracy"], 2), "int8": s["export"]["int8_accuracy"],
            "agreement_pool": round(s["quality"]["agreement"], 2), "train_s": round(train["train_seconds"]),
            "fit_s": round(s["wall_seconds"]), "wall_s_this_call": round(time.time() - t0)}


def open_set(work: Path, n: int = 1000) -> dict:
    """The default row's model on fresh images of all ten classes: how often it answers "none of
    these" (its calibrated threshold) on the six classes no prompt names, and on the four it knows."""
    from PIL import Image

    from clipdistill.data.shapes10 import CLASSES, generate
    from clipdistill.deploy.predict import predict

    model = work / "fits" / "default" / "model.onnx"
    prompted = set(json.loads((build_pool(work, 3000, DEFAULT_CLASSES, 0) / "truth.json").read_text())["prompted"])
    images, labels = generate("test", n, 64, 7007)
    folder = work / "open-set"
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i:04d}.png")
    res = predict(str(model), [str(folder)], top_k=1, reject=json.loads(model.with_suffix(".json").read_text())
                  ["reject_threshold"])["results"]
    known = np.array([CLASSES[labels[int(Path(r["path"]).stem)]] in prompted for r in res])
    rejected = np.array([r["rejected"] for r in res])
    right = np.array([r["label"] == CLASSES[labels[int(Path(r["path"]).stem)]] for r in res])
    return {"images": n, "rejected_unprompted": round(float(rejected[~known].mean() * 100), 1),
            "rejected_prompted": round(float(rejected[known].mean() * 100), 1),
            "accuracy_prompted_accepted": round(float(right[known & ~rejected].mean() * 100), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/fit-ablation", help="pools and runs (kept: finished rows are reused)")
    ap.add_argument("--only", default="", help="comma-separated row names (default: all): " + ", ".join(ROWS))
    ap.add_argument("--cache-dir", default=os.environ.get("CLIPDISTILL_CACHE",
                                                          os.path.expanduser("~/.cache/clipdistill")))
    ap.add_argument("--out", default=str(Path(__file__).with_name("fit_prompts_ablation")),
                    help="writes OUT.md and OUT.json")
    args = ap.parse_args()
    from clipdistill.core.logs import setup

    setup(0)
    names = [n for n in args.only.split(",") if n] or list(ROWS)
    work = Path(args.work)
    rows = []
    for n in names:
        done = work / "rows" / f"{n}.json"  # a row's figures from its first, complete run (reruns reuse the run)
        print(f"--- {n}: {ROWS[n][2]}", flush=True)
        if done.is_file():
            rows.append({**json.loads(done.read_text()), "row": n, "what": ROWS[n][2]})
        else:
            rows.append(run_row(n, work, args.cache_dir))
            done.parent.mkdir(parents=True, exist_ok=True)
            done.write_text(json.dumps(rows[-1]) + "\n")
        print(json.dumps(rows[-1]), flush=True)
    cols = ["row", "what", "pool", "curated", "method", "augment", "teaching", "epochs", "teacher", "student",
            "int8", "train_s", "fit_s"]
    md = table(rows, cols)
    if "default" in names:
        o = open_set(work)
        md += (f"\n\nOpen set (the default row's model, its calibrated reject threshold, {o['images']} fresh images "
               f"of all ten classes): 'none of these' for {o['rejected_unprompted']}% of the six unprompted classes' "
               f"images and "
               f"{o['rejected_prompted']}% of the four prompted ones; accuracy on the prompted images it accepts: "
               f"{o['accuracy_prompted_accepted']}%.")
        Path(args.out + ".open_set.json").write_text(json.dumps(o) + "\n")
    print(md)
    Path(args.out + ".md").write_text(md + "\n")
    Path(args.out + ".json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
