"""Predict on video files and cameras, frame by frame, as clip-distillation's live demo does.

OpenCV (the headless build: no GUI libraries on a device) decodes files and opens cameras;
each frame goes through the same preprocessing as an image file (inputs.py, from the model's
metadata), so a frame and the same picture saved as PNG get the same answer.
Files are run in batches (throughput); cameras one frame at a time (latency). An annotated
copy of the video, with the top class written on each frame, is optional.

A file that ends before its header says (a cut copy, a damaged frame OpenCV stops at) decodes
without an error: OpenCV's read just returns nothing. So the frames read are compared with the
header's count, and a shortfall is a warning naming the file and both counts, and
`truncated: true` in the result, instead of a short answer that looks complete."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import numpy as np

from ..core.errors import ConfigError
from .inputs import prepare
from .reject import answer, softmax
from .runtime import run_batches

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv"}


def is_video(path: Union[str, Path]) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def _cv2():
    try:
        import cv2
    except ImportError:
        raise ConfigError("videos and cameras need OpenCV: pip install 'clipdistill[video]' (or "
                          "opencv-python-headless)") from None
    return cv2


def open_capture(source: Union[str, int]):
    cv2 = _cv2()
    cap = cv2.VideoCapture(source)
    if not cap.isOpened():
        what = f"--camera {source}: no camera there (or it is busy)" if isinstance(source, int) else \
            f"{source}: OpenCV cannot open it as a video (missing, or a codec this build lacks)"
        raise ConfigError(what)
    return cap


def frames(cap, stride: int = 1, max_frames: int = 0, read: Optional[dict] = None
           ) -> Iterator[tuple[int, float, np.ndarray]]:
    """(frame index, time in seconds, RGB uint8 frame) of every `stride`-th frame. `read`, when
    given, gets `frames` (how many were decoded) and `ended` (True when the stream ran out, False
    when `max_frames` stopped it)."""
    cv2 = _cv2()
    fps = cap.get(cv2.CAP_PROP_FPS) or 0.0
    read = {} if read is None else read
    read.update(frames=0, ended=False)
    i = n = 0
    while True:
        ok, bgr = cap.read()
        if not ok:
            read["ended"] = True
            return
        read["frames"] = i + 1
        if i % stride == 0:
            yield i, (i / fps if fps > 0 else float("nan")), cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            n += 1
            if max_frames and n >= max_frames:
                return
        i += 1


def header_frames(cap) -> Optional[int]:
    """The frame count the file's header gives, or None (a camera, a stream, no count)."""
    n = cap.get(_cv2().CAP_PROP_FRAME_COUNT)
    return int(n) if n and n > 0 else None


def predict_video(sess, meta: dict, source: Union[str, int], k: int, reject: float, batch_size: int = 16,
                  stride: int = 1, max_frames: int = 0, annotate: Optional[str] = None,
                  on_frame: Optional[Callable[[dict], None]] = None) -> dict:
    """Run the model on a video file or camera; `on_frame` gets each frame's answer as it comes."""
    cv2 = _cv2()
    cap = open_capture(source)
    fps_in = cap.get(cv2.CAP_PROP_FPS) or 25.0
    in_header = None if isinstance(source, int) else header_frames(cap)
    read: dict = {}
    writer = None
    classes = meta["classes"]
    live = isinstance(source, int)
    batch = 1 if live else batch_size
    answers, pending = [], []
    t0 = time.perf_counter()

    def flush() -> None:
        nonlocal writer
        x = prepare(np.stack([f for _, _, f in pending]), meta["input"])
        probs = softmax(run_batches(sess, x, len(x)).astype(np.float64))
        for (i, t, frame), p in zip(pending, probs):
            ans = {"source": str(source), "frame": i, "time": None if t != t else round(t, 3),
                   **answer(p, classes, k, reject)}
            answers.append(ans)
            if on_frame:
                on_frame(ans)
            if annotate:
                bgr = cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)
                if writer is None:
                    Path(annotate).parent.mkdir(parents=True, exist_ok=True)
                    writer = cv2.VideoWriter(str(annotate), cv2.VideoWriter_fourcc(*"mp4v"), fps_in / stride,
                                             (bgr.shape[1], bgr.shape[0]))
                    if not writer.isOpened():
                        raise ConfigError(f"--annotate {annotate}: OpenCV cannot write it (use a .mp4 or .avi name)")
                text = f"{ans['label']} {ans['top'][0]['prob']:.2f}"
                scale = max(0.4, bgr.shape[1] / 640)
                cv2.putText(bgr, text, (8, int(24 * scale)), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0),
                            max(2, int(3 * scale)), cv2.LINE_AA)
                cv2.putText(bgr, text, (8, int(24 * scale)), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255),
                            max(1, int(scale)), cv2.LINE_AA)
                writer.write(bgr)
        pending.clear()

    try:
        for item in frames(cap, stride, max_frames, read):
            pending.append(item)
            if len(pending) >= batch:
                flush()
        if pending:
            flush()
    finally:
        cap.release()
        if writer is not None:
            writer.release()
    seconds = time.perf_counter() - t0
    if not answers:
        raise ConfigError(f"{source}: no frame could be read" + (f" (its header says {in_header})" if in_header
                                                                 else ""))
    fps = len(answers) / max(seconds, 1e-9)
    log.info("%s: %d frames in %.2f s: %.1f frames/s (decode, preprocess and model)%s", source, len(answers), seconds,
             fps, f"; annotated copy: {annotate}" if annotate else "")
    truncated = bool(in_header and read["ended"] and read["frames"] < in_header)
    if truncated:
        log.warning("warning: %s holds %d frames but its header says %d: the file is cut short or damaged after "
                    "frame %d; the %d answers cover only what could be decoded", source, read["frames"], in_header,
                    read["frames"] - 1, len(answers))
    return {"source": str(source), "frames": answers, "frames_per_second": fps, "seconds": seconds,
            "annotated": annotate, "frames_in_header": in_header, "frames_read": read["frames"],
            "truncated": truncated}
