"""Does QAT win back what post-training INT8 loses, and does 2:4 sparsity keep the accuracy?
(not a speed benchmark: a CPU has no INT8 tensor cores and no sparse kernels for convolutions)

For each seed: trains one student on shapes10 with the study's distillation (KL on the probe,
train + unlabeled, that seed), then compresses its best checkpoint with `clipdistill compress`
(same seed): `ptq` (Model Optimizer's INT8 calibration in TensorRT's form), and for each
fine-tune learning rate `qat` (that calibration, then a fine-tune) and `sparse24`, beside the
same fine-tune without compression (`--control`): a student trained for minutes on a CPU has
not converged, and a few more epochs move it whether or not it is quantized, so QAT and 2:4 are
compared with that control, PTQ with the checkpoint. Means and standard deviations are over the
seeds, i.e. over whole students, not over fine-tunes of one. Prints the README's table and
writes benchmarks/compress_students.{md,json}.

    python benchmarks/compress_students.py [--student mobilenetv3_small_100] [--student-size 64] [--seeds 3]
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
    ap.add_argument("--student", default="mobilenetv3_small_100", help="timm architecture (depthwise ones are "
                                                                       "where post-training INT8 hurts)")
    ap.add_argument("--student-size", type=int, default=64, help="student input side (shapes10 is 32 px)")
    ap.add_argument("--epochs", type=int, default=20, help="training epochs of each student")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--max-images", type=int, default=4000, help="images per split (shapes10: 1,000 labelled, "
                                                                  "10,000 unlabeled, 2,000 test)")
    ap.add_argument("--ft-epochs", type=int, default=4, help="fine-tune epochs of qat and sparse24")
    ap.add_argument("--ft-lr", type=float, nargs="+", default=[1e-3, 3e-3],
                    help="fine-tune learning rates of qat and sparse24 (each measured)")
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
        per = {"seed": seed, "train": {k: res[k] for k in ("test_accuracy", "best_epoch")},
               "ptq": compress(CompressConfig(run=str(run), mode="ptq", seed=seed, progress=False,
                                              cache_dir=args.cache_dir))}
        for lr in args.ft_lr:
            for mode in ("qat", "sparse24"):
                per[f"{mode}@{lr:g}"] = compress(CompressConfig(
                    run=str(run), mode=mode, epochs=args.ft_epochs, lr=lr, seed=seed, control=mode == "qat",
                    out=str(run / f"model.{mode}.lr{lr:g}.onnx"), progress=False, cache_dir=args.cache_dir))
        raw["seeds"].append(per)
        Path(args.out + ".json").write_text(json.dumps(raw, indent=1, default=str) + "\n")  # a seed at a time
    s = raw["seeds"]
    dense = [p["ptq"]["dense_fp32_accuracy"] for p in s]

    def row(form: str, acc: list, ref: list, ref_name: str) -> dict:
        return {"form": form, "test accuracy": mean_sd(acc),
                "change": mean_sd([a - r for a, r in zip(acc, ref)]), "compared with": ref_name}

    rows = [row("dense fp32 (the trained student)", dense, dense, "-"),
            row("INT8 PTQ (Q/DQ, TensorRT form), ONNX Runtime", [p["ptq"]["onnx_accuracy"] for p in s], dense,
                "dense fp32")]
    for lr in args.ft_lr:
        q, sp = [p[f"qat@{lr:g}"] for p in s], [p[f"sparse24@{lr:g}"] for p in s]
        control = [r["control_fp32_accuracy"] for r in q]
        ctl = f"control, lr {lr:g}"
        rows += [row(f"dense fine-tune, {args.ft_epochs} epochs at lr {lr:g} (control)", control, dense,
                     "dense fp32"),
                 row(f"INT8 QAT, {args.ft_epochs} epochs at lr {lr:g}, ONNX Runtime",
                     [r["onnx_accuracy"] for r in q], control, ctl),
                 row(f"2:4 sparse + fine-tune, {args.ft_epochs} epochs at lr {lr:g}, ONNX Runtime",
                     [r["onnx_accuracy"] for r in sp], control, ctl)]
    sp = s[0][f"sparse24@{args.ft_lr[0]:g}"]
    md = (f"{args.student} at {args.student_size} px on shapes10 (kl, linear head, train + unlabeled, "
          f"{args.epochs} epochs at lr {args.lr:g}, {args.max_images} images per split; test: "
          f"{min(args.max_images, 2000)} images), mean ± std over {args.seeds} seeds (each seed: its own student, "
          f"its own fine-tunes)\n\n"
          + table(rows, ["form", "test accuracy", "change", "compared with"])
          + f"\n\n2:4: {sp['sparsity']['layers_2to4']} of {sp['sparsity']['eligible_layers']} eligible layers pruned "
            f"(in PyTorch), {sp['onnx_initializers_2to4']} weight tensors with the pattern in the ONNX file. "
            f"Took {time.time() - t0:.0f} s.")
    print(md)
    Path(args.out + ".md").write_text(md + "\n")
    Path(args.out + ".json").write_text(json.dumps(raw, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
