"""Embedding speed: clipdistill's cache vs the study's reference loop, same machine, one run.

The reference loop is the study's: batch 1, no `no_grad`, one `.pt` file per image.
Ours: `fill_cache` (batched, `inference_mode`, one float16 memmap + manifest), fp32 and bf16.
Teacher: ViT-B-32 with random weights (same compute as laion2b's); images: 96 px shapes10,
resized to 224 by the teacher's own preprocess, like STL10.

    python benchmarks/bench_embed.py [--n 96]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from _common import random_vit_teacher, shapes_images, table, timed  # noqa: E402


def _images(arr):
    """The benchmark's images as a clipdistill dataset (data.protocol)."""
    import numpy as np

    from clipdistill.data.protocol import InMemoryDataset

    class Images(InMemoryDataset):
        name, split = "bench", "bench"

        def __init__(self):
            self.data, self.targets = arr, np.full(len(arr), -1, dtype=np.int64)
            self.classes, self.prompts = [], []

        def fingerprint(self):
            return {"name": "bench", "n": len(self.data)}

        def slug(self):
            return "bench"

    return Images()


def reference_loop(teacher, images, out: Path) -> None:
    for i, arr in enumerate(images):  # the study: one image at a time, autograd on, one file each
        x = teacher.preprocess(Image.fromarray(arr)).unsqueeze(0).to(teacher.dtype)
        emb = teacher.model.encode_image(x)
        torch.save(emb, out / f"{i}.pt")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=96, help="images")
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    from clipdistill.teacher.embed import fill_cache

    images = shapes_images(args.n)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t32 = random_vit_teacher("fp32")
        ref_s, _ = timed(reference_loop, t32, images, Path(tmp))
        rows.append({"method": "study loop (bs 1, autograd, .pt per image)", "precision": "fp32",
                     "img/s": f"{args.n / ref_s:.1f}", "speed-up": "1.00x"})
        ref = torch.stack([torch.load(Path(tmp) / f"{i}.pt")[0] for i in range(args.n)]).float()
        for precision in ("fp32", "bf16"):
            teacher = t32 if precision == "fp32" else random_vit_teacher("bf16")
            if precision == "bf16":
                teacher.model.load_state_dict(t32.model.state_dict())
            s, cache = timed(fill_cache, teacher, _images(images), Path(tmp) / f"cache-{precision}", args.batch, 0,
                             progress=False)
            got = torch.from_numpy(cache.embeddings[:].astype("float32"))
            cos = F.cosine_similarity(got, ref, dim=-1).min().item()
            rows.append({"method": f"clipdistill cache (bs {args.batch}, inference_mode, memmap)",
                         "precision": precision, "img/s": f"{args.n / s:.1f}", "speed-up": f"{ref_s / s:.2f}x",
                         "min cosine vs fp32": f"{cos:.5f}"})
    rows[0]["min cosine vs fp32"] = "1.00000"
    print(f"teacher ViT-B-32 (random weights), {args.n} images 96->224 px, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(table(rows, ["method", "precision", "img/s", "speed-up", "min cosine vs fp32"]))


if __name__ == "__main__":
    main()
