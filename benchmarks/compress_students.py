"""Does QAT win back what post-training INT8 loses, and does 2:4 sparsity keep the accuracy?
(not a speed benchmark: a CPU has no INT8 tensor cores and no sparse kernels for convolutions)

For each seed: trains one student on shapes10 with the study's distillation (KL on the probe,
train + unlabeled, that seed), then compresses its best checkpoint with `clipdistill compress`
(same seed): `ptq` (Model Optimizer's INT8 calibration in TensorRT's form), `qat` (that
calibration, then a fine-tune) and `sparse24`. Means and standard deviations are over the
seeds, i.e. over whole students, not over fine-tunes of one. Prints the README's table and
writes benchmarks/compress_students.{md,json}.

    python benchmarks/compress_students.py [--student test_efficientnet] [--student-size 32] [--seeds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import table  # noqa: E402


def mean_sd(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else f"{xs[0]:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", default="test_efficientnet", help="timm architecture (depthwise ones are where "
                                                                   "post-training INT8 hurts)")
    ap.add_argument("--student-size", type=int, default=32, help="student input side (shapes10 is 32 px)")
    ap.add_argument("--epochs", type=int, default=12, help="training epochs of each student")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--max-images", type=int, default=4000, help="images per split (shapes10: 1,000 labelled, "
                                                                  "10,000 unlabeled, 2,000 test)")
    ap.add_argument("--ft-epochs", type=int, default=2, help="fine-tune epochs of qat and sparse24")
    ap.add_argument("--ft-lr", type=float, default=1e-4, help="fine-tune learning rate of qat and sparse24")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--work", default="runs/compress-bench")
    ap.add_argument("--cache-dir", default=os.environ.get("CLIPDISTILL_CACHE",
                                                          os.path.expanduser("~/.cache/clipdistill")))
    ap.add_argument("--out", default=str(Path(__file__).with_name("compress_students")))
    args = ap.parse_args()
    from clipdistill.core.logs import setup
    from clipdistill.deploy.compress import CompressConfig, compress
    from clipdistill.distill.config import TrainConfig
    from clipdistill.distill.train import train

    setup(0)
    t0 = time.time()
    raw: dict = {"args": vars(args), "seeds": []}
    for seed in range(args.seeds):
        run = Path(args.work) / f"{args.student}-{args.student_size}px-kl-linear-{args.max_images}-seed{seed}"
        res = train(TrainConfig(method="kl", head="linear", data=["train", "unlabeled"], student=args.student,
                                student_size=args.student_size, epochs=args.epochs, max_images=args.max_images,
                                augment="none", mixup=0.0, teaching="cached", lr=args.lr, warmup_epochs=0.0,
                                seed=seed, cache_dir=args.cache_dir, out=str(run), progress=False))
        per = {"seed": seed, "train": {k: res[k] for k in ("test_accuracy", "best_epoch")}}
        for mode in ("ptq", "qat", "sparse24"):
            per[mode] = compress(CompressConfig(run=str(run), mode=mode, epochs=args.ft_epochs, lr=args.ft_lr,
                                                seed=seed, progress=False, cache_dir=args.cache_dir))
        raw["seeds"].append(per)
    s = raw["seeds"]
    dense = [p["qat"]["dense_fp32_accuracy"] for p in s]

    def row(form: str, before: list, after: list) -> dict:
        return {"form": form, "dense fp32": mean_sd(dense), "before fine-tune": mean_sd(before) if before else "-",
                "ONNX Runtime": mean_sd(after),
                "change vs fp32": mean_sd([a - d for a, d in zip(after, dense)])}

    rows = [row("INT8 PTQ (Q/DQ, TensorRT form)", [], [p["ptq"]["onnx_accuracy"] for p in s]),
            row(f"INT8 QAT ({args.ft_epochs} epochs, Q/DQ)", [p["qat"]["ptq_accuracy"] for p in s],
                [p["qat"]["onnx_accuracy"] for p in s]),
            row(f"2:4 sparse + fine-tune ({args.ft_epochs} epochs)", [p["sparse24"]["pruned_accuracy"] for p in s],
                [p["sparse24"]["onnx_accuracy"] for p in s])]
    sp = s[0]["sparse24"]
    md = (f"{args.student} at {args.student_size} px on shapes10 (kl, linear head, train + unlabeled, "
          f"{args.epochs} epochs, {args.max_images} images per split; test: {args.max_images if args.max_images < 2000 else 2000} "
          f"images), mean ± std over {args.seeds} seeds (each seed: its own student and its own fine-tunes)\n\n"
          + table(rows, ["form", "dense fp32", "before fine-tune", "ONNX Runtime", "change vs fp32"])
          + f"\n\n2:4: {sp['sparsity']['layers_2to4']} of {sp['sparsity']['eligible_layers']} eligible layers pruned "
            f"(in PyTorch), {sp['onnx_initializers_2to4']} weight tensors with the pattern in the ONNX file. "
            f"Took {time.time() - t0:.0f} s.")
    print(md)
    Path(args.out + ".md").write_text(md + "\n")
    Path(args.out + ".json").write_text(json.dumps(raw, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
