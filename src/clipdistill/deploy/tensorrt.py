"""What TensorRT needs of our ONNX files, in one place: which form each file is and which runtime
it is for, a checker of the ONNX parser's Q/DQ rules, the oldest TensorRT (and JetPack) that
parses a file, and the exact `trtexec` command that builds its engine.

Nothing here runs TensorRT (these machines have none): the rules are those of TensorRT's own
ONNX parser and tools, read in their source, cited where they are used:

- [ops] onnx/onnx-tensorrt `docs/operators.md`, one branch per release (8.2-GA, 8.5-GA, 8.6-GA,
  release/10.x): the opsets each release parses, its per-op support (LayerNormalization: `N` in
  8.5-GA, `Y` in 8.6-GA), and "DequantizeLinear | INT8 | x_zero_point must be zero",
  "QuantizeLinear | FP32, FP16 | y_zero_point must be 0" (10.x: DQ INT8/FP8/INT4, same zero point).
- [qdq] onnx-tensorrt 8.5-GA `builtin_op_importers.cpp`, `QuantDequantLinearHelper`: uint8 is
  refused; "This version of TensorRT requires 3 inputs for the DequantizeLinear operator" (the zero
  point present); "TRT only supports symmetric quantization - zeroPt must be all zeros"; scales > 0;
  per-axis scales only where their count is the weight's dimension ("Activations-quantization does
  not support per-axis").
- [guide] TensorRT developer guide, explicit quantization, "Q/DQ Layer-Placement
  Recommendations": quantize the inputs of weighted ops, not their outputs; no Q/DQ between a
  Conv and its Relu (TensorRT fuses them only without); TensorRT 10: "Use explicit quantization
  with Strong Typing. Precision-control build flags are not required and should not be specified."
- [trtexec] NVIDIA/TensorRT `samples/common/sampleOptions.cpp` (release/8.2 ... 10.x):
  `--minShapes/--optShapes/--maxShapes=name:NxCxHxW`, `--saveEngine`, `--fp16`, `--int8`,
  `--stronglyTyped` (10.x), `--sparsity=disable|enable|force`.
- [jetpack] dusty-nv/jetson-containers `jetson_containers/l4t_version.py` and its TensorRT package
  config: L4T 32.x (JetPack 4.6.x) TensorRT 8.2, L4T 35 (JetPack 5.1) 8.5, L4T 36.3 (JetPack 6.0)
  8.6, L4T 36.4 (JetPack 6.1/6.2) 10.3.

The module imports numpy and the standard library at load: `onnx` is imported by the functions that
read a graph (a bundle is checked on a device without the training install)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Optional

import numpy as np

# ----------------------------------------------------------------------------- releases


@dataclasses.dataclass(frozen=True)
class Release:
    """One TensorRT release a Jetson runs, with what its ONNX parser takes."""

    tensorrt: str
    jetpack: str
    min_opset: int
    max_opset: int
    source: str  # the operators.md branch its limits are read from


# Oldest first. [ops] header of each branch: 8.2 "opset 7 to 13", 8.4/8.5/8.6 "7 to 17", 10.0 "9 to 20".
# [jetpack]: JetPack 4.6 itself shipped TensorRT 8.0 (same opsets as 8.2), 4.6.1+ 8.2; JetPack 5.0.2
# shipped 8.4 (same opsets as 8.5).
RELEASES = (
    Release("8.2", "4.6", 7, 13, "onnx-tensorrt 8.2-GA docs/operators.md"),
    Release("8.5", "5.1", 7, 17, "onnx-tensorrt 8.5-GA docs/operators.md"),
    Release("8.6", "6.0", 7, 17, "onnx-tensorrt 8.6-GA docs/operators.md"),
    Release("10.3", "6.1", 9, 20, "onnx-tensorrt release/10.x docs/operators.md"),
)

# Ops our students may emit that an older release's parser lacks: op -> the first release with it [ops].
OPS_FROM = {"LayerNormalization": "8.6"}  # 8.5-GA: N, 8.6-GA: Y (opset 17's nn.LayerNorm: ViT/ConvNeXt students)


def release(version: str) -> Release:
    for r in RELEASES:
        if r.tensorrt == version:
            return r
    raise ValueError(f"unknown TensorRT release {version!r}; known: {', '.join(r.tensorrt for r in RELEASES)}")


def _index(version: str) -> int:
    return [r.tensorrt for r in RELEASES].index(version)


# ----------------------------------------------------------------------------- forms


@dataclasses.dataclass(frozen=True)
class Form:
    """What a file is, as a runtime sees it, and how trtexec builds it."""

    name: str
    label: str  # bench's words for it
    runtime: str  # the runtime it is made for
    for_tensorrt: bool
    flags: tuple  # trtexec precision flags, TensorRT 8.x
    flags_10: tuple  # the same for TensorRT 10.x


FORMS = {f.name: f for f in (
    Form("fp32", "fp32", "any runtime (ONNX Runtime, OpenCV DNN; TensorRT builds it in fp16)", True,
         ("--fp16",), ("--fp16",)),
    Form("fp32-2:4", "fp32, 2:4 sparse weights (TensorRT's sparse tensor cores; no speed-up elsewhere)",
         "TensorRT on an Ampere or newer GPU (Jetson Orin)", True, ("--fp16", "--sparsity=enable"),
         ("--fp16", "--sparsity=enable")),
    # [trtexec]: 8.x processes Q/DQ only with --int8 (--fp16 lets the float layers run in fp16); [guide]
    # 10.x builds a Q/DQ network strongly typed, without precision flags.
    Form("int8-qdq", "QDQ INT8 (TensorRT's form; runs slower in ONNX Runtime on a CPU, see README "
                     "'Compress for TensorRT')", "TensorRT (explicit quantization)", True,
         ("--int8", "--fp16"), ("--stronglyTyped",)),
    Form("int8-cpu", "INT8 U8S8 (ONNX Runtime CPU)", "ONNX Runtime on a CPU", False, (), ()),
)}


def form_of(info: dict) -> Optional[str]:
    """The form of a file from its sidecar/metadata dict (writer.py), or None without one."""
    if not info:
        return None
    precision = str(info.get("precision", "fp32"))
    if precision == "int8":  # export --int8: the target says which form
        target = (info.get("quantization") or {}).get("target", "cpu")
        return "int8-cpu" if target == "cpu" else "int8-qdq"
    if precision == "int8-qdq":  # compress qat/ptq: Model Optimizer's Q/DQ
        return "int8-qdq"
    if "2:4" in precision:
        return "fp32-2:4"
    return "fp32"


def form_of_graph(path: str | os.PathLike) -> str:
    """The form of a file without clipdistill metadata, from its Q/DQ zero points."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    consts = _Constants(model.graph)
    types = {consts.dtype(n.input[2]) for n in model.graph.node
             if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2 and n.input[2]}
    if not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node):
        return "fp32"
    return "int8-cpu" if onnx.TensorProto.UINT8 in types else "int8-qdq"


# ----------------------------------------------------------------------------- reading a graph


class _Constants:
    """Values and dtypes of constant tensors: initializers, Constant nodes, and Identity of them."""

    def __init__(self, graph) -> None:
        self.init = {t.name: t for t in graph.initializer}
        self.const = {}
        for n in graph.node:
            if n.op_type == "Constant":
                for a in n.attribute:
                    if a.name == "value":
                        self.const[n.output[0]] = a.t
        self.alias = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity"}

    def tensor(self, name: str):
        for _ in range(16):
            if name in self.init:
                return self.init[name]
            if name in self.const:
                return self.const[name]
            if name not in self.alias:
                return None
            name = self.alias[name]
        return None

    def value(self, name: str) -> Optional[np.ndarray]:
        from onnx import numpy_helper

        t = self.tensor(name)
        return None if t is None else numpy_helper.to_array(t)

    def dtype(self, name: str) -> Optional[int]:
        t = self.tensor(name)
        return None if t is None else t.data_type

    def is_const(self, name: str) -> bool:
        return self.tensor(name) is not None


def _opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _dtype_name(code: Optional[int]) -> str:
    import onnx

    return "unknown" if code is None else onnx.TensorProto.DataType.Name(code)


# ----------------------------------------------------------------------------- the Q/DQ checker


def qdq_problems(path: str | os.PathLike, tensorrt: Optional[str] = None) -> list[str]:
    """Why TensorRT's ONNX parser (release `tensorrt`, default the newest in RELEASES) would refuse
    the Q/DQ of the file at `path`, or build it other than as its explicit-quantization guide
    intends: one line per problem, empty when it passes. The rules, from [qdq], [ops] and [guide]:

    - every QuantizeLinear/DequantizeLinear has its zero point (3 inputs), int8 (no uint8, no
      INT32: a DequantizeLinear of an INT32 bias is not a type TensorRT dequantizes), all 0;
    - every scale is a constant, finite and > 0;
    - per-axis scales only on weights (a constant input, or a QuantizeLinear of one), one per
      element of the weight's axis, axis 0 for a Conv weight; activations are per-tensor;
    - no Q/DQ produces a graph output, and none sits between a Conv and its Relu;
    - the opset is one the release parses, and every op is in the standard domain."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    rel = release(tensorrt) if tensorrt else RELEASES[-1]
    consts = _Constants(graph)
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    problems: list[str] = []

    opset = _opset(model)
    if not rel.min_opset <= opset <= rel.max_opset:
        problems.append(f"opset {opset}: TensorRT {rel.tensorrt} (JetPack {rel.jetpack}) parses opsets "
                        f"{rel.min_opset} to {rel.max_opset} ({rel.source})")
    foreign = sorted({f"{n.domain}::{n.op_type}" for n in graph.node if n.domain not in ("", "ai.onnx")})
    if foreign:
        problems.append(f"ops outside the standard ONNX domain, which TensorRT's parser has no importer for: "
                        f"{', '.join(foreign[:5])}")

    qdq = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    for n in qdq:
        where = f"{n.op_type} {n.name or n.output[0]}"
        if len(n.input) < 3 or not n.input[2]:
            problems.append(f"{where}: no zero point (TensorRT requires all 3 inputs, the zero point 0)")
        else:
            zp = consts.value(n.input[2])
            zdt = consts.dtype(n.input[2])
            if zp is None:
                problems.append(f"{where}: its zero point is not a constant")
            else:
                if zdt != onnx.TensorProto.INT8:
                    problems.append(f"{where}: {_dtype_name(zdt)} quantization; TensorRT takes int8 only"
                                    + (" (an INT32 bias DequantizeLinear: quantize without QuantizeBias)"
                                       if zdt == onnx.TensorProto.INT32 else ""))
                if np.any(zp != 0):
                    problems.append(f"{where}: zero point not all 0 (TensorRT quantizes symmetrically only)")
        if n.op_type == "DequantizeLinear":
            xdt = consts.dtype(n.input[0])
            if xdt is not None and xdt != onnx.TensorProto.INT8:
                problems.append(f"{where}: dequantizes a {_dtype_name(xdt)} constant; TensorRT dequantizes int8 only")
        scale = consts.value(n.input[1]) if len(n.input) > 1 else None
        if scale is None:
            problems.append(f"{where}: its scale is not a constant")
            continue
        if not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
            problems.append(f"{where}: a scale that is not finite and > 0")
        if scale.size > 1:
            problems += _per_axis_problems(n, where, scale, consts, producer, consumers)

    outputs = {o.name for o in graph.output}
    for name in outputs:
        p = producer.get(name)
        if p is not None and p.op_type in ("QuantizeLinear", "DequantizeLinear"):
            problems.append(f"graph output {name!r} is produced by {p.op_type}: TensorRT's form has no Q/DQ on the "
                            f"output (quantize without the outputs of Conv/Gemm/MatMul)")
    for n in qdq:
        if n.op_type != "QuantizeLinear":
            continue
        before = producer.get(n.input[0])
        after = [c for d in consumers.get(n.output[0], []) if d.op_type == "DequantizeLinear"
                 for c in consumers.get(d.output[0], [])]
        if before is not None and before.op_type == "Conv" and any(c.op_type == "Relu" for c in after):
            problems.append(f"Q/DQ {n.name or n.output[0]} between Conv {before.name} and its Relu: TensorRT fuses "
                            f"Conv+Relu only without them (quantize after the Relu)")
    return problems


def _per_axis_problems(n, where: str, scale: np.ndarray, consts: _Constants, producer: dict,
                       consumers: dict) -> list[str]:
    """Per-axis scales: only on a weight, one per element of its axis, axis 0 for a Conv's."""
    axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
    data = n.input[0]
    if n.op_type == "DequantizeLinear" and not consts.is_const(data):
        q = producer.get(data)  # Model Optimizer's form: weight -> QuantizeLinear -> DequantizeLinear
        data = q.input[0] if q is not None and q.op_type == "QuantizeLinear" else data
    weight = consts.value(data)
    if weight is None:
        return [f"{where}: per-axis scales on an activation (TensorRT quantizes activations per tensor)"]
    problems = []
    if not -weight.ndim <= axis < weight.ndim or weight.shape[axis] != scale.size:
        problems.append(f"{where}: {scale.size} scales for a weight of shape {list(weight.shape)} on axis {axis}")
    users = consumers.get(n.output[0], []) if n.op_type == "DequantizeLinear" else []
    if any(u.op_type == "Conv" and len(u.input) > 1 and u.input[1] == n.output[0] for u in users) and \
            axis % max(1, weight.ndim) != 0:
        problems.append(f"{where}: a Conv weight quantized on axis {axis}; TensorRT takes axis 0 (output channels)")
    return problems


# ----------------------------------------------------------------------------- versions


def requirements(path: str | os.PathLike, info: Optional[dict] = None) -> dict:
    """The oldest TensorRT (and the JetPack that ships it) that parses the file, with why; the
    device it needs for its precision. `info`: the sidecar (for the form); None reads the graph.

    {"tensorrt": "8.2" | None, "jetpack": "4.6" | None, "why": one line, "reasons": [...],
     "device": what the GPU must be, "form": form name}"""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    form = form_of(info or {}) or form_of_graph(path)
    opset = _opset(model)
    ops = {n.op_type for n in model.graph.node if n.domain in ("", "ai.onnx")}
    parses = [r for r in RELEASES if r.min_opset <= opset <= r.max_opset]
    if not parses:
        return {"tensorrt": None, "jetpack": None, "form": form, "reasons": [],
                "why": f"no TensorRT release here parses opset {opset} (8.2: <= 13, 8.5/8.6: <= 17, 10.x: <= 20)",
                "device": ""}
    low = _index(parses[0].tensorrt)
    reasons = [f"opset {opset}, which TensorRT {parses[0].tensorrt} is the first here to parse (opsets "
               f"{parses[0].min_opset}-{parses[0].max_opset}, {parses[0].source})"]
    why = reasons[0]
    for op, first in OPS_FROM.items():
        if op in ops and _index(first) > low:
            low = _index(first)
            why = f"{op}: parsed from TensorRT {first} (onnx-tensorrt operators.md: N in 8.5-GA, Y in 8.6-GA)"
            reasons.append(why)
    if form == "int8-qdq":
        reasons.append("INT8 Q/DQ (explicit quantization, int8, zero points 0): every release here parses it")
    device = {"int8-qdq": "a GPU with INT8: Jetson Xavier or Orin (the Nano and TX2 have no INT8; TensorRT falls "
                          "back to fp16/fp32)",
              "fp32-2:4": "an Ampere or newer GPU for the 2:4 speed-up: Jetson Orin, JetPack >= 5 (Xavier and Nano "
                          "build it dense)",
              }.get(form, "any Jetson")
    r = RELEASES[low]
    return {"tensorrt": r.tensorrt, "jetpack": r.jetpack, "form": form, "reasons": reasons, "device": device,
            "why": why}


# ----------------------------------------------------------------------------- trtexec


def input_dims(path: str | os.PathLike) -> tuple[str, list]:
    """(name, dims) of the file's first real input; a symbolic dim is its name (str) or None."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {t.name for t in graph.initializer}
    v = next(i for i in graph.input if i.name not in inits)
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in v.type.tensor_type.shape.dim]
    return v.name, dims


def shape_flags(name: str, dims: list, size: int, batch: int) -> list[str]:
    """trtexec's optimization profile for a batch up to `batch` at `size` px: 1 to `batch`, built
    for `batch` [trtexec]. A file whose input is fully static takes none (trtexec refuses shapes
    for it); a symbolic side gets `size`."""
    if all(isinstance(d, int) and d > 0 for d in dims):
        return []
    c = dims[1] if len(dims) > 1 and isinstance(dims[1], int) and dims[1] > 0 else 3
    h, w = ((dims[2] if isinstance(dims[2], int) and dims[2] > 0 else size),
            (dims[3] if isinstance(dims[3], int) and dims[3] > 0 else size)) if len(dims) == 4 else (size, size)
    fixed_batch = dims[0] if dims and isinstance(dims[0], int) and dims[0] > 0 else None
    lo, hi = (fixed_batch, fixed_batch) if fixed_batch else (1, batch)
    return [f"--minShapes={name}:{lo}x{c}x{h}x{w}", f"--optShapes={name}:{hi}x{c}x{h}x{w}",
            f"--maxShapes={name}:{hi}x{c}x{h}x{w}"]


def engine_name(onnx_file: str | os.PathLike, batch: int) -> str:
    return f"{Path(onnx_file).stem}.b{batch}.engine"


def trtexec_command(onnx_file: str | os.PathLike, info: Optional[dict], batch: int, *, shown: Optional[str] = None,
                    engine: Optional[str] = None, tensorrt: str = "8") -> str:
    """The trtexec command that builds the engine of `onnx_file` for batches 1 to `batch`:
    input name and dims read from the file, side from `info`'s input record when symbolic,
    precision flags per form (TensorRT 8.x: `--int8 --fp16` for Q/DQ; `tensorrt="10"`:
    `--stronglyTyped`). `shown`: the path as the command names it (default: the file name);
    `engine`: where it saves the engine (default NAME.bBATCH.engine beside it). A form not for
    TensorRT (the cpu-target INT8 file) raises ValueError."""
    info = info or {}
    form = FORMS[form_of(info) or form_of_graph(onnx_file)]
    if not form.for_tensorrt:
        raise ValueError(f"{Path(onnx_file).name} is {form.label}: a file for {form.runtime}, not for TensorRT")
    name, dims = input_dims(onnx_file)
    size = int((info.get("input") or {}).get("size") or 224)
    flags = form.flags_10 if str(tensorrt).split(".")[0] == "10" else form.flags
    shown = shown or Path(onnx_file).name
    engine = engine or str(Path(shown).with_name(engine_name(shown, batch)))
    return " ".join(["trtexec", f"--onnx={shown}", *shape_flags(name, dims, size, batch), *flags,
                     f"--saveEngine={engine}"])
