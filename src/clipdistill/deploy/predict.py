"""`clipdistill predict --model model.onnx IMAGE_OR_FOLDER ...`: top-k classes per image.

This is what runs on the edge device, so at run time it needs only ONNX Runtime, numpy
and Pillow (no torch, no timm, no open_clip): everything it must know — input size,
normalisation, resize rule, class names — travels inside the ONNX file's metadata,
written by `clipdistill export`. Folders are read in batches; a file that cannot be
decoded is skipped with a warning naming it, and the rest are still answered.

The preprocessing mirrors training: students see the image stretched to size x size
(bilinear, antialiased: `students.prepare_images`), CLIP teachers the shortest side
resized (bicubic) then a centre crop (open_clip's transform).

A model file is input like any other. Before ONNX Runtime reads it, its size and its
top-level protobuf fields are checked (`check_onnx_file`: a few bytes read, whatever the
file's size), so a multi-gigabyte file that is not ONNX is refused at once instead of being
read into memory whole. The metadata read back is checked too (`check_metadata`): a tampered
`reject_threshold` (NaN, -1, 1e9) would silently never or always reject, and `classes` given
as a string or shorter than the logits would print letters or wrong names.

The reject threshold is calibrated when the model is made (`otsu`, `calibrate_reject`: the
teacher's "matches a prompt" call reproduced on the student's top probability, the rule
`answer` applies), by fit-prompts (fit/quality.py) and by a re-prompted export."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

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
    if not isinstance(path, bytes):
        check_onnx_file(path)
    try:
        return ort.InferenceSession(path if isinstance(path, bytes) else str(path), so, providers=providers)
    except Exception as e:  # onnxruntime raises its own types (InvalidProtobuf, Fail, ...) for unreadable models
        raise ConfigError(f"--model {path if not isinstance(path, bytes) else '(in memory)'}: ONNX Runtime cannot "
                          f"load it ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); give an "
                          f"ONNX file written by `clipdistill export`") from None


# ModelProto's fields (onnx.proto) and their protobuf wire types (0 varint, 2 length-delimited);
# a field number not listed (a newer ONNX) may have any valid wire type.
_MODEL_FIELDS = {1: 0, 2: 2, 3: 2, 4: 2, 5: 0, 6: 2, 7: 2, 8: 2, 14: 2, 20: 2, 25: 2, 26: 2}
_PROTOBUF_LIMIT = 2**31 - 1  # protobuf parses no larger message: bigger models keep their weights outside


def _varint(f) -> Optional[int]:
    value = 0
    for shift in range(0, 64, 7):
        b = f.read(1)
        if not b:
            return None
        value |= (b[0] & 0x7F) << shift
        if b[0] < 0x80:
            return value
    return None


def _onnx_problem(path: Path, size: int) -> Optional[str]:
    """Why `path` cannot be an ONNX model, from its size and its top-level fields alone (each
    field's tag and length are read, its content skipped), or None."""
    if size == 0:
        return "the file is empty"
    if size > _PROTOBUF_LIMIT:
        return (f"{size / 2**30:.1f} GiB, over protobuf's 2 GiB limit for one ONNX file; a larger model keeps its "
                f"weights in external data files beside a small .onnx")
    seen = set()
    with open(path, "rb") as f:
        for _ in range(100_000):
            at = f.tell()
            if at == size:
                break
            tag = _varint(f)
            number, wire = (tag >> 3, tag & 7) if tag is not None else (0, -1)
            if number == 0 or wire not in (0, 1, 2, 5) or _MODEL_FIELDS.get(number, wire) != wire:
                return f"byte {at} starts no ONNX model field (protobuf tag {tag})"
            if wire == 0:
                if _varint(f) is None:
                    return f"the field at byte {at} is cut short"
            else:
                length = {1: 8, 5: 4}.get(wire) or _varint(f)
                if length is None or f.tell() + length > size:
                    return f"the field at byte {at} runs past the end of the file"
                f.seek(length, 1)
            seen.add(number)
        else:
            return "more than 100000 top-level fields"
    missing = [name for n, name in ((1, "ir_version"), (7, "graph")) if n not in seen]
    return f"it has no {' and no '.join(missing)}" if missing else None


def check_onnx_file(path: str | os.PathLike, flag: str = "--model") -> None:
    """Refuse, cheaply and before any runtime reads it, a file that cannot be an ONNX model
    (ConfigError naming it): see the module's docstring."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{flag} {path}: no such file; give an ONNX file written by `clipdistill export`")
    try:
        problem = _onnx_problem(p, p.stat().st_size)
    except OSError as e:
        problem = f"it cannot be read: {e.strerror}"
    if problem:
        raise ConfigError(f"{flag} {path}: not an ONNX model ({problem}); give an ONNX file written by "
                          f"`clipdistill export`")


def read_metadata(sess, where: str = "--model") -> dict:
    """The export's description of the model (input spec, classes, ...), or {} for a
    foreign ONNX file."""
    meta = sess.get_modelmeta().custom_metadata_map
    if METADATA_KEY not in meta:
        return {}
    try:
        got = json.loads(meta[METADATA_KEY])
    except ValueError as e:
        raise ConfigError(f"{where}: metadata field `{METADATA_KEY}` is not JSON ({e}); valid: the JSON object "
                          f"`clipdistill export` writes. Export the model again") from None
    if not isinstance(got, dict):
        raise ConfigError(f"{where}: metadata field `{METADATA_KEY}` is a {type(got).__name__}; valid: the JSON "
                          f"object `clipdistill export` writes. Export the model again")
    return got


_RESIZE = ("stretch", "shortest-center-crop")
_INTERPOLATION = ("bilinear", "bicubic", "nearest")


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def metadata_problem(meta: dict, n_logits: Optional[int]) -> Optional[tuple[str, str, str]]:
    """(field, what it holds, what is valid) of the first field `predict` cannot trust, or None."""
    classes = meta.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes):
        return "classes", repr(classes)[:60], "a non-empty list of class names (strings)"
    if n_logits is not None and len(classes) != n_logits:
        return "classes", f"{len(classes)} names", f"one name per logit of the model's output ({n_logits})"
    if "reject_threshold" in meta:
        r = meta["reject_threshold"]
        if not (_finite(r) and 0 <= r < 1):
            return "reject_threshold", repr(r), "a number in [0, 1) (0 = never reject)"
    spec = meta.get("input")
    if not isinstance(spec, dict):
        return "input", repr(spec)[:60], "the preprocessing record (size, mean, std, resize, interpolation)"
    size = spec.get("size")
    if not (isinstance(size, int) and not isinstance(size, bool) and 1 <= size <= 8192):
        return "input.size", repr(size), "a whole number of pixels, 1 to 8192"
    for key, positive in (("mean", False), ("std", True)):
        v = spec.get(key)
        if not (isinstance(v, list) and len(v) == 3 and all(_finite(x) and (x > 0 or not positive) for x in v)):
            return f"input.{key}", repr(v)[:60], "3 finite numbers (R, G, B)" + (", each > 0" if positive else "")
    if spec.get("resize", "stretch") not in _RESIZE:
        return "input.resize", repr(spec.get("resize")), " or ".join(_RESIZE)
    if spec.get("interpolation", "bilinear") not in _INTERPOLATION:
        return "input.interpolation", repr(spec.get("interpolation")), ", ".join(_INTERPOLATION)
    return None


def check_metadata(meta: dict, model: str, sess=None) -> dict:
    """`meta` when every field `predict` uses is one export could have written (ConfigError
    naming the file, the field and what is valid otherwise): see the module's docstring."""
    n_logits = None
    if sess is not None:
        shape = sess.get_outputs()[0].shape
        n_logits = shape[-1] if shape and isinstance(shape[-1], int) else None
    problem = metadata_problem(meta, n_logits)
    if problem:
        field, got, valid = problem
        raise ConfigError(f"--model {model}: metadata field `{field}` is {got}; valid: {valid}. The file was edited "
                          f"or damaged: export the model again (`clipdistill export`)")
    return meta


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


def otsu(values: np.ndarray, bins: int = 256) -> float:
    """The cut that best splits `values` into two groups (max between-class variance)."""
    v = np.asarray(values, dtype=np.float64)
    hist, edges = np.histogram(v, bins=bins)
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = (w0 * w1 * (mu0 - mu1) ** 2)[:-1]
    # Every cut inside an empty gap between the groups splits them alike: take the gap's middle.
    best = np.flatnonzero(between >= between.max() * (1 - 1e-9))
    return float((edges[best[0] + 1] + edges[best[-1] + 1]) / 2)


def calibrate_reject(student_top: np.ndarray, teacher_match: np.ndarray) -> dict:
    """The student's top-probability threshold that best reproduces the teacher's matches."""
    if teacher_match.all() or not teacher_match.any():
        return {"reject_threshold": 0.0, "balanced_agreement": None,
                "why": "the teacher finds every held-out image alike (all match or none): nothing to calibrate on"}
    u = np.unique(student_top)
    pos, neg = teacher_match.sum(), (~teacher_match).sum()
    acc = np.array([0.5 * (((student_top >= t) & teacher_match).sum() / pos + ((student_top < t) & ~teacher_match).sum()
                           / neg) for t in u])
    j = int(np.argmax(acc))
    # between the last value rejected and the first accepted, not on an observed value
    threshold = float((u[j - 1] + u[j]) / 2) if j > 0 else 0.0
    return {"reject_threshold": threshold, "balanced_agreement": float(acc[j] * 100)}


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
    meta = read_metadata(sess, f"--model {model}")
    if not meta:
        raise ConfigError(f"--model {model}: no clipdistill metadata (input size, normalisation, classes); "
                          f"export it with `clipdistill export`")
    if meta.get("output") != "logits":
        raise ConfigError(f"--model {model} outputs {meta.get('output')} vectors, not class logits; export a "
                          f"teacher together with a run (`clipdistill export --teacher NAME --run DIR`) to fold "
                          f"the run's head on")
    return sess, check_metadata(meta, model, sess)


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
