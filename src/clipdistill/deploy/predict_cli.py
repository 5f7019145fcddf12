"""`clipdistill predict`'s command line: images and folders (predict.py), videos and cameras
(video.py), one answer per line. A video file shorter than its header says is a warning, and
with --json one more line after its frames (`truncated`, both counts), so a script reading the
lines learns it too."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..core.errors import ConfigError
from .predict import PredictConfig, open_model, predict

log = logging.getLogger(__name__)


def cli_args(p) -> None:
    p.add_argument("inputs", nargs="*", metavar="IMAGE_FOLDER_OR_VIDEO",
                   help="image files, folders of images, and/or video files (.mp4, .avi, .mov, ...)")
    p.add_argument("--json", action="store_true", help="print the result as JSON (videos: one JSON line per frame, "
                                                       "then, for a file shorter than its header says, a line "
                                                       "{source, truncated, frames_in_header, frames_read})")


def _line(ans: dict, where: str) -> str:
    mark = f"{ans['label']} | " if ans["rejected"] else ""
    return f"{where}: {mark}" + ", ".join(f"{t['class']} {t['prob']:.3f}" for t in ans["top"])


def run_cli(cfg: PredictConfig, args) -> int:
    from .video import is_video, predict_video

    if not args.inputs and cfg.camera < 0:
        raise ConfigError("give images, folders or videos to predict on, or --camera 0")
    videos = [i for i in args.inputs if is_video(i) and Path(i).is_file()]
    images = [i for i in args.inputs if i not in videos]
    sess, meta = open_model(cfg.model, cfg.threads, cfg.provider)
    reject = cfg.reject_threshold(meta)
    if reject:
        log.info("'%s' below top probability %.3f (--reject %s)", "none of these", reject, cfg.reject)
    elif cfg.reject == "auto" and (meta.get("reject_calibration") or {}).get("why"):
        log.info("--reject auto: %s (%s)", meta["reject_calibration"]["why"], meta["reject_calibration"].get("how"))
    if images:
        res = predict(cfg.model, images, cfg.top_k, cfg.batch_size, cfg.threads, cfg.provider, reject)
        if args.json:
            print(json.dumps(res))
        else:
            for r in res["results"]:
                print(_line(r, r["path"]))
        log.info("%d images%s", len(res["results"]), f", {len(res['skipped'])} skipped (see warnings)"
                 if res["skipped"] else "")
    k = min(cfg.top_k, len(meta["classes"]))
    sources = videos + ([cfg.camera] if cfg.camera >= 0 else [])
    for src in sources:
        def show(ans: dict) -> None:
            when = f" ({ans['time']:.2f} s)" if ans["time"] is not None else ""
            print(json.dumps(ans) if args.json else _line(ans, f"{ans['source']} frame {ans['frame']}{when}"),
                  flush=True)
        try:
            res = predict_video(sess, meta, src, k, reject, cfg.batch_size, cfg.stride, cfg.max_frames,
                                cfg.annotate or None, on_frame=show)
        except KeyboardInterrupt:
            if not isinstance(src, int):
                raise
            continue
        if res["truncated"] and args.json:
            print(json.dumps({f: res[f] for f in ("source", "truncated", "frames_in_header", "frames_read")}),
                  flush=True)
    return 0
