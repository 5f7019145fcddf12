"""jetson-inference (`imageNet`, `imagenet.py`): a file made for its fixed ways.

jetson-inference cannot be told how to feed a model (/tmp research, c/imageNet.cpp preProcess):
every ONNX classifier gets a NEAREST stretch to the network side (`dx = (int)(x*scale)`,
c/tensorConvert.cu), pixels / 255, ImageNet mean/std, planar RGB; the engine is built without an
optimization profile (a dynamic batch fails: its issues #870, #1378); the output is read as
probabilities; labels are one per line, where a line `nXXXXXXXX label` is split as a synset. So the
bundle writes `jetson/model.onnx`: batch 1, a per-channel Mul/Add in front that maps ImageNet
normalisation to the sidecar's, Softmax at the end, I/O named `input_0`/`output_0` as its own
exporter names them, and `jetson/labels.txt` with every line in the synset form (a plain label
such as "newspaper boy" would otherwise be misread).

The check emulates its preprocessing in numpy on real images and compares the top-1 with predict's
(Pillow's antialiased bilinear): the resize rule is the only difference, and it is measured."""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np

from .. import onnx_edit
from . import TARGETS, BundleContext, Entry, Target
from ._common import mark_adapted, network_images, reference_logits, run_onnx, softmax

log = logging.getLogger(__name__)

NAME = "jetson"
RUNTIME = "jetson-inference (imageNet / imagenet.py)"
# c/imageNet.cpp:265-277: what it feeds every ONNX model
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT, OUTPUT = "input_0", "output_0"
AGREEMENT_BAR = 99.0  # % top-1 agreement with predict on real images


def _files(ctx: BundleContext):
    folder = ctx.folder / NAME
    return folder / "model.onnx", folder / "labels.txt"


def label_lines(classes: list[str]) -> str:
    """`n%08d label` per class: LoadClassLabels splits a line whose 10th character is a space after
    an 'n' as synset + label; written so for every line, no label is misread."""
    return "".join(f"n{i:08d} {c}\n" for i, c in enumerate(classes))


def jetson_input(images_u8: np.ndarray, size: int) -> np.ndarray:
    """jetson-inference's preprocessing in numpy: gpuTensorNormMean's nearest stretch
    (`dx = (int)(x * scale)`, scale = in/out in float32), x / 255, ImageNet mean/std, planar RGB."""
    images_u8 = np.asarray(images_u8)
    h, w = images_u8.shape[1:3]
    sx, sy = np.float32(w) / np.float32(size), np.float32(h) / np.float32(size)
    xs = (np.arange(size, dtype=np.float32) * sx).astype(np.int64)
    ys = (np.arange(size, dtype=np.float32) * sy).astype(np.int64)
    px = images_u8[:, ys][:, :, xs].astype(np.float32) * np.float32(1.0 / 255.0)
    x = (px - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def write(ctx: BundleContext) -> list[Entry]:
    m = ctx.fp32
    if m is None or not m.classifies:
        why = "no fp32 file in the bundle" if m is None else \
            f"{m.path.name} outputs {m.info.get('output')}, not class scores (jetson-inference's imageNet is a " \
            "classifier)"
        return [Entry(NAME, RUNTIME, "", "", f"skipped: {why}")]
    onnx_path, labels = _files(ctx)
    rec = ctx.input
    size = int(rec["size"])
    scale, bias = onnx_edit.normalisation_map(IMAGENET_MEAN, IMAGENET_STD, rec["mean"], rec["std"])
    model = onnx_edit.load(m.path)
    onnx_edit.prepend_affine(model, scale, bias, new_input=INPUT)
    onnx_edit.append_softmax(model)
    onnx_edit.rename_io(model, outputs={model.graph.output[0].name: OUTPUT})
    model = onnx_edit.fix_batch(model, 1)
    mark_adapted(model, "jetson-inference: batch 1, ImageNet-normalised input mapped to the model's, Softmax out",
                 ctx.rel(m.path))
    onnx_edit.save(model, onnx_path)
    from ...core import atomic

    atomic.write_text(labels, label_lines(ctx.classes))
    imgs = network_images(None, size)
    onnx_edit.verify(m.path, onnx_path, _ours(imgs, rec), jetson_input(imgs, size), softmax=True, batch=1)
    cmd = (f"imagenet.py --model={ctx.rel(onnx_path)} --labels={ctx.rel(labels)} --input_blob={INPUT} "
           f"--output_blob={OUTPUT} IMAGE_OR_STREAM OUTPUT")
    return [Entry(NAME, RUNTIME, ctx.rel(onnx_path), cmd,
                  "batch 1 (no optimization profile in jetson-inference); flags with underscores and '=' (its "
                  "parser matches `--input_blob=` literally); the C++ `imagenet` takes the same flags; the engine "
                  "is cached beside the file, so the folder must be writable"),
            Entry(NAME, RUNTIME, ctx.rel(labels), "--labels=" + ctx.rel(labels),
                  "one `nXXXXXXXX label` line per class")]


def _ours(images: np.ndarray, rec: dict) -> np.ndarray:
    from ..inputs import prepare

    return prepare(images, rec)


def measure(ctx: BundleContext, images: np.ndarray, labels: Optional[np.ndarray] = None) -> dict:
    """Top-1 of the jetson file on jetson-inference's emulated preprocessing against predict's
    (the bundle's fp32 file on inputs.prepare), and the accuracy of each when labels are given."""
    onnx_path, _ = _files(ctx)
    size = int(ctx.input["size"])
    jet = run_onnx(onnx_path, jetson_input(images, size), batch=1)
    ref = softmax(reference_logits(ctx.fp32.path, ctx.input, images))
    pj, pr = jet.argmax(1), ref.argmax(1)
    out = {"images": int(len(images)), "image_side": [int(s) for s in np.asarray(images).shape[1:3]],
           "network_side": size, "top1_agreement": float((pj == pr).mean() * 100)}
    if labels is not None and (np.asarray(labels) >= 0).all():
        out["accuracy_jetson_nearest"] = float((pj == labels).mean() * 100)
        out["accuracy_predict_bilinear"] = float((pr == labels).mean() * 100)
    return out


def check(ctx: BundleContext, images: Optional[np.ndarray]) -> list[str]:
    m = ctx.fp32
    if m is None or not m.classifies:
        return []
    onnx_path, labels = _files(ctx)
    problems = [f"{ctx.rel(p)} is missing" for p in (onnx_path, labels) if not p.is_file()]
    if problems:
        return problems
    ins, outs = onnx_edit.io_shapes(onnx_edit.load(onnx_path))
    size = int(ctx.input["size"])
    if ins != {INPUT: [1, 3, size, size]}:
        problems.append(f"{ctx.rel(onnx_path)}: input {ins}, expected {{'{INPUT}': [1, 3, {size}, {size}]}} (static)")
    if list(outs) != [OUTPUT] or outs[OUTPUT] != [1, len(ctx.classes)]:
        problems.append(f"{ctx.rel(onnx_path)}: output {outs}, expected {{'{OUTPUT}': [1, {len(ctx.classes)}]}}")
    lines = labels.read_text(encoding="utf-8").splitlines()
    if lines != label_lines(ctx.classes).splitlines():
        problems.append(f"{ctx.rel(labels)}: {len(lines)} lines, not one `n%08d label` line per class "
                        f"({len(ctx.classes)})")
    if problems:
        return problems
    imgs = images if images is not None else network_images(None, size)
    r = measure(ctx, imgs)
    if r["top1_agreement"] < AGREEMENT_BAR:
        problems.append(f"{ctx.rel(onnx_path)}: top-1 agreement with predict {r['top1_agreement']:.1f}% on "
                        f"{r['images']} images of {r['image_side']} px (emulated jetson-inference preprocessing, "
                        f"nearest stretch to {size} px), under {AGREEMENT_BAR:g}%")
    log.info("jetson: top-1 agreement with predict %.2f%% on %d images", r["top1_agreement"], r["images"])
    return problems


TARGETS.add(NAME, Target(NAME, RUNTIME, write, check))
