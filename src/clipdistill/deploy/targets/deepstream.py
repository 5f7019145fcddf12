"""DeepStream Gst-nvinfer: a classifier config and the file it reads (network-type=1).

nvinfer computes y = net-scale-factor * (x - offsets[c]) on 0..255 pixels: one scalar scale, per
channel offsets. The sidecar's record (x / 255 - mean) / std fits exactly when std is the same on
every channel (ours: scale 1 / (255 std), offsets 255 mean); when it is not (a CLIP teacher), one
scalar cannot say it, and rather than write a config that is slightly wrong the normalisation is
baked into the graph: the config feeds raw pixels (scale 1, offsets 0) and a per-channel Mul/Add
in front of the model computes (x / 255 - mean) / std.

Its default classifier parser takes the arg-max over probabilities above `classifier-threshold`
and applies no softmax, so the file gets a Softmax (batch stays dynamic: nvinfer builds one
profile up to batch-size). The threshold is the model's calibrated reject threshold, which is
already a top softmax probability (deploy/reject.py): used as is. Its label file holds, for a
classifier, one line per output layer with the labels joined by ';' (InferPostprocessor::
parseLabelsFile): one line here. `model-engine-file` is the name nvinfer gives the engine it builds
(`<onnx-file>_b<batch>_gpu0_<mode>.engine`), so a second start reuses it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np

from ...core import atomic
from .. import onnx_edit
from ..inputs import prepare
from . import TARGETS, BundleContext, BundleModel, Entry, Target
from ._common import mark_adapted, network_images, run_onnx, softmax, uniform

log = logging.getLogger(__name__)

NAME = "deepstream"
RUNTIME = "DeepStream Gst-nvinfer (classifier)"
LABELS = "labels_deepstream.txt"
# network-mode: 0=FP32, 1=INT8, 2=FP16 (NvDsInferNetworkMode); the engine name's word for each
MODES = {"fp16": (2, "fp16"), "int8": (1, "int8")}
NO_THRESHOLD = 0.0  # never rejects: every object gets its top class, as `predict --reject 0` does


def eligible(m: BundleModel) -> Optional[str]:
    """None when TensorRT (under nvinfer) can build the file, else why not."""
    if not m.classifies:
        return f"outputs {m.info.get('output')}, not class scores"
    q = m.info.get("quantization") or {}
    if m.precision == "int8" and q.get("target") != "tensorrt":
        return "ONNX Runtime's CPU INT8 form (uint8 activations), which TensorRT's parser does not take"
    return None


def _mode(m: BundleModel) -> tuple[int, str]:
    return MODES["int8" if m.precision.startswith("int8") else "fp16"]


def _names(ctx: BundleContext, m: BundleModel) -> tuple[Path, Path]:
    folder = ctx.folder / NAME
    stem = m.path.stem
    suffix = "" if m is ctx.reference else "_" + stem.replace(".", "_")
    return folder / f"{stem}.probs.onnx", folder / f"config_infer_primary_clipdistill{suffix}.txt"


def scale_offsets(rec: dict) -> tuple[float, list[float], bool]:
    """(net-scale-factor, offsets, baked): the record's normalisation in nvinfer's terms, or, with
    per-channel std, raw pixels (1, 0) and baked=True (the graph normalises)."""
    if uniform(rec["std"]):
        return 1.0 / (255.0 * float(rec["std"][0])), [255.0 * float(v) for v in rec["mean"]], False
    return 1.0, [0.0, 0.0, 0.0], True


def config_text(ctx: BundleContext, m: BundleModel, onnx_name: str, output: str) -> str:
    rec = ctx.input
    size = int(rec["size"])
    scale, offsets, baked = scale_offsets(rec)
    mode, word = _mode(m)
    thr = m.info.get("reject_threshold")
    lines = ["# DeepStream Gst-nvinfer config written by clipdistill from the model's input record.",
             f"# Preprocessing: stretch to {size}x{size} (bilinear, no aspect ratio kept), RGB, "
             f"y = net-scale-factor * (x - offsets) on 0..255 pixels"
             + (" = raw pixels; the ONNX file normalises itself (per-channel std, which one scalar "
                "net-scale-factor cannot express)" if baked else f" = (x / 255 - {rec['mean']}) / {rec['std']}") + ".",
             "# The output is Softmax probabilities (appended to the model); classifier-threshold applies to them."]
    if isinstance(thr, (int, float)) and thr > 0:
        lines.append("# classifier-threshold: the model's calibrated reject threshold (a top softmax probability).")
    else:
        thr = NO_THRESHOLD
        lines.append("# classifier-threshold: no calibrated reject threshold in this model, so 0: every object gets "
                     "its "
                     "top class (as `clipdistill predict --reject 0`); raise it to leave uncertain ones unlabelled.")
    lines += ["[property]", "gpu-id=0", f"onnx-file={onnx_name}",
              f"model-engine-file={onnx_name}_b{ctx.batch}_gpu0_{word}.engine", f"labelfile-path={LABELS}",
              f"net-scale-factor={scale:.16g}", "offsets=" + ";".join(f"{v:.16g}" for v in offsets),
              "model-color-format=0", f"infer-dims=3;{size};{size}", f"batch-size={ctx.batch}",
              f"network-mode={mode}", "network-type=1", "process-mode=1", "gie-unique-id=1",
              f"output-blob-names={output}", f"classifier-threshold={thr:.6g}",
              "maintain-aspect-ratio=0", "symmetric-padding=0", "scaling-filter=1", "scaling-compute-hw=0", ""]
    return "\n".join(lines)


def read_config(path: Path) -> dict:
    """The [property] keys of an nvinfer config as strings."""
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")) and "=" in line:
            k, v = line.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def label_line(classes: list[str]) -> str:
    """One line, labels joined by ';' (a ';' inside a label would split it: written as ',')."""
    return ";".join(c.replace(";", ",") for c in classes) + "\n"


def write(ctx: BundleContext) -> list[Entry]:
    entries = []
    rec = ctx.input
    size = int(rec["size"])
    _, _, baked = scale_offsets(rec)
    bad = [c for c in ctx.classes if ";" in c]
    if bad:
        log.warning("deepstream: %s contain ';', which nvinfer's label file uses between labels: written with ','",
                    ", ".join(map(repr, bad)))
    for m in ctx.models:
        why = eligible(m)
        if why:
            entries.append(Entry(NAME, RUNTIME, "", "", f"{ctx.rel(m.path)} skipped: {why}"))
            continue
        onnx_path, cfg_path = _names(ctx, m)
        model = onnx_edit.load(m.path)
        out_name = model.graph.output[0].name
        if baked:
            onnx_edit.prepend_affine(model, *onnx_edit.pixel_map(rec["mean"], rec["std"]), new_input="input_pixels")
        onnx_edit.append_softmax(model)
        mark_adapted(model, "DeepStream: Softmax out" + (", normalisation baked in (0..255 RGB in)" if baked else ""),
                     ctx.rel(m.path))
        onnx_edit.save(model, onnx_path)
        imgs = network_images(None, size)
        onnx_edit.verify(m.path, onnx_path, prepare(imgs, rec), formula_input(scale_offsets(rec)[:2], imgs),
                         softmax=True)
        atomic.write_text(cfg_path, config_text(ctx, m, onnx_path.name, out_name))
        entries.append(Entry(NAME, RUNTIME, ctx.rel(cfg_path),
                             f"deepstream-app -c YOUR_APP.txt  # [primary-gie] config-file={cfg_path.name}",
                             f"reads {onnx_path.name} (Softmax appended) and {LABELS}; network-mode="
                             f"{_mode(m)[0]}; the first start builds the engine (minutes) and saves it beside"))
    if any(e.file for e in entries):
        atomic.write_text(ctx.folder / NAME / LABELS, label_line(ctx.classes))
        entries.append(Entry(NAME, RUNTIME, f"{NAME}/{LABELS}", f"labelfile-path={LABELS}",
                             "one line: the labels joined by ';' (nvinfer's classifier format)"))
    return entries


def formula_input(scale_offsets_: tuple[float, list[float]], images_u8: np.ndarray) -> np.ndarray:
    """nvinfer's y = net-scale-factor * (x - offsets[c]) on uint8 RGB at the network side, NCHW."""
    scale, offsets = scale_offsets_
    x = np.asarray(images_u8, np.float32)
    y = np.float32(scale) * (x - np.asarray(offsets, np.float32))
    return np.ascontiguousarray(y.transpose(0, 3, 1, 2))


def check(ctx: BundleContext, images: Optional[np.ndarray]) -> list[str]:
    problems = []
    rec = ctx.input
    size = int(rec["size"])
    for m in ctx.models:
        if eligible(m):
            continue
        onnx_path, cfg_path = _names(ctx, m)
        if not cfg_path.is_file() or not onnx_path.is_file():
            problems.append(f"{ctx.rel(cfg_path)} or {ctx.rel(onnx_path)} is missing")
            continue
        c = read_config(cfg_path)
        where = ctx.rel(cfg_path)
        for key, want in (("network-type", "1"), ("model-color-format", "0"), ("scaling-filter", "1"),
                          ("maintain-aspect-ratio", "0"), ("infer-dims", f"3;{size};{size}"),
                          ("batch-size", str(ctx.batch)), ("onnx-file", onnx_path.name), ("labelfile-path", LABELS),
                          ("model-engine-file", f"{onnx_path.name}_b{ctx.batch}_gpu0_{_mode(m)[1]}.engine")):
            if c.get(key) != want:
                problems.append(f"{where}: {key}={c.get(key)}, expected {want}")
        _, outs = onnx_edit.io_shapes(onnx_edit.load(onnx_path))
        if c.get("output-blob-names") not in outs:
            problems.append(f"{where}: output-blob-names={c.get('output-blob-names')} is not an output of "
                            f"{onnx_path.name} ({', '.join(outs)})")
        thr = float(c.get("classifier-threshold", "nan"))
        want_thr = m.info.get("reject_threshold") or NO_THRESHOLD
        if not abs(thr - want_thr) <= 1e-6:
            problems.append(f"{where}: classifier-threshold={thr}, expected {want_thr} (the reject threshold)")
        problems += _check_formula(ctx, m, c, onnx_path, images, where)
    labels = ctx.folder / NAME / LABELS
    if labels.is_file():
        lines = labels.read_text(encoding="utf-8").splitlines()
        if len(lines) != 1 or len(lines[0].split(";")) != len(ctx.classes):
            problems.append(f"{ctx.rel(labels)}: {len(lines)} lines / {len(lines[0].split(';')) if lines else 0} "
                            f"labels, expected one line of {len(ctx.classes)} labels joined by ';'")
    return problems


def _check_formula(ctx, m, c: dict, onnx_path: Path, images, where: str) -> list[str]:
    """The config's own numbers, nvinfer's formula: the tensor predict makes (<= 1e-5), and the
    probabilities of softmax(reference) through the written file."""
    rec = ctx.input
    size = int(rec["size"])
    scale = float(c["net-scale-factor"])
    offsets = [float(v) for v in c["offsets"].split(";")]
    imgs = network_images(images, size)
    y = formula_input((scale, offsets), imgs)
    ours = prepare(imgs, rec)
    problems = []
    _, _, baked = scale_offsets(rec)
    if not baked:
        d = float(np.abs(y - ours).max())
        if not d <= 1e-5:
            problems.append(f"{where}: net-scale-factor * (x - offsets) differs from the model's input tensor by "
                            f"{d:.3g}")
    ref = softmax(run_onnx(m.path, ours))
    d = float(np.abs(run_onnx(onnx_path, y) - ref).max())
    if not d <= 1e-5:
        problems.append(f"{ctx.rel(onnx_path)}: on the config's formula it differs from softmax({m.path.name}) by "
                        f"{d:.3g}")
    return problems


TARGETS.add(NAME, Target(NAME, RUNTIME, write, check))
