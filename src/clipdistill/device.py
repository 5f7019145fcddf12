"""Device and precision resolution in one place, so no module hard-codes a CUDA device."""

from __future__ import annotations

import torch

from .errors import ConfigError


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


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """`auto` is fp16 on CUDA (tensor cores) and fp32 elsewhere; CPU users opt into bf16."""
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    try:
        return _DTYPES[precision]
    except KeyError:
        raise ConfigError(f"--precision {precision!r}; valid: auto, {', '.join(_DTYPES)}") from None
