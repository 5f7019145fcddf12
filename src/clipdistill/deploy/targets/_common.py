"""What several targets share: the images their checks run on, the reference model's outputs on
them (the package's own preprocessing, deploy/inputs.py, through ONNX Runtime), and how an
adapted file records what it is. No target registers here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

from ..inputs import prepare

# What an adapted file says about itself in its metadata (the `clipdistill` key, read by predict,
# is dropped from it: its input is no longer the record's, so predict must not feed it as such).
ADAPTER_KEY = "clipdistill_adapter"


def softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def network_images(images: Optional[np.ndarray], size: int, n: int = 16, seed: int = 0) -> np.ndarray:
    """uint8 (N, size, size, 3): `images` stretched to the network side as the record says (Pillow
    bilinear), or, without images, seeded noise at that side (exact for the checks that compare two
    computations on the same pixels, which is all they are used for then)."""
    if images is None:
        return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    images = np.asarray(images)
    if images.shape[1:3] == (size, size):
        return images
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in images])


def reference_logits(path: Path, record: dict, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """The file's output on `images` made as `predict` makes them (inputs.prepare)."""
    from ..runtime import run_batches, session

    return run_batches(session(path, threads=1), prepare(images, record), batch)


def run_onnx(path: Path, x: np.ndarray, batch: int = 64) -> np.ndarray:
    from ..runtime import run_batches, session

    return run_batches(session(path, threads=1), x, batch)


def mark_adapted(model, what: str, source: str) -> None:
    """Drop the metadata predict reads (its input record no longer holds), say what the file is."""
    keep = [p for p in model.metadata_props if p.key not in ("clipdistill", ADAPTER_KEY)]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    model.metadata_props.add(key=ADAPTER_KEY, value=json.dumps({"what": what, "from": source}))
    model.doc_string = f"clipdistill bundle: {what} (from {source})"


def uniform(values) -> bool:
    return len(set(float(v) for v in values)) == 1
