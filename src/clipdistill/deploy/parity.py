"""Does the ONNX file compute what PyTorch computes? Both run the same real images, and past the
tolerance nothing is written (`check_parity`, raising ParityError); the images are the run's own
test images, or rendered shapes10 ones when the run's data is not on this machine
(`parity_inputs`).

What "the same" means is relative: the tolerance scales with the output's size, and a quantized
graph may also differ by PyTorch's own spread under another summation order (the `envelope`
compress measures)."""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np

from ..core.errors import ClipDistillError, ConfigError, MissingResourceError
from ..core.metrics import agreement
from .inputs import prepare
from .run_images import shapes10_test, split_images

log = logging.getLogger(__name__)


class ParityError(ClipDistillError):
    """ONNX Runtime does not compute what PyTorch computes."""


def check_parity(reference: np.ndarray, got: np.ndarray, tolerance: float, what: str = "",
                 envelope: float = 0.0) -> dict:
    """Raise ParityError when ONNX Runtime's output is not PyTorch's (NaN included). `envelope`:
    how far PyTorch's own output moves under another summation order (quantized graphs, see
    compress.rounding_envelope), allowed on top of the tolerance."""
    diff = float(np.max(np.abs(reference.astype(np.float64) - got.astype(np.float64))))
    scale = max(1.0, float(np.max(np.abs(reference))))
    allowed = tolerance * scale + envelope
    info = {"max_abs_diff": diff, "tolerance": tolerance * scale, "images": int(len(reference)),
            "top1_agreement": agreement(reference.argmax(1), got.argmax(1)) if reference.ndim == 2 else None}
    if envelope:
        info["rounding_envelope"] = envelope
    if not diff <= allowed:
        more = f" + {envelope:.3g}, PyTorch's own spread under another summation order" if envelope else ""
        raise ParityError(f"ONNX Runtime and PyTorch differ by up to {diff:.3g} on {len(reference)} images{what} "
                          f"(allowed: {allowed:.3g} = --tolerance {tolerance} x max(1, max |output| "
                          f"{scale:.3g}){more}); nothing was written. Try the other --exporter (torchscript, dynamo) "
                          f"or another --opset.")
    return info


def parity_inputs(loaded, run_cfg: Optional[dict], n: int, cache_dir: str) -> tuple[np.ndarray, str]:
    """`n` real test images, prepared as the model (a deployable.Loaded) expects, and where they
    came from."""
    images, where = None, ""
    if run_cfg is not None:
        try:
            test, _ = split_images(run_cfg, "test", cache_dir, loaded.info.get("trained_size"))
            images, where = test[:n], f"{run_cfg['dataset']} test"
        except (MissingResourceError, ConfigError, OSError) as e:
            log.warning("warning: the run's test images are not available here (%s); checking parity on shapes10 "
                        "images", e)
    if images is None:
        images, where = shapes10_test(n, 96), "shapes10 test (rendered)"
    return prepare(images, loaded.info["input"]), where
