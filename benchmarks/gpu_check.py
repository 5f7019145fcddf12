"""The GPU paths, measured in one prepared run (`benchmarks/gpu_check.sh`, at most 5 minutes).

No GPU machine here has TensorRT or network access, so the figures come from PyTorch on the
card, with random teacher weights (ViT-B-32's compute, not its accuracy) and synthetic images
of STL10's shape:

1. student training throughput, clipdistill's loop (AMP, channels-last, batches gathered from
   uint8 arrays on the device) vs the study's loop (fp32, one image tensor per sample collated
   by a DataLoader), same student, same batch;
2. ViT-B-32 embedding throughput, clipdistill's (fp16, batched on the device) vs the study's
   (fp32, batch 1 per image as its embed script did);
3. the input path of a real `clipdistill train` run: resnet18 at 96 px over a tar-shard pool read
   from the pixel store (uint8 batches gathered ahead in a thread, pinned, copied
   asynchronously; resize, augmentation and normalisation on the device), images/s per GPU;
   and a one-GPU NCCL `torchrun` smoke run of `clipdistill train` (printed by the shell script);
4. the teacher-vs-student inference table at 224 px, batch 8 and a large batch, fp16 eager and
   `torch.compile`, with the ratios beside the study's 4.2x throughput / 3.45x memory (which
   were TensorRT FP16 on a Jetson Orin Nano: other backends, other hardware).

`--dry-run` runs every part on the CPU at toy sizes: it proves the script, not the figures.

    python benchmarks/gpu_check.py [--dry-run] [--out gpu_check.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import random_vit_teacher, table  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def rate(fn, n_items: int, device: torch.device, warmup: int = 2, reps: int = 5) -> float:
    """Items per second of `fn` after warm-up (synchronised on CUDA)."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return n_items * reps / (time.perf_counter() - t0)


def peak_mb(fn, device: torch.device) -> float:
    if device.type != "cuda":
        return float("nan")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def cpu_half():
    """The reduced precision a CPU runs natively (bf16 with AVX512-BF16/AMX), else fp32: the dry
    run checks the script, and emulated bf16 would only make it slow."""
    from clipdistill.core.device import cpu_has_native_bf16

    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def student_training(device, size: int, batch: int, steps: int) -> list[dict]:
    from clipdistill.data.pixels import normalize, to_float
    from clipdistill.distill.students import create_student

    rows = []
    images = torch.randint(0, 255, (batch * steps, size, size, 3), dtype=torch.uint8)
    for name, amp, channels_last, study in (("study loop (fp32, per-sample tensors, DataLoader)", None, False, True),
                                            ("clipdistill loop (AMP, channels-last, device batches)",
                                             torch.float16 if device.type == "cuda" else cpu_half(), True, False)):
        torch.manual_seed(0)
        model = create_student("resnet18", 10).to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.Adam(model.parameters(), 3e-4)
        scaler = torch.amp.GradScaler(device.type, enabled=amp is torch.float16)
        dev_images = images.to(device)
        loader = None
        if study:
            samples = [((images[i].permute(2, 0, 1).float() / 255 - 0.5) / 0.25, 0) for i in range(len(images))]
            loader = torch.utils.data.DataLoader(samples, batch_size=batch, shuffle=True)

        # the loop's values bound as defaults: `rate` calls it within this iteration
        def epoch(study=study, loader=loader, model=model, opt=opt, scaler=scaler, dev_images=dev_images,
                  amp=amp) -> None:
            if study:
                for x, y in loader:
                    x, y = x.to(device), y.to(device)
                    loss = torch.nn.functional.cross_entropy(model(x), y)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                return
            for i in range(steps):
                x = normalize(to_float(dev_images[i * batch:(i + 1) * batch]), 0.5, 0.25)
                x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=amp, enabled=amp is not torch.float32):
                    loss = torch.nn.functional.cross_entropy(model(x), torch.zeros(batch, dtype=torch.long,
                                                                                  device=device))
                opt.zero_grad()
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()

        rows.append({"what": "student training, resnet18 " + name, "size": size, "batch": batch,
                     "img_per_s": round(rate(epoch, len(images), device, warmup=1, reps=2), 1)})
    return rows


def teacher_embedding(device, n: int, study_batch: int = 1) -> list[dict]:
    rows = []
    for name, precision, batch in (("study (fp32, one image per call)", "fp32", study_batch),
                                   ("clipdistill (fp16 on CUDA / bf16 on CPU, batched)",
                                    "fp16" if device.type == "cuda" else
                                    ("bf16" if cpu_half() is torch.bfloat16 else "fp32"), min(256, n))):
        t = random_vit_teacher("fp32" if precision == "fp32" else "bf16")
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        model = t.model.to(device=device, dtype=dtype).eval()
        x = torch.randn(n, 3, 224, 224, device=device, dtype=dtype)

        @torch.inference_mode()
        def run(model=model, x=x, batch=batch) -> None:
            for i in range(0, n, batch):
                model.encode_image(x[i:i + batch])

        rows.append({"what": "ViT-B-32 embedding, " + name, "size": 224, "batch": batch,
                     "img_per_s": round(rate(run, n, device, warmup=1, reps=2), 1)})
    return rows


def input_path(device, images: int, size: int, batch: int, student: str, work: Path) -> list[dict]:
    """A real training run fed the way large pools are: tar shards -> pixel store on disk ->
    batches gathered ahead and pinned -> device. Its caches are filled first (not timed); the
    figure is the last epoch's images/s from the run's metrics."""
    from clipdistill.data.example_pool import PoolConfig, make_pool
    from clipdistill.distill.config import TrainConfig
    from clipdistill.distill.train import train
    from clipdistill.teacher.tiny import save_random_tiny_teacher

    made = make_pool(PoolConfig(out=str(work / "pool"), images=images, size=size, duplicates=0, broken=0,
                                test_per_class=5, shards=4))
    out = work / "run"
    train(TrainConfig(dataset="folder", data_root=made["eval"], pool=[made["pool"]], prompts=made["prompts"],
                      data=["unlabeled"], head="text", method="cosine", student=student, student_size=size,
                      epochs=2, batch_size=batch, warmup_epochs=0.0, teaching="cached", pick="last",
                      pretrained=str(save_random_tiny_teacher(work / "tiny-random.safetensors", seed=0)),
                      cache_dir=str(work / "cache"), out=str(out),
                      device=device.type, progress=False))
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "train_loss" in line]
    return [{"what": f"student training, {student}, clipdistill train over a tar-shard pool (pixel store, "
                     f"pinned prefetch, device augmentation)", "size": size, "batch": batch,
             "img_per_s": round(epochs[-1]["img_per_s"], 1)}]


def inference_table(device, batches: list[int], compile_too: bool) -> list[dict]:
    from clipdistill.distill.students import create_student

    dtype = torch.float16 if device.type == "cuda" else cpu_half()
    teacher = random_vit_teacher("fp32").model.visual.to(device=device, dtype=dtype).eval()
    student = create_student("resnet18", 10).to(device=device, dtype=dtype).eval()
    student = student.to(memory_format=torch.channels_last)
    rows = []
    for b in batches:
        x = torch.randn(b, 3, 224, 224, device=device, dtype=dtype)
        for mode in (["eager", "compile"] if compile_too else ["eager"]):
            res = {}
            for role, m in (("teacher", teacher), ("student", student)):
                fn_model = torch.compile(m) if mode == "compile" else m
                xi = x.contiguous(memory_format=torch.channels_last) if role == "student" else x

                @torch.inference_mode()
                def run(fn_model=fn_model, xi=xi) -> None:
                    fn_model(xi)

                quick = device.type == "cpu"  # the dry run: one timed call proves the path
                res[role] = (rate(run, b, device, warmup=1 if quick else 3, reps=1 if quick else 10),
                             peak_mb(run, device))
            rows.append({"what": f"inference {mode} {str(dtype).split('.')[-1]}", "batch": b,
                         "teacher_img_s": round(res["teacher"][0], 1), "student_img_s": round(res["student"][0], 1),
                         "throughput_ratio": round(res["student"][0] / res["teacher"][0], 2),
                         "teacher_mb": round(res["teacher"][1], 1), "student_mb": round(res["student"][1], 1),
                         "memory_ratio": round(res["teacher"][1] / res["student"][1], 2)
                         if res["student"][1] == res["student"][1] and res["student"][1] > 0 else None})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, toy sizes: checks the script, not the figures")
    ap.add_argument("--out", default="gpu_check.json")
    args = ap.parse_args()
    if args.dry_run:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, torch.get_num_threads()))
        train = student_training(device, 32, 16, 2)
        train += input_path(device, 96, 32, 32, "resnet10t", Path(args.out).parent / "input-path")
        embed = teacher_embedding(device, 4)
        infer = inference_table(device, [2], compile_too=False)
    else:
        if not torch.cuda.is_available():
            sys.exit("gpu_check: no CUDA device here; use --dry-run on a CPU")
        device = torch.device("cuda")
        train = student_training(device, 96, 64, 40)
        train += input_path(device, 6000, 96, 256, "resnet18", Path(args.out).parent / "input-path")
        embed = teacher_embedding(device, 512, study_batch=1)
        infer = inference_table(device, [8, 256], compile_too=True)
    card = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU (dry run)"
    head = f"# gpu_check on {card}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}\n"
    print(head)
    print(table(train + embed, ["what", "size", "batch", "img_per_s"]))
    print()
    print(table(infer, ["what", "batch", "teacher_img_s", "student_img_s", "throughput_ratio", "teacher_mb",
                        "student_mb", "memory_ratio"]))
    print("\nThe study (TensorRT FP16, Jetson Orin Nano): student/teacher throughput 4.2x, memory 3.45x less; "
          "these rows are PyTorch on another card: compare the ratios, not the numbers.")
    Path(args.out).write_text(json.dumps({"device": card, "torch": torch.__version__, "training_and_embedding":
                                          train + embed, "inference": infer}, indent=1) + "\n")


if __name__ == "__main__":
    main()
