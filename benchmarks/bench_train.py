"""Student training throughput: clipdistill's step vs the study's loop, same machine, one run.

Study loop: fp32, Adam, batch 64, a Dataset that `torch.load`s one embedding `.pt` per
sample and applies `ToTensor()` + `Normalize` per PIL image, a DataLoader collating them.
clipdistill: batches gathered from the uint8 array and the embedding memmap, normalised in one
vectorised op, bf16 autocast + channels-last where the CPU has bf16 (the trainer's `--amp auto`).
Both train resnet18 with KL on a linear head at the study's 96 px.

    python benchmarks/bench_train.py [--steps 8] [--size 96]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from _common import shapes_images, table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=96)
    args = ap.parse_args()
    import timm
    from torchvision import transforms

    from clipdistill.core.device import dtype_of, resolve_precision
    from clipdistill.data.pixels import normalize, to_float
    from clipdistill.distill.augment import identity_views, render
    from clipdistill.distill.methods import kl_distillation
    from clipdistill.teacher.cache import EmbeddingCache

    n = args.batch * (args.steps + 2)
    images = shapes_images(n, args.size)
    emb = np.random.default_rng(0).standard_normal((n, 512)).astype(np.float32)
    probe = torch.nn.Linear(512, 10)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for i in range(n):
            torch.save(torch.from_numpy(emb[i]), tmp / f"{i}.pt")

        class StudyDataset(torch.utils.data.Dataset):
            tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(0.5, 0.25)])

            def __len__(self):
                return n

            def __getitem__(self, i):
                return self.tf(Image.fromarray(images[i])), torch.load(tmp / f"{i}.pt")

        def study() -> float:
            torch.manual_seed(0)
            model = timm.create_model("resnet18", num_classes=10)
            opt = torch.optim.Adam(model.parameters(), 3e-4)
            loader = torch.utils.data.DataLoader(StudyDataset(), batch_size=args.batch, shuffle=True)
            t0, seen = None, 0
            for step, (x, e) in enumerate(loader):
                if step == 2:
                    t0, seen = time.perf_counter(), 0
                with torch.no_grad():
                    target = probe(e)
                loss = F.kl_div(F.log_softmax(model(x), -1), F.log_softmax(target, -1), reduction="mean",
                                log_target=True)
                opt.zero_grad()
                loss.backward()
                opt.step()
                seen += len(x)
            return seen / (time.perf_counter() - t0)

        cache = EmbeddingCache.open(tmp / "cache", {"model": "bench"}, {"name": "bench"}, n, 512)
        cache.write(0, emb, np.ones(n, np.uint8))
        cache.commit(n)
        cache = EmbeddingCache.load(tmp / "cache")
        resolved = resolve_precision("auto", torch.device("cpu"), "student")
        amp = None if resolved == "fp32" else dtype_of(resolved)

        def ours(amp_dtype, channels_last: bool) -> float:
            torch.manual_seed(0)
            model = timm.create_model("resnet18", num_classes=10)
            if channels_last:
                model = model.to(memory_format=torch.channels_last)
            opt = torch.optim.Adam(model.parameters(), 3e-4)
            perm = np.random.default_rng(0).permutation(n)
            t0, seen = None, 0
            for step in range(n // args.batch):
                if step == 2:
                    t0, seen = time.perf_counter(), 0
                idx = np.sort(perm[step * args.batch:(step + 1) * args.batch])
                # the trainer's input for plain views (RunContext.student_pixels)
                x = normalize(render(to_float(torch.from_numpy(images[idx])), identity_views(len(idx)), args.size),
                              0.5, 0.25)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                e = torch.from_numpy(np.asarray(cache.embeddings[idx], dtype=np.float32))
                with torch.autocast("cpu", dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    out = model(x)
                with torch.no_grad():
                    target = probe(e)
                loss = kl_distillation(out.float(), target, 1.0)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                seen += len(idx)
            return seen / (time.perf_counter() - t0)

        base = study()
        rows.append({"loop": "study (fp32, per-file .pt, per-sample transforms)", "img/s": f"{base:.1f}",
                     "speed-up": "1.00x"})
        fp32 = ours(None, False)
        rows.append({"loop": "clipdistill, fp32", "img/s": f"{fp32:.1f}", "speed-up": f"{fp32 / base:.2f}x"})
        if amp is not None:
            fast = ours(amp, True)
            rows.append({"loop": "clipdistill, bf16 autocast + channels-last (--amp auto)", "img/s": f"{fast:.1f}",
                         "speed-up": f"{fast / base:.2f}x"})
    print(f"resnet18, batch {args.batch}, {args.size} px, {args.steps} timed steps, {torch.get_num_threads()} threads")
    print(table(rows, ["loop", "img/s", "speed-up"]))


if __name__ == "__main__":
    main()
