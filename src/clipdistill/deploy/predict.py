"""`clipdistill predict --model model.onnx IMAGE_OR_FOLDER ...`: top-k classes per image.

This is what runs on the edge device, so at run time it needs only ONNX Runtime, numpy
and Pillow (no torch, no timm, no open_clip): everything it must know — input size,
normalisation, resize rule, class names — travels inside the ONNX file's metadata,
written by `clipdistill export`. Folders are read in batches; a file that cannot be
decoded is skipped with a warning naming it, and the rest are still answered.

The preprocessing mirrors training: students see the image stretched to size x size
(bilinear, antialiased: `students.prepare_images`), CLIP teachers the shortest side
resized (bicubic) then a centre crop (open_clip's transform)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from ..core.config import check, option
from ..core.errors import ConfigError, MissingResourceError
from ..data.images import UnreadableImage, display_path, open_rgb

log = logging.getLogger(__name__)

METADATA_KEY = "clipdistill"
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


@dataclasses.dataclass
class PredictConfig:
    model: str = option("", "ONNX file written by `clipdistill export`", metavar="FILE")
    top_k: int = option(5, "classes shown per image")
    batch_size: int = option(32, "images per ONNX Runtime call")
    threads: int = option(0, "ONNX Runtime intra-op threads; 0 = its default (the physical cores)")
    provider: str = option("auto", "ONNX Runtime execution provider; auto = CUDA when installed, else CPU",
                           choices=["auto", *PROVIDERS])
    reject: str = option("auto", "answer 'none of these' when the top probability is under this: auto (the "
                                 "threshold `fit-prompts` calibrated on the pool, if the model has one), off, or a "
                                 "number in (0, 1)", metavar="auto|off|P")
    camera: int = option(-1, "read this camera (OpenCV index, e.g. 0) instead of files; stop with Ctrl-C")
    annotate: str = option("", "videos/camera: write a copy with the top class on each frame to this .mp4",
                           metavar="FILE")
    stride: int = option(1, "videos/camera: answer every N-th frame")
    max_frames: int = option(0, "videos/camera: stop after N answered frames (0 = the whole video)")

    def __post_init__(self) -> None:
        check(bool(self.model), "model", "give the ONNX file, e.g. --model runs/RUN/model.onnx")
        check(Path(self.model).is_file(), "model", f"{self.model} is not a file; write one with `clipdistill export`")
        check(self.top_k >= 1, "top_k", "must be >= 1")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        check(self.threads >= 0, "threads", "must be >= 0 (0 = ONNX Runtime's default)")
        if self.reject not in ("auto", "off"):
            try:
                value = float(self.reject)
            except ValueError:
                value = -1.0
            check(0 < value < 1, "reject", f"{self.reject!r}: give auto, off or a probability in (0, 1)")
        check(self.stride >= 1, "stride", "must be >= 1")
        check(self.max_frames >= 0, "max_frames", "must be >= 0 (0 = all)")
        check(self.camera >= -1, "camera", "must be a camera index >= 0")

    def reject_threshold(self, meta: dict) -> float:
        """0 = never reject."""
        if self.reject == "off":
            return 0.0
        if self.reject == "auto":
            return float(meta.get("reject_threshold") or 0.0)
        return float(self.reject)


# ----------------------------------------------------------------------------- sessions

def session(path: str | os.PathLike | bytes, threads: int = 0, provider: str = "cpu"):
    """An ONNX Runtime session on one provider (CPU is always added as the fallback)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if provider == "auto":
        provider = "cuda" if PROVIDERS["cuda"] in ort.get_available_providers() else "cpu"
    name = PROVIDERS[provider]
    if name not in ort.get_available_providers():
        raise ConfigError(f"--provider {provider}: onnxruntime {ort.__version__} here has no {name} "
                          f"(available: {', '.join(ort.get_available_providers())}); install onnxruntime-gpu "
                          f"or use --provider cpu")
    providers = [name] + (["CPUExecutionProvider"] if name != "CPUExecutionProvider" else [])
    if not isinstance(path, bytes) and not Path(path).is_file():
        raise ConfigError(f"--model {path}: no such file; give an ONNX file written by `clipdistill export`")
    try:
        return ort.InferenceSession(path if isinstance(path, bytes) else str(path), so, providers=providers)
    except Exception as e:  # onnxruntime raises its own types (InvalidProtobuf, Fail, ...) for unreadable models
        raise ConfigError(f"--model {path if not isinstance(path, bytes) else '(in memory)'}: ONNX Runtime cannot "
                          f"load it ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); give an "
                          f"ONNX file written by `clipdistill export`") from None


def read_metadata(sess) -> dict:
    """The export's description of the model (input spec, classes, ...), or {} for a
    foreign ONNX file."""
    meta = sess.get_modelmeta().custom_metadata_map
    if METADATA_KEY in meta:
        return json.loads(meta[METADATA_KEY])
    return {}


def run_batches(sess, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + batch_size]})[0] for i in range(0, len(x), batch_size)])


# ----------------------------------------------------------------------------- pixels

def preprocess(img, spec: dict) -> np.ndarray:
    """RGB PIL image -> float32 (3, S, S), as the model's metadata says."""
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
    x = np.asarray(img, dtype=np.float32) / 255.0
    mean = np.asarray(spec["mean"], dtype=np.float32)
    std = np.asarray(spec["std"], dtype=np.float32)
    return ((x - mean) / std).transpose(2, 0, 1)


NONE_LABEL = "none of these"


def answer(p: np.ndarray, classes: list[str], k: int, reject: float) -> dict:
    """One image's (or frame's) answer: the top k, and its label: the top class, or
    `none of these` when its probability is under `reject` (0 = never)."""
    order = np.argsort(-p, kind="stable")[:k]
    top = [{"class": classes[i], "prob": float(p[i])} for i in order]
    rejected = bool(reject > 0 and p[order[0]] < reject)
    return {"label": NONE_LABEL if rejected else top[0]["class"], "rejected": rejected, "top": top}


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


# ----------------------------------------------------------------------------- files

def list_images(inputs: Sequence[str]) -> tuple[list[Path], list[dict]]:
    """Files named, and every visible file under folders named (sorted, recursive).
    Non-images are not filtered by extension: they are found out when read, and reported."""
    files, missing = [], []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files += sorted(q for q in p.rglob("*") if q.is_file() and
                            not any(part.startswith(".") for part in q.relative_to(p).parts))
        elif p.is_file():
            files.append(p)
        else:
            missing.append({"path": str(p), "error": "no such file or folder"})
    return files, missing


def _decoded(files: Iterable[Path], spec: dict, skipped: list[dict]) -> Iterator[tuple[Path, np.ndarray]]:
    for f in files:
        try:
            yield f, preprocess(open_rgb(f), spec)
        except (UnreadableImage, OSError) as e:  # not an image, truncated, too large: skipped and named
            msg = str(e) or type(e).__name__
            skipped.append({"path": display_path(f), "error": msg})
            log.warning("warning: skipped %s: %s", display_path(f), msg)


def open_model(model: str, threads: int = 0, provider: str = "auto"):
    """(session, metadata) of a classifier exported by clipdistill."""
    sess = session(model, threads, provider)
    meta = read_metadata(sess)
    if not meta:
        raise ConfigError(f"--model {model}: no clipdistill metadata (input size, normalisation, classes); "
                          f"export it with `clipdistill export`")
    if meta.get("output") != "logits":
        raise ConfigError(f"--model {model} outputs {meta.get('output')} vectors, not class logits; export a "
                          f"teacher together with a run (`clipdistill export --teacher NAME --run DIR`) to fold "
                          f"the run's head on")
    return sess, meta


def predict(model: str, inputs: Sequence[str], top_k: int = 5, batch_size: int = 32, threads: int = 0,
            provider: str = "auto", reject: float = 0.0) -> dict:
    """{"model", "classes", "results": [{"path", "label", "rejected", "top": [{"class", "prob"}]}], "skipped"}.
    `label` is the top class, or "none of these" when its probability is under `reject`."""
    sess, meta = open_model(model, threads, provider)
    classes = meta["classes"]
    k = min(top_k, len(classes))
    files, skipped = list_images(inputs)
    for s in skipped:
        log.warning("warning: skipped %s: %s", s["path"], s["error"])
    name = sess.get_inputs()[0].name
    results = []
    stream = _decoded(files, meta["input"], skipped)
    while True:
        chunk = [item for _, item in zip(range(batch_size), stream)]
        if not chunk:
            break
        x = np.stack([a for _, a in chunk])
        probs = softmax(sess.run(None, {name: x})[0].astype(np.float64))
        for (path, _), p in zip(chunk, probs):
            results.append({"path": display_path(path), **answer(p, classes, k, reject)})
    if not results:
        raise MissingResourceError("no readable image among " + ", ".join(map(str, inputs)) +
                                   (f" ({len(skipped)} skipped)" if skipped else ""))
    return {"model": str(model), "classes": classes, "reject_threshold": reject, "results": results,
            "skipped": skipped}
