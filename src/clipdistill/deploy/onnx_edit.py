"""Graph adapters that fit our ONNX file to a runtime that cannot be told how to feed it.

Some runtimes fix what they do around the model: jetson-inference feeds every ONNX classifier
ImageNet-normalised planar RGB in [0,1], builds its engine without an optimization profile (so the
batch must be fixed) and reads the output as probabilities; DeepStream thresholds probabilities
too. Instead of asking users to edit graphs by hand, the bundle writes a copy of the file with:

- `fix_batch`: the batch axis set to a number (jetson-inference: 1);
- `prepend_affine`: a per-channel Mul/Add in front, mapping the runtime's input to ours
  (`normalisation_map`, computed from the sidecar's input record: mean/std are never typed twice);
- `append_softmax`: probabilities out;
- `rename_io`: the input/output names the runtime's own exporter uses.

`verify` runs the adapted file and the original with ONNX Runtime and refuses a copy whose
output differs from softmax(original) on the mapped input: every adapted file is checked before
it is kept. Written with the `onnx` helper API alone (no graphsurgeon)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..core.errors import ClipDistillError

log = logging.getLogger(__name__)


class AdapterError(ClipDistillError):
    """An adapted ONNX file does not compute what the original computes."""


def load(path: Path):
    import onnx

    return onnx.load(str(path))


def normalisation_map(src_mean: Sequence[float], src_std: Sequence[float], dst_mean: Sequence[float],
                      dst_std: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(scale, bias) per channel with x_dst = x_src * scale + bias, where both are the same pixel
    p in [0,1] normalised two ways: x_src = (p - src_mean) / src_std, x_dst = (p - dst_mean) / dst_std."""
    sm, ss = np.asarray(src_mean, np.float64), np.asarray(src_std, np.float64)
    dm, ds = np.asarray(dst_mean, np.float64), np.asarray(dst_std, np.float64)
    return (ss / ds).astype(np.float32), ((sm - dm) / ds).astype(np.float32)


def pixel_map(mean: Sequence[float], std: Sequence[float], pixel_range: float = 255.0) -> tuple[np.ndarray, np.ndarray]:
    """(scale, bias) per channel from raw pixels in [0, pixel_range] to (p / range - mean) / std."""
    m, s = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    return (1.0 / (pixel_range * s)).astype(np.float32), (-m / s).astype(np.float32)


def _dims(value_info) -> list:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in value_info.type.tensor_type.shape.dim]


def io_shapes(model) -> tuple[dict, dict]:
    """({input name: dims}, {output name: dims}) with a symbolic dim as its name (str)."""
    inits = {t.name for t in model.graph.initializer}
    ins = {v.name: _dims(v) for v in model.graph.input if v.name not in inits}
    outs = {v.name: _dims(v) for v in model.graph.output}
    return ins, outs


def fix_batch(model, batch: int):
    """Every graph input and output gets `batch` as its first dimension; inner shapes are
    inferred again (the symbolic batch of the exporter's value_info would contradict it)."""
    import onnx

    for v in list(model.graph.input) + list(model.graph.output):
        dims = v.type.tensor_type.shape.dim
        if len(dims):
            dims[0].Clear()
            dims[0].dim_value = int(batch)
    del model.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(model)


def prepend_affine(model, scale: np.ndarray, bias: np.ndarray, new_input: str = "input_raw"):
    """x_model = new_input * scale + bias per channel (NCHW, channel axis 1), in front of the
    graph's single input. The new input takes the old one's type and shape."""
    from onnx import helper, numpy_helper

    g = model.graph
    (old,) = [v for v in g.input if v.name not in {t.name for t in g.initializer}]
    fresh = helper.make_tensor_value_info(new_input, old.type.tensor_type.elem_type, None)
    fresh.type.CopyFrom(old.type)
    s = numpy_helper.from_array(np.asarray(scale, np.float32).reshape(1, -1, 1, 1), f"{new_input}_scale")
    b = numpy_helper.from_array(np.asarray(bias, np.float32).reshape(1, -1, 1, 1), f"{new_input}_bias")
    scaled = f"{new_input}_scaled"
    nodes = [helper.make_node("Mul", [new_input, s.name], [scaled], name=f"{new_input}_normalise_mul"),
             helper.make_node("Add", [scaled, b.name], [old.name], name=f"{new_input}_normalise_add")]
    g.initializer.extend([s, b])
    for n in reversed(nodes):
        g.node.insert(0, n)
    keep = [v for v in g.input if v.name != old.name]
    del g.input[:]
    g.input.extend([fresh, *keep])
    return model


def append_softmax(model, axis: int = 1):
    """The graph's single output goes through Softmax(axis); the output keeps its name."""
    from onnx import helper

    g = model.graph
    (out,) = g.output
    logits = f"{out.name}_logits"
    _rename_tensor(g, out.name, logits, outputs_too=False)
    g.node.append(helper.make_node("Softmax", [logits], [out.name], axis=axis, name=f"{out.name}_softmax"))
    return model


def _rename_tensor(g, old: str, new: str, outputs_too: bool = True) -> None:
    for n in g.node:
        n.input[:] = [new if x == old else x for x in n.input]
        n.output[:] = [new if x == old else x for x in n.output]
    for v in g.value_info:
        if v.name == old:
            v.name = new
    if outputs_too:
        for v in list(g.input) + list(g.output):
            if v.name == old:
                v.name = new


def rename_io(model, inputs: Optional[dict] = None, outputs: Optional[dict] = None):
    """Graph inputs/outputs renamed ({old: new}) wherever the graph uses them."""
    for old, new in {**(inputs or {}), **(outputs or {})}.items():
        _rename_tensor(model.graph, old, new)
    return model


def save(model, path: Path) -> Path:
    """Checked by onnx's checker, then written atomically."""
    import onnx

    from ..core import atomic

    onnx.checker.check_model(model)
    atomic.write_bytes(path, model.SerializeToString())
    return path


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def verify(original: Path, adapted: Path, x_original: np.ndarray, x_adapted: np.ndarray, softmax: bool,
           tolerance: float = 1e-5, batch: Optional[int] = None) -> float:
    """Max |adapted(x_adapted) - softmax?(original(x_original))| with ONNX Runtime, row by row
    when `batch` fixes the adapted file's batch; AdapterError past `tolerance`."""
    from .runtime import run_batches, session

    ref = run_batches(session(original, threads=1), x_original, 64)
    if softmax:
        ref = _softmax(ref.astype(np.float64))
    got = run_batches(session(adapted, threads=1), x_adapted, batch or 64)
    diff = float(np.abs(got.astype(np.float64) - ref).max())
    if not diff <= tolerance:
        raise AdapterError(f"{adapted}: the adapted file differs from {'softmax of ' if softmax else ''}{original} by "
                           f"{diff:.3g} (> {tolerance:g}) on the same images; this is a bug in clipdistill's "
                           f"adapter (deploy/onnx_edit.py): please report it, and use {original} meanwhile")
    log.debug("%s: max |diff| %.3g against %s", adapted, diff, original)
    return diff
