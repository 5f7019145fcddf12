"""`clipdistill export`: a student (or a teacher's image encoder) as one ONNX file.

The job, over the modules that do each part: the model is loaded with what its metadata will
say (deployable.py; `--prompts` gives an embedding student new classes, reprompt.py), turned
into ONNX and checked against PyTorch on real test images (writer.py, parity.py: the largest
difference is printed, and past `--tolerance` nothing is written), then written with its
metadata (key `clipdistill`, read by `predict` with ONNX Runtime alone) and a JSON sidecar.
How to make the input is the model's input record (inputs.py).

`--int8` adds a statically quantized copy (quantize.py) calibrated on the run's own training
images (run_images.py), and reports test accuracy before and after. A re-prompted model that
never rejects says so here, with why and how to get a threshold."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..core import atomic
from ..core.config import check, default_cache_dir, option
from ..core.errors import ClipDistillError, ConfigError, MissingSplitError
from ..core.metrics import agreement, percent
from ..distill.rundir import RunDir
from .bundle import BundleOptions, write_for
from .deployable import Loaded, load_student, load_teacher_encoder
from .inputs import prepare
from .model_file import sidecar_path
from .parity import check_parity, parity_inputs
from .run_images import calibration_images, split_images, subset
from .runtime import onnx_accuracy, run_batches, session
from .writer import EXPORTERS, FORMAT, converted, int8_path, write

log = logging.getLogger(__name__)


class AccuracyDropError(ClipDistillError):
    """INT8 lost more accuracy than allowed."""


@dataclasses.dataclass
class ExportConfig(BundleOptions):
    run: str = option("", "run folder written by `clipdistill train` (the student to export)", metavar="DIR")
    out: str = option("", "ONNX file to write; default RUN/model.onnx (RUN/model-SIZEpx.onnx with --size), "
                          "RUN/teacher.onnx with --teacher, or TEACHER.onnx without --run", metavar="FILE")
    checkpoint: str = option("best", "which checkpoint of the run", choices=["best", "last"])
    size: int = option(0, "input side in pixels; 0 = the size the student was trained at (a teacher: its own). "
                          "CNN students are size-agnostic: --size 224 gives the study's setting")
    teacher: str = option("", "export this open_clip model's image encoder instead of the student (ViT-B-32, "
                              "tiny-shapes, ...); with --run, the run's head is folded on so it outputs class "
                              "logits, else it outputs embeddings", metavar="NAME")
    pretrained: Optional[str] = option(None, "teacher weights: open_clip tag, checkpoint file, or `random` (the "
                                             "architecture with random weights: right for speed and memory, "
                                             "never for accuracy)", metavar="TAG|PATH|random")
    exporter: str = option("torchscript", "torchscript: torch.onnx.export(dynamo=False), the proven path; dynamo: "
                                          "the torch.export-based exporter (opset >= 18)", choices=list(EXPORTERS))
    opset: int = option(0, "ONNX opset version; 0 = the exporter's proven default (torchscript 17, dynamo 18)")
    tolerance: float = option(1e-3, "parity: fail when max |onnxruntime - pytorch| > this x max(1, max |pytorch|)")
    parity_images: int = option(16, "real test images run through both PyTorch and ONNX Runtime")
    int8: bool = option(False, "also write an INT8 copy (ONNX Runtime static quantization, QDQ, per-channel int8 "
                               "weights) next to OUT as *.int8.onnx, with test accuracy before and after")
    int8_target: str = option("cpu", "cpu: uint8 activations, ONNX Runtime's fast CPU form; tensorrt: symmetric int8 "
                                     "activations, what TensorRT requires (on a CPU, about fp32 speed)",
                              choices=["cpu", "tensorrt"])
    calib_images: int = option(256, "INT8: training images used to calibrate the activation ranges")
    calib_method: str = option("minmax", "INT8: how ranges are picked from the calibration activations",
                               choices=["minmax", "entropy", "percentile"])
    eval_images: int = option(0, "INT8: test images for the accuracy before/after; 0 = the whole test split")
    max_drop: float = option(1.0, "INT8: fail when test accuracy drops by more than this many points")
    cache_dir: str = option("", "where datasets (and teachers) are cached; default: the run's", metavar="DIR")
    threads: int = option(0, "ONNX Runtime threads for the checks; 0 = its default")
    prompts: Optional[str] = option(None, "new classes without retraining: a text file, one prompt per class; the head "
                                          "of an embedding student (mse/cosine) is rebuilt from the run's teacher's "
                                          "text embeddings of these prompts", metavar="FILE")

    def __post_init__(self) -> None:
        check(bool(self.run) or bool(self.teacher), "run",
              "give the run folder of a student (--run runs/RUN) or a teacher (--teacher ViT-B-32)")
        if self.run:
            check(Path(self.run).is_dir(), "run", f"{self.run} is not a folder")
            run = RunDir(self.run)
            run.check_format()
            ck = run.checkpoint(self.checkpoint)
            check(ck.is_file(), "run", f"{ck} does not exist; is {self.run} a run made by `clipdistill train`, and "
                                       f"has it finished an epoch?")
        check(self.pretrained is None or bool(self.teacher), "pretrained", "only applies with --teacher")
        check(not self.out or not Path(self.out).is_dir(), "out",
              f"{self.out} is a folder; give the file to write, e.g. {Path(self.out) / 'model.onnx'}")
        check(self.size >= 0, "size", "must be >= 0 (0 = the trained size)")
        if self.opset == 0:
            self.opset = 18 if self.exporter == "dynamo" else 17
        check(7 <= self.opset <= 23, "opset", "must be between 7 and 23 (0 picks the proven default)")
        check(self.exporter != "dynamo" or self.opset >= 18, "opset", "the dynamo exporter needs opset 18 or more")
        check(self.tolerance > 0, "tolerance", "must be > 0")
        check(self.parity_images >= 1, "parity_images", "must be >= 1")
        check(not (self.int8 and self.teacher), "int8",
              "quantizes students only (calibrated on the run's training images); export the teacher without it")
        check(self.calib_images >= 1, "calib_images", "must be >= 1")
        check(self.eval_images >= 0, "eval_images", "must be >= 0 (0 = all)")
        check(self.max_drop >= 0, "max_drop", "must be >= 0")
        check(self.threads >= 0, "threads", "must be >= 0")
        self._check_bundle()
        if self.prompts is not None:
            from ..data.prompts import read_prompt_file

            read_prompt_file(self.prompts, "--prompts")  # copies refused, a single prompt warned
            check(bool(self.run) and not self.teacher, "prompts", "re-prompts a run's embedding student; give --run")
            check(not self.int8, "prompts", "the INT8 check measures accuracy on the run's own test labels, which "
                                            "new prompts do not have; export with --prompts first, without --int8")



# ----------------------------------------------------------------------------- the job

def default_out(cfg: ExportConfig, loaded: Loaded) -> Path:
    if cfg.out:
        return Path(cfg.out)
    if cfg.run:
        if cfg.teacher:
            return RunDir(cfg.run).teacher_onnx
        if cfg.prompts:
            return RunDir(cfg.run).path / f"model-{Path(cfg.prompts).stem}.onnx"
        return RunDir(cfg.run).onnx(loaded.info["input"]["size"], loaded.info["trained_size"])
    return Path(f"{cfg.teacher}{'-random' if cfg.pretrained == 'random' else ''}.onnx")


def export(cfg: ExportConfig) -> dict:
    """Write the ONNX file (and, with int8, its quantized copy); return what was done."""
    record = None
    run_cfg = None
    if cfg.run:
        loaded, record = load_student(cfg.run, cfg.checkpoint, cfg.size, cfg.prompts, cfg.cache_dir)
        run_cfg = record.config
    if cfg.teacher:
        cache = cfg.cache_dir or (run_cfg or {}).get("cache_dir") or default_cache_dir()
        # With --run, the weights default to the ones the run distilled from: its head fits only those.
        pretrained = cfg.pretrained if cfg.pretrained is not None else (run_cfg or {}).get("pretrained")
        loaded = load_teacher_encoder(cfg.teacher, pretrained, cache, record)
        if cfg.size and cfg.size != loaded.info["trained_size"]:
            raise ConfigError(f"--size {cfg.size}: {cfg.teacher} takes {loaded.info['trained_size']} px only "
                              f"(its position embeddings are fixed); leave --size out")
    out = default_out(cfg, loaded)
    info = loaded.info
    size = info["input"]["size"]
    x, where = parity_inputs(loaded, run_cfg, cfg.parity_images, cfg.cache_dir)
    with torch.no_grad():
        reference = loaded.module(torch.from_numpy(x)).numpy()
    out.parent.mkdir(parents=True, exist_ok=True)
    for p in atomic.remove_stale_temporaries(out.parent):
        log.info("removed %s, left by a killed export", p)
    result: dict = {"path": str(out), "sidecar": str(sidecar_path(out))}
    with converted(loaded.module, x, reference, out.parent, "export", cfg.exporter, cfg.opset, cfg.tolerance,
                   f" ({cfg.exporter} exporter, opset {cfg.opset})", cfg.threads) as onnx_file:
        tmp_path, sess, exp, parity = onnx_file.path, onnx_file.session, onnx_file.exporter, onnx_file.parity
        # The batch axis must really be free: one image alone gives the same numbers.
        check_parity(reference[:1], run_batches(sess, x[:1], 1), cfg.tolerance, " at batch 1")
        parity.update({"inputs": where, "batch_sizes": [int(len(x)), 1], "backend": "onnxruntime CPU"})
        info = {**info, "format": FORMAT, "precision": "fp32", "exporter": exp, "parity": parity,
                "onnxruntime": __import__("onnxruntime").__version__}
        log.info("parity: max abs diff %.3g over %d %s images (tolerance %.3g), top-1 agreement %.1f%%",
                 parity["max_abs_diff"], parity["images"], where, parity["tolerance"], parity["top1_agreement"] or 0)
        if cfg.int8:
            result["int8"] = _int8(cfg, run_cfg, info, tmp_path, sess, out)
        write(tmp_path, out, info)
    log.info("wrote %s (%s %s, %d px, %s %s; %s) and %s", out, info["role"], info["name"], size, info["output"],
             info.get("num_classes") or info.get("embed_dim"), exp["call"], sidecar_path(out).name)
    if cfg.prompts:
        _say_reject(out, info["reject_calibration"])
    if info["role"] == "student" and size != info["trained_size"]:
        log.warning("note: the student learnt at %d px; at %d px it computes the same network (speed and memory at "
                    "this size are right) but its accuracy does not carry over: deploy the %d px export, or train "
                    "at %d px (--student-size %d)", info["trained_size"], size, info["trained_size"], size, size)
    result.update({"parity": parity, "info": info})
    if result.get("int8") and result["int8"]["accuracy_drop"] > cfg.max_drop:
        q = result["int8"]
        raise AccuracyDropError(
            f"INT8 lost {q['accuracy_drop']:.2f} points of test accuracy ({q['accuracy_fp32']:.2f}% -> "
            f"{q['accuracy_int8']:.2f}%), more than --max-drop {cfg.max_drop}; {q['path']} was written for "
            f"inspection. Try more --calib-images, --calib-method percentile or entropy.")
    result["bundle"] = write_for(cfg, [out] + ([Path(result["int8"]["path"])] if result.get("int8") else []))
    return result


def _say_reject(out: Path, cal: dict) -> None:
    """A re-prompted model that never rejects says so, with why and how to get a threshold."""
    if cal.get("why"):
        log.warning("warning: %s: %s; every image gets one of the new classes (reject threshold 0). To get a "
                    "threshold: %s", out, cal["why"], cal["how"])


def _int8(cfg: ExportConfig, run_cfg: dict, info: dict, fp32_path: Path, fp32_sess, out: Path) -> dict:
    from .quantize import quantize_int8

    q_out = int8_path(out, cfg.int8_target)
    calib = calibration_images(run_cfg, info, cfg.calib_images, cfg.cache_dir)
    with atomic.temporary_folder(out.parent, "int8") as tmp:
        q_tmp = tmp / "model.int8.onnx"
        log.info("int8 (%s): calibrating on %d training images (%s)", cfg.int8_target, len(calib), cfg.calib_method)
        qinfo = quantize_int8(fp32_path, q_tmp, calib, cfg.int8_target, cfg.calib_method)
        try:
            test, labels = split_images(run_cfg, "test", cfg.cache_dir, info["trained_size"])
            eval_split = f"{run_cfg['dataset']} test"
        except MissingSplitError:  # a pool with no labelled images: how many predictions change
            test, labels = split_images(run_cfg, run_cfg["data"][0], cfg.cache_dir, info["trained_size"])
            labels = np.full(len(test), -1, dtype=np.int64)
            eval_split = f"{run_cfg['data'][0]} images (no labels: the drop is the share of changed predictions)"
        pick = subset(len(test), cfg.eval_images or (0 if (labels >= 0).any() else 1000), seed=0)
        x = prepare(test[pick], info["input"])
        t0 = time.time()
        acc32, p32 = onnx_accuracy(fp32_sess, x, labels[pick])
        acc8, p8 = onnx_accuracy(session(q_tmp, cfg.threads), x, labels[pick])
        drop = acc32 - acc8 if (labels >= 0).any() else percent(p32 != p8)
        q = {"path": str(q_out), "target": cfg.int8_target, "accuracy_fp32": acc32, "accuracy_int8": acc8,
             "accuracy_drop": drop, "agreement_with_fp32": agreement(p32, p8),
             "eval_images": int(len(pick)), "eval_split": eval_split, "max_drop": cfg.max_drop,
             "within_bound": bool(drop <= cfg.max_drop), **qinfo}
        log.info("int8 (%s): test accuracy %.2f%% (fp32 ONNX) -> %.2f%% (int8), %+.2f points on %d images (allowed "
                 "drop: %g), top-1 agreement %.1f%% [%.1f s]", cfg.int8_target, acc32, acc8, -drop, len(pick),
                 cfg.max_drop, q["agreement_with_fp32"], time.time() - t0)
        if not q["within_bound"]:  # kept for inspection, under a name nothing picks up by mistake
            q_out.unlink(missing_ok=True)
            q_out = q_out.with_name(q_out.name[:-len(".onnx")] + ".rejected.onnx")
            q["path"] = str(q_out)
        q_info = {**info, "precision": "int8", "quantization": q, "fp32_model": out.name,
                  "accuracy": {**info.get("accuracy", {}), "onnx_fp32_test_accuracy": acc32,
                               "onnx_int8_test_accuracy": acc8, "eval_images": int(len(pick))}}
        write(q_tmp, q_out, q_info)
    info["int8_model"] = q_out.name
    info["accuracy"] = {**info.get("accuracy", {}), "onnx_fp32_test_accuracy": acc32, "eval_images": int(len(pick))}
    log.info("wrote %s and %s", q_out, sidecar_path(q_out).name)
    return q

