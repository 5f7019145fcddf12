"""Helpers shared by the benchmark scripts (not a test: these print tables)."""

from __future__ import annotations

import platform
import time
from pathlib import Path

import numpy as np


def shapes_images(n: int, size: int = 96, seed: int = 0) -> np.ndarray:
    """STL10-sized images from the offline world (uint8 N x H x W x 3)."""
    from clipdistill.data.shapes10 import generate

    return generate("test", n, size, seed)[0]


def random_vit_teacher(precision: str = "fp32"):
    """The study's teacher architecture (ViT-B-32) with random weights: the same compute
    and memory as the real one, which cannot be downloaded here."""
    import open_clip
    import torch

    from clipdistill.teacher.openclip_teacher import ResolvedWeights, Teacher

    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    model = model.eval().to(dtype=dtype)
    w = ResolvedWeights(None, "random", "ViT-B-32-random", {})
    return Teacher("ViT-B-32", model, preprocess, open_clip.get_tokenizer("ViT-B-32"), w, torch.device("cpu"), dtype)


def timed(fn, *args, **kw) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return time.perf_counter() - t0, out


def table(rows: list[dict], cols: list[str]) -> str:
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in cols]
    line = "| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(str(r[c]).ljust(w) for c, w in zip(cols, widths)) + " |" for r in rows]
    return "\n".join([line, sep, *body])


def machine_kind() -> str:
    """This project's two kinds of 2-core machine differ in native bf16 (the teacher's precision)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    return f"{platform.machine()} ({'AVX512-BF16' if 'avx512_bf16' in flags else 'AVX2, no native bf16'})"
