"""INT8 post-training quantization with ONNX Runtime's static quantizer.

Weights are int8, symmetric, one scale per output channel; activations are quantized
with ranges calibrated on the student's own training images, written as QDQ
(QuantizeLinear/DequantizeLinear pairs around each quantized op) so that any runtime can
read it. Which activation form is fast depends on the runtime, hence one target each:

- `cpu`: uint8 asymmetric activations + int8 weights (U8S8), ONNX Runtime's fast path on
  x86 and ARM CPUs: resnet18 at 224 px runs several times faster than in fp32. TensorRT's ONNX
  parser refuses it (uint8 Q/DQ, non-zero zero points, INT32 bias DequantizeLinear).
- `tensorrt`: TensorRT's ONNX parser form (deploy/tensorrt.py checks it, `qdq_problems`):
  symmetric int8 activations and per-channel int8 weights, every zero point present and 0; no
  INT32 bias DequantizeLinear (TensorRT dequantizes INT8/FP8/INT4 only: `QuantizeBias` off, the
  float bias stays with the Conv/Gemm); no Q/DQ on the outputs of Conv/Gemm/MatMul, so a Relu
  after a Conv is fused by TensorRT (no Q/DQ pair between them) and the graph's output is
  produced by a float op, not a DequantizeLinear. ONNX Runtime on a CPU runs it at about fp32
  speed, a third of the `cpu` form's.

What each target passes to ONNX Runtime's quantizer is data (`Int8Target.extra_options`), so a
target is one registry entry.

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

from ..core.errors import ClipDistillError
from ..core.registry import Registry


@dataclasses.dataclass(frozen=True)
class Int8Target:
    name: str
    activations: str  # "uint8" or "int8"
    symmetric_activations: bool
    note: str
    runtime: str  # the runtime the form is for, in words (bench, the bundle)
    # onnxruntime.quantization quantize_static `extra_options` beyond the symmetric flags
    extra_options: dict = dataclasses.field(default_factory=dict)
    # drop opset imports no node uses (ONNX Runtime's pre-processing adds its own domains)
    drop_unused_domains: bool = False
    # the file must pass TensorRT's Q/DQ rules (deploy/tensorrt.py qdq_problems) or is refused
    for_tensorrt: bool = False


TARGETS: Registry[Int8Target] = Registry("INT8 target", flag="--int8-target")
TARGETS.add("cpu", Int8Target("cpu", "uint8", False,
                              "uint8 asymmetric activations, int8 per-channel weights (U8S8): ONNX Runtime's fast "
                              "CPU path", "ONNX Runtime on a CPU"))
TARGETS.add("tensorrt", Int8Target(
    "tensorrt", "int8", True,
    "symmetric int8 activations, int8 per-channel weights (S8S8), zero points 0, no INT32 bias and no Q/DQ on "
    "Conv/Gemm/MatMul outputs: TensorRT's ONNX parser form; about fp32 speed in ONNX Runtime on a CPU",
    "TensorRT (explicit quantization)",
    # QuantizeBias: TensorRT's DequantizeLinear takes INT8 (8.x; INT8/FP8/INT4 in 10.x), never the
    # INT32 bias ONNX Runtime writes by default (onnx-tensorrt docs/operators.md). Excluding the
    # outputs of weighted ops: TensorRT fuses Conv+Relu only without a Q/DQ pair between them (its
    # explicit-quantization guide, Q/DQ placement), and the graph output stays float.
    {"QuantizeBias": False, "OpTypesToExcludeOutputQuantization": ["Conv", "Gemm", "MatMul"]},
    drop_unused_domains=True, for_tensorrt=True))

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
                  method: str = "minmax", input_name: str = "input", batch_size: int = 16,
                  overrides: dict | None = None) -> dict:
    """Quantize the fp32 ONNX model `src` into `dst`; `calibration` is float32 (N, 3, S, S),
    already normalised as the model expects. `overrides` replace entries of the target's
    `extra_options` (tests build the old forms with it). Returns what was done, for the sidecar."""
    from onnxruntime import __version__ as ort_version
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    spec = TARGETS.get(target)
    cal_method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                  "percentile": CalibrationMethod.Percentile}[method]
    extra = {"ActivationSymmetric": spec.symmetric_activations, "WeightSymmetric": True, **spec.extra_options,
             **(overrides or {})}
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
            extra_options=extra)
        if spec.drop_unused_domains:
            _drop_unused_domains(dst)
    checked = {}
    if spec.for_tensorrt and not overrides:
        from .tensorrt import qdq_problems

        problems = qdq_problems(dst)
        if problems:
            raise ClipDistillError(f"the {spec.name} INT8 file breaks TensorRT's Q/DQ rules ({len(problems)} "
                                   f"problems; first: {problems[0]})")
        checked = {"tensorrt_qdq_check": "passed (deploy/tensorrt.py qdq_problems)"}
    return {"format": "QDQ", "target": spec.name, "note": spec.note, "runtime": spec.runtime,
            "extra_options": extra, "weights": "int8 symmetric per-channel",
            "activations": f"{spec.activations} {'symmetric' if spec.symmetric_activations else 'asymmetric'} "
                           f"per-tensor", "calibration": {"method": method, "images": int(len(calibration))},
            "preprocessed": preprocessed, "tool": f"onnxruntime.quantization {ort_version}",
            "seconds": round(time.time() - t0, 2), **checked}


def _drop_unused_domains(path: str | os.PathLike) -> None:
    """Remove the opset imports of domains no node uses (ONNX Runtime's pre-processing declares
    com.microsoft, ai.onnx.ml, ... whether or not it used them): a parser that knows only the
    standard domain then has nothing foreign to read."""
    import onnx

    model = onnx.load(str(path))
    used = {n.domain or "" for n in model.graph.node}
    keep = [o for o in model.opset_import if (o.domain or "") in used or o.domain in ("", "ai.onnx")]
    if len(keep) != len(model.opset_import):
        del model.opset_import[:]
        model.opset_import.extend(keep)
        onnx.save(model, str(path))
