"""The model's input as deployment makes it: uint8 RGB -> resized, normalised float32 NCHW, as
the preprocessing record in the ONNX metadata and the sidecar says (`input`: side, mean/std,
resize rule, interpolation).

One home, in numpy and Pillow only, because the device that runs `predict` has no torch: what
export checks parity on, what INT8 calibrates and is measured on, what compress measures the ONNX
file on and what predict feeds the model on a device are the same pixels by construction. The
records themselves are written here too (`student_input`, `clip_input`), beside the code that
reads them.

Training makes its pixels with torch on the training device (the trainer's `student_pixels`
in distill/: resize, augment, mix, normalise in one batched step); a test
(tests/test_inputs.py) pins the two together on the same images, so they cannot drift apart
unseen. Where they differ at all it is the resize (Pillow's antialiased bilinear against
torch's, held by the test to a uint8 step and a half); at the trained side there is no resize
and they agree to float rounding."""

from __future__ import annotations

import numpy as np

_SCALE = "pixels / 255, then (x - mean) / std"
# open_clip's defaults, replaced by what its own transform says when it says so
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def student_input(size: int, mean: float, std: float) -> dict:
    """The record of a timm student's input: stretched to size x size (bilinear), normalised."""
    return {"name": "input", "layout": "NCHW", "dtype": "float32", "channels": "RGB", "size": int(size),
            "scale": _SCALE, "mean": [float(mean)] * 3, "std": [float(std)] * 3,
            "resize": "stretch", "interpolation": "bilinear"}


def clip_input(transform, size: int) -> dict:
    """The record of a CLIP teacher's input: side, mean/std and resize rule read from open_clip's
    own transform (a torchvision Compose, read by duck typing: no torch import here)."""
    spec = {"name": "input", "layout": "NCHW", "dtype": "float32", "channels": "RGB", "size": int(size),
            "scale": _SCALE, "mean": list(_CLIP_MEAN), "std": list(_CLIP_STD), "resize": "stretch",
            "interpolation": "bicubic"}
    crop = False
    for t in getattr(transform, "transforms", []):
        kind = type(t).__name__
        if kind == "Normalize":
            spec["mean"], spec["std"] = [float(v) for v in t.mean], [float(v) for v in t.std]
        elif kind == "Resize":
            spec["interpolation"] = str(getattr(t.interpolation, "value", t.interpolation)).lower()
        elif kind == "CenterCrop":
            crop = True
    if crop:
        spec["resize"] = "shortest-center-crop"
    return spec


def _resized(img, spec: dict):
    """An RGB PIL image at the record's side, by its resize rule (the image itself when it is
    already that size)."""
    from PIL import Image

    size = int(spec["size"])
    interp = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}[
        spec.get("interpolation", "bilinear")]
    if spec.get("resize", "stretch") == "shortest-center-crop":
        w, h = img.size
        # torchvision's Resize(int): the short side becomes `size`, the long side is truncated.
        nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), interp)
        left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
        img = img.crop((left, top, left + size, top + size))
    elif img.size != (size, size):
        img = img.resize((size, size), interp)
    return img


def _normalised(x_u8: np.ndarray, spec: dict) -> np.ndarray:
    """uint8 (..., S, S, 3) -> float32 (..., 3, S, S), (x / 255 - mean) / std."""
    x = np.asarray(x_u8, dtype=np.float32) / 255.0
    mean = np.asarray(spec["mean"], dtype=np.float32)
    std = np.asarray(spec["std"], dtype=np.float32)
    return np.ascontiguousarray(np.moveaxis((x - mean) / std, -1, -3))


def preprocess(img, spec: dict) -> np.ndarray:
    """One RGB PIL image -> float32 (3, S, S), as the record says."""
    return _normalised(np.asarray(_resized(img, spec)), spec)


def at_side(images_u8: np.ndarray, spec: dict) -> np.ndarray:
    """uint8 (N, H, W, 3) -> uint8 (N, S, S, 3) by the record's resize rule: the pixels the network
    is given (the array itself when already at the side)."""
    images_u8 = np.asarray(images_u8)
    size = int(spec["size"])
    if len(images_u8) and images_u8.shape[1:3] != (size, size):
        from PIL import Image

        images_u8 = np.stack([np.asarray(_resized(Image.fromarray(im), spec)) for im in images_u8])
    return images_u8


def prepare(images_u8: np.ndarray, spec: dict) -> np.ndarray:
    """uint8 (N, H, W, 3) -> float32 (N, 3, S, S), as the record says; each image is what
    `preprocess` makes of it. Images already at the side are normalised in one step."""
    return _normalised(at_side(images_u8, spec), spec)
