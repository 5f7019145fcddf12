"""ONNX Runtime, one way for every stage: sessions (provider, threads, the file checked before
it is read) and batches run through them.

export and compress check the file they wrote, predict answers with it, bench times it: each
opens it here, so a provider that is missing, a file that is not ONNX or a model ONNX Runtime
cannot load reads the same everywhere. Runs on the device, like predict: numpy and ONNX
Runtime only (imported when a session is made)."""

from __future__ import annotations

import logging
import os
from typing import Optional

import numpy as np

from ..core.errors import ConfigError
from ..core.metrics import accuracy
from .model_file import check_onnx_file

log = logging.getLogger(__name__)

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


def session(path: str | os.PathLike | bytes, threads: int = 0, provider: str = "cpu",
            options: Optional[dict] = None):
    """An ONNX Runtime session on one provider (CPU is always added as the fallback); `auto` is
    CUDA when this onnxruntime has it, else CPU. `options`: that provider's own options
    (TensorRT's precision flags, say)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if provider == "auto":
        provider = "cuda" if PROVIDERS["cuda"] in ort.get_available_providers() else "cpu"
    name = PROVIDERS[provider]
    if name not in ort.get_available_providers():
        raise ConfigError(f"--provider {provider}: onnxruntime {ort.__version__} here has no {name} "
                          f"(available: {', '.join(ort.get_available_providers())}); install onnxruntime-gpu "
                          f"or use --provider cpu")
    fallback = ["CPUExecutionProvider"] if name != "CPUExecutionProvider" else []
    providers = [name] + fallback if options is None else [(name, options)] + [(f, {}) for f in fallback]
    if not isinstance(path, bytes):
        check_onnx_file(path)
    try:
        return ort.InferenceSession(path if isinstance(path, bytes) else str(path), so, providers=providers)
    except Exception as e:  # onnxruntime raises its own types (InvalidProtobuf, Fail, ...) for unreadable models
        raise ConfigError(f"--model {path if not isinstance(path, bytes) else '(in memory)'}: ONNX Runtime cannot "
                          f"load it ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); give an "
                          f"ONNX file written by `clipdistill export`") from None


def run_batches(sess, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """The model's first output for every row of `x`, `batch_size` rows per call."""
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + batch_size]})[0] for i in range(0, len(x), batch_size)])


def onnx_accuracy(sess, x: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """(top-1 accuracy in percent over labelled rows, NaN without any; predictions)."""
    pred = run_batches(sess, x, 64).argmax(1)
    return accuracy(pred, labels), pred
