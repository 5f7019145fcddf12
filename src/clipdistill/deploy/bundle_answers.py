"""The answers a bundle's models gave where it was written, asked again wherever it is checked.

A bundle copied to a Jetson meets another ONNX Runtime (ARM kernels, another version, the
onnxruntime-gpu wheel): check-bundle's hashes say the bytes arrived, not that this runtime computes
what the training machine did. So `write_bundle` runs each model once on a few probe images (the
source run's test images when that run is on the machine, seeded noise otherwise), keeps those pixels
at the network's side (probe.npy, read back with allow_pickle=False) and the outputs (answers.json),
both hashed in the manifest; `replay` runs every model again on the same pixels through predict's own
preprocessing, on ONNX Runtime's CPU provider, with numpy and onnxruntime only (the device's install).

fp32 files (and compress's fp32-2:4 form) must give the same outputs to FP32_TOLERANCE of their
largest magnitude (another CPU's fp32 kernels differ in the last bits, a wrong file or runtime by
far more); quantized files, whose integer kernels round differently from one CPU family to another,
the same top-1 on at least INT8_AGREEMENT of the probe images."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np

from ..core import atomic
from .inputs import at_side
from .targets._common import reference_logits

log = logging.getLogger(__name__)

PROBE = "probe.npy"
ANSWERS = "answers.json"
PROBE_IMAGES = 16
FP32_TOLERANCE = 1e-3
INT8_AGREEMENT = 0.9


def probe_pixels(images: Optional[np.ndarray], record: dict, n: int = PROBE_IMAGES, seed: int = 0) -> np.ndarray:
    """uint8 (n, S, S, 3) at the record's side, made from `images` by its own resize rule (what
    predict feeds the network), or seeded noise without images."""
    if images is None or not len(images):
        size = int(record["size"])
        return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return at_side(np.asarray(images)[:n], record)


def record(folder: Path, models: dict[str, dict], pixels: np.ndarray, where: str) -> bool:
    """Write PROBE and ANSWERS into `folder` for `models` ({file name: its sidecar}); False (and
    nothing written) where ONNX Runtime is not installed."""
    try:
        import onnxruntime
    except ModuleNotFoundError:
        log.warning("onnxruntime is not installed: the bundle records no answers for check-bundle to compare on "
                    "the device (pip install 'clipdistill[device]')")
        return False
    answers = {}
    for name, info in models.items():
        out = reference_logits(folder / name, info["input"], pixels)
        answers[name] = {"precision": str(info.get("precision", "fp32")), "top1": out.argmax(1).tolist(),
                         "outputs": out.astype(np.float32).tolist()}
    atomic.write_bytes(folder / PROBE, _npy(pixels))
    atomic.write_json(folder / ANSWERS, {"images": where, "onnxruntime": onnxruntime.__version__,
                                         "provider": "cpu", "models": answers})
    return True


def _npy(a: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def replay(folder: Path, models: dict[str, dict]) -> dict[str, tuple[list[str], str]]:
    """{file: (problems, what was measured)} for each model that has recorded answers; {} when the
    bundle has none (written without ONNX Runtime, or by a clipdistill before them). A model that
    cannot be run here is a problem; ONNX Runtime missing here raises ModuleNotFoundError."""
    if not (folder / ANSWERS).is_file() or not (folder / PROBE).is_file():
        return {}
    rec = atomic.read_json(folder / ANSWERS)
    pixels = np.load(folder / PROBE, allow_pickle=False)
    import onnxruntime

    res = {}
    for name, want in rec["models"].items():
        if name not in models or not (folder / name).is_file():
            continue  # a missing file is the manifest check's to say
        ref = np.asarray(want["outputs"], dtype=np.float32)
        try:
            got = reference_logits(folder / name, models[name]["input"], pixels)
        except Exception as e:  # noqa: BLE001 - unloadable, or a run ONNX Runtime refuses (its own types)
            res[name] = ([f"ONNX Runtime {onnxruntime.__version__} here cannot run it: {str(e).splitlines()[0]}"], "")
            continue
        if got.shape != ref.shape:
            res[name] = ([f"outputs of shape {list(got.shape)} here, {list(ref.shape)} where it was written"], "")
            continue
        same = int((got.argmax(1) == np.asarray(want["top1"])).sum())
        diff = float(np.abs(got - ref).max())
        scale = max(float(np.abs(ref).max()), 1e-6)
        said = (f"ONNX Runtime {onnxruntime.__version__} (CPU) here: top-1 as recorded on {same} of {len(ref)} probe "
                f"images, max |diff| {diff:.2g} (outputs up to {scale:.3g}; recorded with ONNX Runtime "
                f"{rec.get('onnxruntime', '?')})")
        problems = []
        floats = want["precision"].startswith("fp32")  # fp32, and fp32-2:4 (compress's sparse form)
        if floats and diff > FP32_TOLERANCE * scale:
            problems.append(f"{said}: an fp32 file must stay within {FP32_TOLERANCE:g} of its outputs' scale")
        elif not floats and same < INT8_AGREEMENT * len(ref):
            problems.append(f"{said}: a {want['precision']} file must keep top-1 on {INT8_AGREEMENT:.0%} of them")
        res[name] = (problems, "" if problems else said)
    return res
