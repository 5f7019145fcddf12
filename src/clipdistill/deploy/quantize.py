"""INT8 post-training quantization with ONNX Runtime's static quantizer.

Weights are int8, symmetric, one scale per output channel; activations are quantized
with ranges calibrated on the student's own training images, written as QDQ
(QuantizeLinear/DequantizeLinear pairs around each quantized op) so that any runtime can
read it. Which activation form is fast depends on the runtime, hence one target each:

- `cpu`: uint8 asymmetric activations + int8 weights (U8S8), ONNX Runtime's fast path on
  x86 and ARM CPUs: resnet18 at 224 px runs several times faster than in fp32.
- `tensorrt`: symmetric int8 activations + int8 weights (S8S8), the only form TensorRT
  takes for explicit (QDQ) quantization; ONNX Runtime on a CPU runs it at about fp32 speed,
  a third of the `cpu` form's.

The figures measured on the project's machine are in benchmarks/teacher_vs_student.md.

Quantization-aware training and 2:4 sparsity (NVIDIA ModelOpt, torchao) are not here:
neither package is installed on the project's machines, so nothing of them is shipped
untested."""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from ..core.registry import Registry


@dataclasses.dataclass(frozen=True)
class Int8Target:
    name: str
    activations: str  # "uint8" or "int8"
    symmetric_activations: bool
    note: str


TARGETS: Registry[Int8Target] = Registry("INT8 target", flag="--int8-target")
TARGETS.add("cpu", Int8Target("cpu", "uint8", False,
                              "uint8 asymmetric activations, int8 per-channel weights (U8S8): ONNX Runtime's fast "
                              "CPU path"))
TARGETS.add("tensorrt", Int8Target("tensorrt", "int8", True,
                                   "symmetric int8 activations, int8 per-channel weights (S8S8): the QDQ form "
                                   "TensorRT requires; about fp32 speed in ONNX Runtime on a CPU"))

def _reader(x: np.ndarray, input_name: str, batch_size: int):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it: Iterator = iter(range(0, len(x), batch_size))

        def get_next(self):
            i = next(self._it, None)
            return None if i is None else {input_name: np.ascontiguousarray(x[i:i + batch_size], dtype=np.float32)}

        def rewind(self) -> None:
            self._it = iter(range(0, len(x), batch_size))

    return Reader()


def quantize_int8(src: str | os.PathLike, dst: str | os.PathLike, calibration: np.ndarray, target: str = "cpu",
                  method: str = "minmax", input_name: str = "input", batch_size: int = 16) -> dict:
    """Quantize the fp32 ONNX model `src` into `dst`; `calibration` is float32 (N, 3, S, S),
    already normalised as the model expects. Returns what was done, for the sidecar."""
    from onnxruntime import __version__ as ort_version
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    spec = TARGETS.get(target)
    cal_method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                  "percentile": CalibrationMethod.Percentile}[method]
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="clipdistill-int8-") as tmp:
        # Shape inference + graph optimisation first, as ONNX Runtime recommends: folded
        # nodes are quantized as one (Conv+Relu) instead of with a QDQ pair in between.
        pre = Path(tmp) / "pre.onnx"
        try:
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=False)
            preprocessed = True
        except Exception:  # noqa: BLE001 - pre-processing is an optimisation, never required
            pre, preprocessed = Path(src), False
        quantize_static(
            str(pre), str(dst), _reader(calibration, input_name, batch_size),
            quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=False,
            activation_type=QuantType.QUInt8 if spec.activations == "uint8" else QuantType.QInt8,
            weight_type=QuantType.QInt8, calibrate_method=cal_method,
            # No CalibMaxIntermediateOutputs: in onnxruntime 1.32 the MinMax calibrator drops what it
            # collected each time that count is reached (and fails when nothing is left). MinMax keeps
            # only per-batch minima and maxima anyway; entropy/percentile keep whole activations.
            extra_options={"ActivationSymmetric": spec.symmetric_activations, "WeightSymmetric": True})
    return {"format": "QDQ", "target": spec.name, "note": spec.note, "weights": "int8 symmetric per-channel",
            "activations": f"{spec.activations} {'symmetric' if spec.symmetric_activations else 'asymmetric'} "
                           f"per-tensor", "calibration": {"method": method, "images": int(len(calibration))},
            "preprocessed": preprocessed, "tool": f"onnxruntime.quantization {ort_version}",
            "seconds": round(time.time() - t0, 2)}
