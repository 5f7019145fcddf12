"""Triton Inference Server (ONNX Runtime backend): a model repository, one model per ONNX file.

    triton/NAME/config.pbtxt     name, backend, max_batch_size, input/output (dims without the batch)
    triton/NAME/1/model.onnx     the file as exported (dynamic batch: Triton batches up to max_batch_size)
    triton/NAME/labels.txt       one label per line (`label_filename`, read by the classification extension)

The directory name must equal `name` (Triton's model_repository.md). Logits are fine: the
classification extension ranks raw values. The check parses the config with Triton's own protobuf
(tritonclient's model_config_pb2) and compares dims and names with the ONNX file."""

from __future__ import annotations

import re
import shutil
from typing import Optional

import numpy as np

from ...core import atomic
from .. import onnx_edit
from . import TARGETS, BundleContext, BundleModel, Entry, Target

NAME = "triton"
RUNTIME = "Triton Inference Server (onnxruntime backend)"
LABELS = "labels.txt"


def model_name(m: BundleModel) -> str:
    """A repository name from the file's stem: model.int8-tensorrt -> model_int8_tensorrt."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", m.path.stem)


def config_text(name: str, ins: dict, outs: dict, batch: int, labels: bool) -> str:
    def dims(d: list) -> str:
        return ", ".join(str(v if isinstance(v, int) else -1) for v in d[1:])

    lines = [f'name: "{name}"', 'backend: "onnxruntime"', f"max_batch_size: {batch}", "input ["]
    lines += [f'  {{ name: "{k}" data_type: TYPE_FP32 format: FORMAT_NCHW dims: [ {dims(v)} ] }}'
              for k, v in ins.items()]
    lines += ["]", "output ["]
    lab = f' label_filename: "{LABELS}"' if labels else ""
    lines += [f'  {{ name: "{k}" data_type: TYPE_FP32 dims: [ {dims(v)} ]{lab} }}' for k, v in outs.items()]
    lines += ["]", "dynamic_batching { }", ""]
    return "\n".join(lines)


def write(ctx: BundleContext) -> list[Entry]:
    entries = []
    for m in ctx.models:
        name = model_name(m)
        folder = ctx.folder / NAME / name
        (folder / "1").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(m.path, folder / "1" / "model.onnx")
        ins, outs = onnx_edit.io_shapes(onnx_edit.load(m.path))
        atomic.write_text(folder / "config.pbtxt", config_text(name, ins, outs, ctx.batch, m.classifies))
        if m.classifies:
            atomic.write_text(folder / LABELS, "".join(f"{c}\n" for c in m.info["classes"]))
        entries.append(Entry(NAME, RUNTIME, ctx.rel(folder / "config.pbtxt"),
                             f"tritonserver --model-repository=$PWD/{NAME}  # model \"{name}\"",
                             f"{m.precision}; max_batch_size {ctx.batch}, dynamic batching"))
    return entries


def model_config_pb2():
    """Triton's ModelConfig protobuf module (tritonclient[grpc]); ImportError when absent."""
    from tritonclient.grpc import model_config_pb2 as pb

    return pb


def check(ctx: BundleContext, images: Optional[np.ndarray]) -> list[str]:
    try:
        pb = model_config_pb2()
        from google.protobuf import text_format
    except ImportError as e:
        return [f"skipped: tritonclient[grpc] is not installed ({e}); pip install 'tritonclient[grpc]' to parse the "
                f"configs with Triton's own protobuf"]
    problems = []
    for m in ctx.models:
        name = model_name(m)
        folder = ctx.folder / NAME / name
        where = ctx.rel(folder / "config.pbtxt")
        try:
            cfg = text_format.Parse((folder / "config.pbtxt").read_text(encoding="utf-8"), pb.ModelConfig())
        except (OSError, text_format.ParseError) as e:
            problems.append(f"{where}: {e}")
            continue
        ins, outs = onnx_edit.io_shapes(onnx_edit.load(folder / "1" / "model.onnx"))
        if cfg.name != name or cfg.backend != "onnxruntime" or cfg.max_batch_size != ctx.batch:
            problems.append(f"{where}: name/backend/max_batch_size {cfg.name}/{cfg.backend}/{cfg.max_batch_size}, "
                            f"expected {name}/onnxruntime/{ctx.batch}")
        problems += _match(where, "input", {i.name: list(i.dims) for i in cfg.input}, ins)
        problems += _match(where, "output", {o.name: list(o.dims) for o in cfg.output}, outs)
        for o in cfg.output:
            if o.label_filename:
                n = len((folder / o.label_filename).read_text(encoding="utf-8").splitlines())
                if [n] != list(o.dims):
                    problems.append(f"{where}: {o.label_filename} has {n} lines for an output of dims {list(o.dims)}")
            elif m.classifies:
                problems.append(f"{where}: output {o.name} has no label_filename")
    return problems


def _match(where: str, what: str, cfg: dict, onnx_io: dict) -> list[str]:
    want = {k: [v if isinstance(v, int) else -1 for v in d[1:]] for k, d in onnx_io.items()}
    if cfg != want:
        return [f"{where}: {what} {cfg} does not match the ONNX file's {want} (dims without the batch)"]
    bad = [k for k, d in onnx_io.items() if isinstance(d[0], int)]
    return [f"{where}: {what} {k} has a fixed batch in the ONNX file; max_batch_size needs a dynamic one"
            for k in bad]


TARGETS.add(NAME, Target(NAME, RUNTIME, write, check))
