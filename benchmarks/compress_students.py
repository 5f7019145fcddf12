"""Does QAT win back what post-training INT8 loses, and does 2:4 sparsity keep the accuracy?
(not a speed benchmark: a CPU has no INT8 tensor cores and no sparse kernels for convolutions)

For each seed: trains one student on shapes10 with `clipdistill train`'s recipe (KL on the
probe, train + unlabeled, the teacher in the loop on augmented views, that seed), then
compresses its best checkpoint with `clipdistill compress` (same seed): `ptq` (Model
Optimizer's INT8 calibration in TensorRT's form), and for each fine-tune learning rate `qat`
(that calibration, then a fine-tune) and `sparse24`, beside the same fine-tune without
compression (`--control`): a few more epochs move a student whether or not it is quantized
(its best checkpoint is picked on 100 validation images, often mid-run), so QAT and 2:4 are
compared with that control as well as with the checkpoint. Means and standard deviations are
over the seeds, i.e. over whole students, not over fine-tunes of one. Prints the README's
table and writes benchmarks/compress_students.{md,json} (`--report` prints it again from the
json).

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
from typing import Optional

sys.path.insert(0, str(Path(__file__).parent))
from _common import table  # noqa: E402


def mean_sd(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else f"{xs[0]:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", default="mobilenetv3_small_100", help="timm architecture (depthwise ones are "
                                                                       "where post-training INT8 hurts)")
    ap.add_argument("--student-size", type=int, default=64, help="student input side (shapes10 is 32 px)")
    ap.add_argument("--epochs", type=int, default=30, help="training epochs of each student")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--max-images", type=int, default=0, help="images per split, 0 = all (shapes10: 1,000 "
                                                               "labelled, 10,000 unlabeled, 2,000 test)")
    ap.add_argument("--ft-epochs", type=int, default=4, help="fine-tune epochs of qat and sparse24")
    ap.add_argument("--ft-lr", type=float, nargs="+", default=[1e-3, 3e-4],
                    help="fine-tune learning rates of qat and sparse24 (each measured)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--work", default="runs/compress-bench")
    ap.add_argument("--cache-dir", default=os.environ.get("CLIPDISTILL_CACHE",
                                                          os.path.expanduser("~/.cache/clipdistill")))
    ap.add_argument("--out", default=str(Path(__file__).with_name("compress_students")))
    ap.add_argument("--report", action="store_true", help="only print the table again from OUT.json")
    args = ap.parse_args()
    from clipdistill.core.logs import setup
    from clipdistill.deploy.compress import CompressConfig, compress
    from clipdistill.distill.config import TrainConfig
    from clipdistill.distill.train import train

    setup(0)
    t0 = time.time()
    raw: dict = {"args": vars(args), "seeds": []}
    if args.report:
        raw = json.loads(Path(args.out + ".json").read_text())
        args = argparse.Namespace(**{**raw["args"], "out": args.out})
    for seed in range(len(raw["seeds"]), args.seeds):
        run = Path(args.work) / f"{args.student}-{args.student_size}px-kl-linear-{args.max_images}-seed{seed}"
        res = train(TrainConfig(method="kl", head="linear", data=["train", "unlabeled"], student=args.student,
                                student_size=args.student_size, epochs=args.epochs, max_images=args.max_images,
                                lr=args.lr, seed=seed, cache_dir=args.cache_dir, out=str(run), progress=False))
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

    def row(form: str, acc: list, control: Optional[list] = None) -> dict:
        return {"form": form, "test accuracy": mean_sd(acc),
                "vs the trained student": mean_sd([a - r for a, r in zip(acc, dense)]) if acc is not dense else "-",
                "vs its control": mean_sd([a - r for a, r in zip(acc, control)]) if control else "-"}

    rows = [row("dense fp32 (the trained student)", dense),
            row("INT8 PTQ (Q/DQ, TensorRT form), ONNX Runtime", [p["ptq"]["onnx_accuracy"] for p in s])]
    for lr in args.ft_lr:
        q, sp = [p[f"qat@{lr:g}"] for p in s], [p[f"sparse24@{lr:g}"] for p in s]
        control = [r["control_fp32_accuracy"] for r in q]
        rows += [row(f"dense fine-tune, {args.ft_epochs} epochs at lr {lr:g} (control)", control),
                 row(f"INT8 QAT, {args.ft_epochs} epochs at lr {lr:g}, ONNX Runtime",
                     [r["onnx_accuracy"] for r in q], control),
                 row(f"2:4 sparse + fine-tune, {args.ft_epochs} epochs at lr {lr:g}, ONNX Runtime",
                     [r["onnx_accuracy"] for r in sp], control)]
    sp = s[0][f"sparse24@{args.ft_lr[0]:g}"]
    raw.setdefault("seconds", round(time.time() - t0))
    n = f"the first {args.max_images} images of each split" if args.max_images else "all images"
    md = (f"{args.student} at {args.student_size} px on shapes10 (`clipdistill train`'s recipe: kl on the probe, "
          f"train + unlabeled, {args.epochs} epochs at lr {args.lr:g}, {n}; test: "
          f"{min(args.max_images or 2000, 2000)} images), mean ± std over {args.seeds} seeds (each seed: its own "
          f"student, its own fine-tunes)\n\n"
          + table(rows, ["form", "test accuracy", "vs the trained student", "vs its control"])
          + f"\n\n2:4: {sp['sparsity']['layers_2to4']} of {sp['sparsity']['eligible_layers']} eligible layers pruned "
            f"(in PyTorch), {sp['onnx_initializers_2to4']} weight tensors with the pattern in the ONNX file. "
            f"Took {raw['seconds']:.0f} s.")
    print(md)
    Path(args.out + ".md").write_text(md + "\n")
    Path(args.out + ".json").write_text(json.dumps(raw, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
