"""Device and precision, each resolved in one place, so no module hard-codes a CUDA
device or decides on its own what `auto` means.

Precision names are the same everywhere (flags, checkpoints, manifests, reports):
`fp32`, `bf16`, `fp16`. `auto` resolves by device and role:

| device | teacher (inference, embeddings cached) | student (training, autocast) |
|---|---|---|
| CUDA | fp16 (tensor cores; 3 more mantissa bits than bf16) | bf16 where supported (no loss scaling), else fp16 |
| CPU with native bf16 (AVX512-BF16, AMX) | bf16 if its embeddings stay within cosine 0.999 of fp32, else fp32 | bf16 |
| other CPUs, MPS | fp32 | fp32 |

On a CPU with native bf16 the ViT-B-32 teacher embeds several times faster in bf16 than in
fp32, with embeddings far inside that cosine bound: `benchmarks/bench_embed.md` holds the
figures (`benchmarks/bench_embed.py` measures them)."""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

from .errors import ConfigError

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ROLES = ("teacher", "student")


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"--device {name!r} is not a device ({e}); use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine; use --device cpu or auto")
    return dev


def dtype_of(precision: str) -> torch.dtype:
    try:
        return _DTYPES[precision]
    except KeyError:
        raise ConfigError(f"precision {precision!r}; valid: auto, {', '.join(PRECISIONS)}") from None


def precision_of(dtype: torch.dtype) -> str:
    return {v: k for k, v in _DTYPES.items()}[dtype]


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls and convolutions run natively (oneDNN), not emulated."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(requested: str, device: torch.device, role: str,
                      verify: Optional[Callable[[str], bool]] = None) -> str:
    """The precision `requested` ("auto" or a name) means for `role` on `device`.

    `verify(candidate)` is asked before `auto` picks a reduced precision on a CPU (the
    teacher's cosine check); when it says no, auto falls back to fp32."""
    if role not in ROLES:
        raise ValueError(f"role {role!r}; valid: {ROLES}")
    if requested != "auto":
        dtype_of(requested)
        return requested
    if device.type == "cuda":
        if role == "teacher":
            return "fp16"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu" and cpu_has_native_bf16():
        if verify is None or verify("bf16"):
            return "bf16"
        log.info("precision auto: bf16 failed the accuracy check on this %s; using fp32", role)
    return "fp32"
