"""`clipdistill predict --model model.onnx IMAGE_FOLDER_OR_VIDEO ...`: top-k classes per image.

This is what runs on the edge device, so at run time it needs only ONNX Runtime, numpy
and Pillow (no torch, no timm, no open_clip): everything it must know — input size,
normalisation, resize rule, class names — travels inside the ONNX file's metadata,
written by `clipdistill export`, and is checked before it is used (model_file.py). Folders
are read in batches; a file that cannot be decoded is skipped with a warning naming it, and
the rest are still answered. Videos and cameras go frame by frame (video.py), on the same
open model. `--model` may be a bundle folder (deploy/bundle.py): its fp32 file is run. The base
install (`pip install clipdistill`, plus onnxruntime) is all this needs: tests/test_light_install.py.

The pixels are made as the metadata's input record says (inputs.py, the one numpy home of the
deployed input pipeline): students see the image stretched to size x size (bilinear,
antialiased, as training renders it with torch in the trainer's `student_pixels`;
tests/test_inputs.py holds the two together), CLIP teachers the shortest side resized (bicubic) then a centre crop
(open_clip's transform). Each answer, and its "none of these", is reject.py's.

A video file shorter than its header says is a warning, and with --json one more line after its
frames (`truncated`, both counts), so a script reading the lines learns it too."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

from ..core.config import check, option
from ..core.errors import ConfigError, MissingResourceError
from ..data.images import UnreadableImage, display_path, open_rgb
from .inputs import preprocess
from .model_file import check_metadata, read_metadata
from .reject import answer, softmax
from .runtime import PROVIDERS, run_batches, session
from .video import is_video, predict_video

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PredictConfig:
    model: str = option("", "ONNX file written by `clipdistill export`, or its bundle folder (its fp32 file is used)",
                        metavar="FILE|BUNDLE")
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
        if Path(self.model).is_dir():
            self.model = bundle_model(self.model)
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


# ----------------------------------------------------------------------------- files

def bundle_model(folder: str) -> str:
    """The ONNX file `predict` runs from a bundle folder (deploy/bundle.py writes it: the ONNX files with
    their sidecars, labels.txt, a subfolder per runtime, manifest.json {"models": [ONNX file names],
    "files": {relative path: {"sha256", "bytes"}}, ...}): the first of its models (else of the top-level
    .onnx files it lists) whose sidecar says fp32, else model.onnx. Read as plain JSON here: the
    device needs nothing of the bundle writer."""
    root = Path(folder)
    manifest = root / "manifest.json"
    if not manifest.is_file():
        raise ConfigError(f"--model {folder}: a folder without manifest.json; give an ONNX file or a bundle "
                          f"folder written by `clipdistill export`")
    try:
        listed = json.loads(manifest.read_text(encoding="utf-8"))
        files = [str(f) for f in listed.get("models") or listed["files"]]
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:  # not JSON, no "files", ...
        raise ConfigError(f"--model {folder}: {manifest} is not a bundle manifest ({type(e).__name__}: {e}); "
                          f"export the bundle again with `clipdistill export`") from None
    onnx = [f for f in files if "/" not in f and f.endswith(".onnx") and (root / f).is_file()]
    for f in onnx:
        try:
            precision = json.loads((root / f).with_suffix(".json").read_text(encoding="utf-8")).get("precision")
        except (ValueError, OSError, AttributeError):  # no sidecar, or not one: its metadata is checked on open
            continue
        if precision == "fp32":
            return str(root / f)
    if (root / "model.onnx").is_file():
        return str(root / "model.onnx")
    raise ConfigError(f"--model {folder}: the bundle holds no full-precision ONNX file at its top level (manifest "
                      f"lists {', '.join(onnx) or 'no .onnx file there'}); give the ONNX file itself with --model")


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


def classify(sess, meta: dict, inputs: Sequence[str], top_k: int = 5, batch_size: int = 32, reject: float = 0.0,
             model: str = "") -> dict:
    """`predict` on a model already open (`open_model`): what it returns."""
    classes = meta["classes"]
    k = min(top_k, len(classes))
    files, skipped = list_images(inputs)
    for s in skipped:
        log.warning("warning: skipped %s: %s", s["path"], s["error"])
    results = []
    stream = _decoded(files, meta["input"], skipped)
    while True:
        chunk = [item for _, item in zip(range(batch_size), stream)]
        if not chunk:
            break
        x = np.stack([a for _, a in chunk])
        probs = softmax(run_batches(sess, x, len(x)).astype(np.float64))
        for (path, _), p in zip(chunk, probs):
            results.append({"path": display_path(path), **answer(p, classes, k, reject)})
    if not results:
        raise MissingResourceError("no readable image among " + ", ".join(map(str, inputs)) +
                                   (f" ({len(skipped)} skipped)" if skipped else ""))
    return {"model": str(model), "classes": classes, "reject_threshold": reject, "results": results,
            "skipped": skipped}


def predict(model: str, inputs: Sequence[str], top_k: int = 5, batch_size: int = 32, threads: int = 0,
            provider: str = "auto", reject: float = 0.0) -> dict:
    """{"model", "classes", "results": [{"path", "label", "rejected", "top": [{"class", "prob"}]}], "skipped"}.
    `label` is the top class, or "none of these" when its probability is under `reject`."""
    sess, meta = open_model(model, threads, provider)
    return classify(sess, meta, inputs, top_k, batch_size, reject, model)


# ----------------------------------------------------------------------------- the verb

TRUNCATED_FIELDS = ("source", "truncated", "frames_in_header", "frames_read")


def run(cfg: PredictConfig, inputs: Sequence[str] = (), emit: Optional[Callable[[dict], None]] = None) -> dict:
    """`clipdistill predict`: images and folders, then videos, then the camera, on one open model.
    `emit` gets each answer as it comes: the images' result (`classify`'s) once they are all
    answered, then each frame's, and after a video file shorter than its header says, its
    `TRUNCATED_FIELDS`. Returns {"model", "images": the images' result or None, "videos": [...]}."""
    emit = emit or (lambda item: None)
    if not inputs and cfg.camera < 0:
        raise ConfigError("give images, folders or videos to predict on, or --camera 0")
    videos = [i for i in inputs if is_video(i) and Path(i).is_file()]
    images = [i for i in inputs if i not in videos]
    sess, meta = open_model(cfg.model, cfg.threads, cfg.provider)
    reject = cfg.reject_threshold(meta)
    if reject:
        log.info("'%s' below top probability %.3f (--reject %s)", "none of these", reject, cfg.reject)
    elif cfg.reject == "auto" and (meta.get("reject_calibration") or {}).get("why"):
        log.info("--reject auto: %s (%s)", meta["reject_calibration"]["why"], meta["reject_calibration"].get("how"))
    done: dict = {"model": cfg.model, "images": None, "videos": []}
    if images:
        res = classify(sess, meta, images, cfg.top_k, cfg.batch_size, reject, cfg.model)
        emit(res)
        log.info("%d images%s", len(res["results"]), f", {len(res['skipped'])} skipped (see warnings)"
                 if res["skipped"] else "")
        done["images"] = res
    k = min(cfg.top_k, len(meta["classes"]))
    for src in videos + ([cfg.camera] if cfg.camera >= 0 else []):
        try:
            res = predict_video(sess, meta, src, k, reject, cfg.batch_size, cfg.stride, cfg.max_frames,
                                cfg.annotate or None, on_frame=emit)
        except KeyboardInterrupt:  # Ctrl-C ends a camera, and the command goes on
            if not isinstance(src, int):
                raise
            continue
        if res["truncated"]:
            emit({f: res[f] for f in TRUNCATED_FIELDS})
        done["videos"].append(res)
    return done


def _line(ans: dict, where: str) -> str:
    mark = f"{ans['label']} | " if ans["rejected"] else ""
    return f"{where}: {mark}" + ", ".join(f"{t['class']} {t['prob']:.3f}" for t in ans["top"])


def text(item: dict, cfg: Optional[PredictConfig] = None) -> Optional[str]:
    """What `run` emits, as a person reads it: one line per image or frame. A truncated video's
    record is None: a warning has said it, and --json prints it for scripts."""
    if "results" in item:
        return "\n".join(_line(r, r["path"]) for r in item["results"])
    if "frame" in item:
        when = f" ({item['time']:.2f} s)" if item["time"] is not None else ""
        return _line(item, f"{item['source']} frame {item['frame']}{when}")
    return None
