"""OpenCV DNN (`cv2.dnn.readNetFromONNX`): the blob arguments that make our tensor, and which
files it loads.

`cv2.dnn.blobFromImages(images, scalefactor, size, mean, swapRB=True, crop=False)` computes
(x - mean) * scalefactor after a plain stretch to `size` (crop=False), with `mean` in the output's
RGB order: with the record's mean m and a std s shared by the channels that is scalefactor
1 / (255 s), mean 255 m. A per-channel std needs `blobFromImagesWithParams` (OpenCV >= 4.7) with a
3-tuple scalefactor (a float there means (s, 1, 1, 1): opencv issue #23765). Its resize is
cv2.resize's bilinear, without Pillow's antialiasing: identical on images already at the side.

Which files load is found by loading them when the bundle is written (ONNX Runtime's INT8 files
do not: `Assertion failed bufidx >= 0`), recorded in the example script, and checked again."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Optional

import numpy as np

from ...core import atomic
from ..inputs import prepare
from . import TARGETS, BundleContext, Entry, Target
from ._common import network_images, run_onnx, uniform

log = logging.getLogger(__name__)

NAME = "opencv"
RUNTIME = "OpenCV DNN (cv2.dnn.readNetFromONNX)"
SCRIPT = "predict_opencv.py"
TOLERANCE = 1e-4  # max |OpenCV - ONNX Runtime| on logits, same blob, times max(1, max |logit|)
INT8_AGREEMENT = 0.95  # top-1 agreement with ONNX Runtime on real images, for INT8 files (own kernels)

_TEMPLATE = '''"""Classify images with OpenCV DNN alone: python {script} IMAGE [IMAGE ...]

Written by clipdistill from the model's input record: {words}.
Files OpenCV DNN loads (checked by loading them when this bundle was made): {loads}.
Files it does not load: {fails}."""

import sys
from pathlib import Path

import cv2
import numpy as np

HERE = Path(__file__).resolve().parent
MODEL = HERE.parent / {model!r}
SIZE = {size}
MEAN = {mean!r}  # 255 * mean, RGB order (swapRB=True swaps first)
SCALE = {scale!r}  # 1 / (255 * std) per channel
CLASSES = {classes!r}
LOADS = {loads_list!r}
DOES_NOT_LOAD = {fails_dict!r}


def blob(images_bgr):
    """BGR uint8 images (as cv2.imread gives them) -> float32 NCHW, the model's input."""
{blob_body}


def main(paths):
    net = cv2.dnn.readNetFromONNX(str(MODEL))
    images = [cv2.imread(p) for p in paths]
    net.setInput(blob(images))
    logits = net.forward()
    for p, row in zip(paths, logits):
        print(p, CLASSES[int(np.argmax(row))] if CLASSES else row)


if __name__ == "__main__":
    main(sys.argv[1:])
'''

_UNIFORM = ('    return cv2.dnn.blobFromImages(images_bgr, scalefactor=SCALE[0], size=(SIZE, SIZE), mean=MEAN, '
            'swapRB=True, crop=False)')
_PER_CHANNEL = ('    params = cv2.dnn.Image2BlobParams(scalefactor=SCALE, size=(SIZE, SIZE), mean=MEAN, swapRB=True,\n'
                '                                     ddepth=cv2.CV_32F)  # scalefactor: a 3-tuple, never a float\n'
                '    return cv2.dnn.blobFromImagesWithParams(images_bgr, params)')


def loads(path: Path) -> Optional[str]:
    """None when OpenCV DNN loads the file, else its error's first line."""
    import cv2

    try:
        cv2.dnn.readNetFromONNX(str(path))
        return None
    except cv2.error as e:
        lines = [x for x in str(e).splitlines() if x.strip()]
        return (lines[-1] if lines else str(e)).strip()[:200]


def not_for_opencv(m) -> Optional[str]:
    """Why a file must not be offered to OpenCV DNN whether it loads or not: ONNX Runtime's CPU INT8
    form (uint8 activations). OpenCV 5 refuses it (`bufidx >= 0`); OpenCV 4 (JetPack's) loads it
    and runs it with its own INT8 kernels, far from ONNX Runtime: 69.9% top-1 agreement on the
    suite's test images with 4.14, a silent wrong answer."""
    q = m.info.get("quantization") or {}
    if m.info.get("precision") == "int8" and q.get("target") == "cpu":
        return ("ONNX Runtime's CPU INT8 form: OpenCV 5 refuses it, OpenCV 4 runs it with its own INT8 kernels, "
                "far from ONNX Runtime; give OpenCV the fp32 file or an --int8-target tensorrt export")
    return None


def write(ctx: BundleContext) -> list[Entry]:
    try:
        import cv2  # noqa: F401
    except ImportError:
        return [Entry(NAME, RUNTIME, "", "", "skipped: OpenCV is not installed where the bundle was made, so which "
                                             "files it loads was not checked; pip install opencv-python-headless")]
    rec = ctx.input
    status = {ctx.rel(m.path): not_for_opencv(m) or loads(m.path) for m in ctx.models}
    ok = [f for f, why in status.items() if why is None]
    fails = {f: why for f, why in status.items() if why is not None}
    model = next((f for f in ok if f == ctx.rel(ctx.reference.path)), ok[0] if ok else ctx.rel(ctx.reference.path))
    mean = tuple(round(255.0 * float(v), 10) for v in rec["mean"])
    scale = tuple(1.0 / (255.0 * float(v)) for v in rec["std"])
    words = f"stretch to {rec['size']}x{rec['size']} (bilinear), RGB, (x / 255 - {rec['mean']}) / {rec['std']}"
    text = _TEMPLATE.format(script=SCRIPT, words=words, loads=", ".join(ok) or "none",
                            fails="; ".join(f"{f} ({w})" for f, w in fails.items()) or "none", model=model,
                            size=int(rec["size"]), mean=mean, scale=scale, classes=list(ctx.classes), loads_list=ok,
                            fails_dict=fails, blob_body=_UNIFORM if uniform(rec["std"]) else _PER_CHANNEL)
    path = ctx.folder / NAME / SCRIPT
    atomic.write_text(path, text)
    args = (f"cv2.dnn.blobFromImages(images, scalefactor={scale[0]:.10g}, size=({rec['size']}, {rec['size']}), "
            f"mean={mean}, swapRB=True, crop=False)" if uniform(rec["std"]) else
            f"cv2.dnn.blobFromImagesWithParams(images, cv2.dnn.Image2BlobParams(scalefactor={scale}, "
            f"size=({rec['size']}, {rec['size']}), mean={mean}, swapRB=True, ddepth=cv2.CV_32F))")
    entries = [Entry(NAME, RUNTIME, f, f"python {NAME}/{SCRIPT} IMAGE ...  # {args}", "loads (checked)")
               for f in ok]
    ruled = {ctx.rel(m.path) for m in ctx.models if not_for_opencv(m)}
    entries += [Entry(NAME, RUNTIME, f, "-", f"not for OpenCV DNN: {w}" if f in ruled else
                      f"OpenCV DNN cannot load it (checked): {w}") for f, w in fails.items()]
    entries.append(Entry(NAME, RUNTIME, ctx.rel(path), f"python {ctx.rel(path)} IMAGE ...", args))
    return entries


def _script(ctx: BundleContext):
    path = ctx.folder / NAME / SCRIPT
    spec = importlib.util.spec_from_file_location("clipdistill_bundle_opencv", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def measure(ctx: BundleContext, images: Optional[np.ndarray]) -> dict:
    """Per file: whether OpenCV loads it and, if so, max |OpenCV - ONNX Runtime| on the script's
    blob; and max |script's blob - predict's tensor| on images at the network side."""
    mod = _script(ctx)
    rec = ctx.input
    imgs = network_images(images, int(rec["size"]), n=32)
    x = np.asarray(mod.blob([np.ascontiguousarray(im[:, :, ::-1]) for im in imgs]), np.float32)
    out = {"blob_max_abs_diff": float(np.abs(x - prepare(imgs, rec)).max()), "files": {}}
    import cv2

    for m in ctx.models:
        f = ctx.rel(m.path)
        why = loads(m.path)
        r = {"loads": why is None, "listed_as_loading": f in mod.LOADS, "not_for_opencv": not_for_opencv(m)}
        if why is None:
            net = cv2.dnn.readNetFromONNX(str(m.path))
            net.setInput(x)
            ort = run_onnx(m.path, x)
            cv = net.forward()
            r["max_abs_diff"] = float(np.abs(cv - ort).max())
            r["top1_agreement"] = float((cv.argmax(1) == ort.argmax(1)).mean())
            r["int8"] = m.info.get("precision") == "int8"
            # A fake-quantized file may move a whole INT8 step where an activation sits on a rounding
            # boundary (another summation order): the spread its own parity check measured and allowed.
            r["allowed"] = TOLERANCE * max(1.0, float(np.abs(ort).max())) + float(
                (m.info.get("parity") or {}).get("rounding_envelope", 0.0))
        else:
            r["error"] = why
        out["files"][f] = r
    return out


def check(ctx: BundleContext, images: Optional[np.ndarray]) -> list[str]:
    path = ctx.folder / NAME / SCRIPT
    try:
        import cv2  # noqa: F401
    except ImportError as e:
        return [f"skipped: OpenCV is not installed here ({e})"]
    if not path.is_file():
        return [f"{ctx.rel(path)} is missing"]
    r = measure(ctx, images)
    problems = []
    if not r["blob_max_abs_diff"] <= 1e-5:
        problems.append(f"{ctx.rel(path)}: its blob differs from the model's input tensor by "
                        f"{r['blob_max_abs_diff']:.3g}")
    for f, s in r["files"].items():
        if s["not_for_opencv"]:
            if s["listed_as_loading"]:
                problems.append(f"{f}: listed for OpenCV DNN, but {s['not_for_opencv']}")
            continue
        if s["loads"] != s["listed_as_loading"]:
            problems.append(f"{f}: OpenCV DNN {'loads' if s['loads'] else 'does not load'} it, but {ctx.rel(path)} "
                            f"says the opposite")
        if s.get("int8") and s.get("max_abs_diff", 0.0) > s["allowed"]:
            # OpenCV runs a Q/DQ graph with its own INT8 kernels (its rounding, not ONNX Runtime's:
            # 0.11 on logits of 3 for ONNX Runtime's tensorrt-form file): the same network if the
            # answers agree on real images; on seeded noise that cannot be judged.
            if images is None:
                log.info("opencv: %s differs from ONNX Runtime by %.3g (INT8 kernels); its agreement needs real "
                         "images (check-bundle --images)", f, s["max_abs_diff"])
            elif s["top1_agreement"] < INT8_AGREEMENT:
                problems.append(f"{f}: OpenCV DNN agrees with ONNX Runtime on {100 * s['top1_agreement']:.1f}% of "
                                f"the images' top-1 (< {100 * INT8_AGREEMENT:g}%; max difference "
                                f"{s['max_abs_diff']:.3g})")
        elif s.get("max_abs_diff", 0.0) > s.get("allowed", TOLERANCE):
            problems.append(f"{f}: OpenCV DNN and ONNX Runtime differ by {s['max_abs_diff']:.3g} "
                            f"(> {s['allowed']:.3g})")
    log.debug("opencv: %s", json.dumps(r))
    return problems


TARGETS.add(NAME, Target(NAME, RUNTIME, write, check))
