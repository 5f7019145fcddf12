"""Does QAT win back what post-training INT8 loses, and does 2:4 sparsity keep the accuracy?
(not a speed benchmark: a CPU has no INT8 tensor cores and no sparse kernels for convolutions)

Trains one student on shapes10 with the study's distillation (KL on the probe, train +
unlabeled), then compresses its best checkpoint with `clipdistill compress` over three
fine-tune seeds: `qat` (its PTQ figure is the same calibration before the fine-tune) and
`sparse24`. Prints the README's table and writes benchmarks/compress_students.{md,json}.

    python benchmarks/compress_students.py [--student mobilenetv3_large_100] [--epochs 10] [--seeds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import table  # noqa: E402


def mean_sd(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else f"{xs[0]:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", default="mobilenetv3_large_100")
    ap.add_argument("--epochs", type=int, default=8, help="training epochs of the student")
    ap.add_argument("--max-images", type=int, default=4000, help="images per split (shapes10: 1,000 labelled, "
                                                                  "10,000 unlabeled, 2,000 test)")
    ap.add_argument("--ft-epochs", type=int, default=2, help="fine-tune epochs of qat and sparse24")
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
    run = Path(args.work) / f"{args.student}-kl-linear-{args.max_images}"
    res = train(TrainConfig(method="kl", head="linear", data=["train", "unlabeled"], student=args.student,
                            epochs=args.epochs, max_images=args.max_images, augment="none", mixup=0.0, teaching="cached", lr=1e-3,
                            cache_dir=args.cache_dir, out=str(run), progress=False))
    rows, raw = [], {"student": args.student, "train": {k: res[k] for k in ("test_accuracy", "best_epoch")}}
    for mode in ("qat", "sparse24"):
        per_seed = []
        for seed in range(args.seeds):
            r = compress(CompressConfig(run=str(run), mode=mode, epochs=args.ft_epochs, seed=seed, progress=False,
                                        cache_dir=args.cache_dir,
                                        out=str(run / f"model.{mode}.seed{seed}.onnx")))
            per_seed.append(r)
        raw[mode] = per_seed
        dense = per_seed[0]["dense_fp32_accuracy"]
        if mode == "qat":
            rows.append({"form": "INT8 PTQ (Model Optimizer calibration, TensorRT form)", "dense fp32": f"{dense:.2f}",
                         "before fine-tune": mean_sd([r["ptq_accuracy"] for r in per_seed]),
                         "after fine-tune (ONNX Runtime)": "-",
                         "change": f"{statistics.mean(r['ptq_accuracy'] for r in per_seed) - dense:+.2f}"})
        fine = [r["onnx_accuracy"] for r in per_seed]
        rows.append({"form": "INT8 QAT (Q/DQ ONNX)" if mode == "qat" else "2:4 sparse + fine-tune",
                     "dense fp32": f"{dense:.2f}",
                     "before fine-tune": mean_sd([r.get("ptq_accuracy", r.get("pruned_accuracy")) for r in per_seed]),
                     "after fine-tune (ONNX Runtime)": mean_sd(fine),
                     "change": f"{statistics.mean(fine) - dense:+.2f}"})
    md = f"{args.student}, {args.seeds} fine-tune seeds of one trained student ({args.ft_epochs} epochs each)\n\n" + \
        table(rows, ["form", "dense fp32", "before fine-tune", "after fine-tune (ONNX Runtime)", "change"])
    sp = raw["sparse24"][0]
    md += (f"\n\n2:4: {sp['sparsity']['layers_2to4']} of {sp['sparsity']['eligible_layers']} eligible layers pruned "
           f"(in PyTorch), {sp['onnx_initializers_2to4']} weight tensors with the pattern in the ONNX file.")
    print(md)
    Path(args.out + ".md").write_text(md + "\n")
    Path(args.out + ".json").write_text(json.dumps(raw, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
