"""A PyTorch module -> the ONNX file a user deploys, for export and compress alike.

`converted`: the module through the chosen exporter into a temporary folder, opened with ONNX
Runtime and checked against PyTorch on real images (parity.py) before anything is kept. `write`:
the description of the model (input record, classes, accuracy, how it was made) into the ONNX
metadata, then the file and its JSON sidecar, each written atomically.

The exporter is explicit: TorchScript (`torch.onnx.export(dynamo=False)`, opset 17) by default,
the dynamo exporter on request; the call is recorded in the metadata."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn as nn

from ..core import atomic
from .model_file import METADATA_KEY, sidecar_path
from .parity import check_parity
from .runtime import run_batches, session

FORMAT = "clipdistill-onnx/1"
EXPORTERS = ("torchscript", "dynamo")


def torch_to_onnx(module: nn.Module, example: torch.Tensor, path: Path, exporter: str, opset: int) -> dict:
    """Write `module` to `path` as ONNX (dynamic batch); returns how, for the metadata."""
    names = {"input_names": ["input"], "output_names": ["output"],
             "dynamic_axes": {"input": {0: "batch"}, "output": {0: "batch"}}}
    t0 = time.time()
    # nn.MultiheadAttention's inference fast path (a fused op, taken under no_grad) has no
    # ONNX form; the plain path computes the same thing.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        _export_call(module, example, path, exporter, opset, names)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return {"name": exporter, "call": f"torch.onnx.export(dynamo={exporter == 'dynamo'}, opset_version={opset})",
            "opset": opset, "torch": torch.__version__, "seconds": round(time.time() - t0, 2)}


def _export_call(module: nn.Module, example: torch.Tensor, path: Path, exporter: str, opset: int, names: dict):
    with warnings.catch_warnings():
        # The exporter was chosen on purpose (recorded in the metadata); its deprecation and
        # tracer chatter would only bury the parity line that tells whether it worked.
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=opset,
                              do_constant_folding=True, **names)
        else:
            # It reports its progress with print(): keep stdout for the command's own output (--json).
            with contextlib.redirect_stdout(sys.stderr):
                prog = torch.onnx.export(module, (example,), None, dynamo=True, opset_version=opset, verbose=False,
                                         **names)
                prog.save(str(path))


@dataclasses.dataclass
class Converted:
    """An ONNX file in a temporary folder that computes what PyTorch computes."""

    path: Path  # the file, gone after the `converted` block unless written elsewhere
    session: object  # ONNX Runtime on it
    exporter: dict  # torch_to_onnx's record
    parity: dict  # check_parity's record


@contextlib.contextmanager
def converted(module: nn.Module, x: np.ndarray, reference: np.ndarray, folder: Path, tag: str, exporter: str,
              opset: int, tolerance: float, what: str = "", threads: int = 0, envelope: float = 0.0
              ) -> Iterator[Converted]:
    """`module` as ONNX in a temporary folder of `folder` (named for `tag`), run by ONNX Runtime
    on `x` in one batch and checked against `reference`, PyTorch's output on `x` (ParityError past
    the tolerance, plus `envelope`)."""
    with atomic.temporary_folder(folder, tag) as tmp:
        path = tmp / "model.onnx"
        exp = torch_to_onnx(module, torch.from_numpy(x[:2]), path, exporter, opset)
        sess = session(path, threads)
        parity = check_parity(reference, run_batches(sess, x, len(x)), tolerance, what, envelope)
        yield Converted(path, sess, exp, parity)


def int8_path(out: Path, target: str) -> Path:
    return out.with_name(out.stem + (".int8.onnx" if target == "cpu" else f".int8-{target}.onnx"))


def write(model_path: Path, out: Path, info: dict) -> None:
    """Metadata in, then the file and its sidecar, each written atomically."""
    import onnx

    model = onnx.load(str(model_path))
    flat = {METADATA_KEY: json.dumps(info, default=str), "format": FORMAT, "role": info["role"],
            "output": info["output"], "precision": info["precision"], "image_size": str(info["input"]["size"]),
            "mean": json.dumps(info["input"]["mean"]), "std": json.dumps(info["input"]["std"]),
            "resize": info["input"]["resize"], "exporter": info["exporter"]["call"],
            "opset": str(info["exporter"]["opset"])}
    if "classes" in info:
        flat["classes"] = json.dumps(info["classes"])
    keep = [p for p in model.metadata_props if p.key not in flat]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for k, v in flat.items():
        model.metadata_props.add(key=k, value=v)
    model.doc_string = f"clipdistill {info['role']} {info['name']} ({info['precision']}): {info['output']} out"
    atomic.write_bytes(out, model.SerializeToString())
    atomic.write_json(sidecar_path(out), info)
