"""`clipdistill export`: a student (or a teacher's image encoder) as one ONNX file.

What the file computes is what the user gets from it: normalised pixels in (dynamic batch,
fixed side), class logits out. An "embedding" student has its teacher head (text or
linear probe) folded into the graph, so no teacher is needed at run time. How to make the
input — side, mean/std, resize rule — and what the outputs mean — class names, prompts,
the teacher, the accuracy — are written into the ONNX metadata (key `clipdistill`, read by
`predict` with ONNX Runtime alone) and into a JSON sidecar beside it.

Every export is checked: ONNX Runtime and PyTorch run the same real test images, the
largest difference is printed, and past `--tolerance` nothing is written. The exporter
is explicit: TorchScript (`torch.onnx.export(dynamo=False)`, opset 17) by default, the
dynamo exporter on request; the choice is recorded in the metadata.

`--int8` adds a statically quantized copy (see quantize.py) calibrated on the run's own
training images, and reports test accuracy before and after.

`--prompts` gives an embedding student new classes (`reprompt`). The reject threshold the run
had (fit-prompts' calibration.json) was measured for the old prompts, so a new one is
calibrated for the new prompts as fit-prompts calibrates its own (`calibrate_reprompted`): the
teacher's cached embeddings of the run's images say which ones match a new prompt, and the
student's top probability on those images gives the threshold that best reproduces that call.
Without those embeddings there is nothing to calibrate on, and a threshold that reproduces the
call barely better than chance would reject good images as often as others; in both cases the
model never answers "none of these", and the export says so (log and sidecar), why, and how to
get a threshold. The prompt
file is checked as fit-prompts checks its own (`data.prompts.read_prompt_file`)."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from ..core import atomic
from ..core.config import check, default_cache_dir, option
from ..core.errors import ClipDistillError, ConfigError, MissingResourceError, MissingSplitError
from ..distill import checkpoint
from ..distill.rundir import RunDir
from ..teacher.heads import build_head, head_spec
from .predict import METADATA_KEY, run_batches, session

log = logging.getLogger(__name__)

FORMAT = "clipdistill-onnx/1"
EXPORTERS = ("torchscript", "dynamo")


class ParityError(ClipDistillError):
    """ONNX Runtime does not compute what PyTorch computes."""


class AccuracyDropError(ClipDistillError):
    """INT8 lost more accuracy than allowed."""


@dataclasses.dataclass
class ExportConfig:
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
        if self.prompts is not None:
            from ..data.prompts import read_prompt_file

            read_prompt_file(self.prompts, "--prompts")  # copies refused, a single prompt warned
            check(bool(self.run) and not self.teacher, "prompts", "re-prompts a run's embedding student; give --run")
            check(not self.int8, "prompts", "the INT8 check measures accuracy on the run's own test labels, which "
                                            "new prompts do not have; export with --prompts first, without --int8")


# ----------------------------------------------------------------------------- modules

class _ImageEncoder(nn.Module):
    """open_clip's `encode_image` as a module: raw (un-normalised) embeddings, as cached."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(x)


class Deployable(nn.Module):
    """What the ONNX file computes: normalised pixels -> encoder -> (head) -> output."""

    def __init__(self, encoder: nn.Module, head: Optional[nn.Module] = None):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.encoder(x)
        return self.head(y) if self.head is not None else y


def build_module(arch: dict) -> nn.Module:
    """The exported architecture with random weights: the same speed and memory as the
    trained one, which is all `bench --backend torch` needs (it holds no checkpoint)."""
    if arch["kind"] == "timm":
        from ..distill.students import create_student

        enc = create_student(arch["name"], arch["out_dim"])
    elif arch["kind"] == "open_clip":
        import open_clip

        from ..teacher.tiny import register_model_configs

        register_model_configs()
        enc = _ImageEncoder(open_clip.create_model(arch["name"], pretrained=None))
    else:
        raise ConfigError(f"unknown architecture kind {arch['kind']!r}")
    return Deployable(enc, build_head(arch.get("head"))).eval()


@dataclasses.dataclass
class Loaded:
    """A model ready to export, with everything the metadata will say about it."""

    module: nn.Module
    info: dict  # role, name, arch, output, classes, input spec, ...


def _student_input(size: int, mean: float, std: float) -> dict:
    return {"name": "input", "layout": "NCHW", "dtype": "float32", "channels": "RGB", "size": int(size),
            "scale": "pixels / 255, then (x - mean) / std", "mean": [float(mean)] * 3, "std": [float(std)] * 3,
            "resize": "stretch", "interpolation": "bilinear"}


def load_student(run: str | Path, which: str = "best", size: int = 0, prompts: Optional[str] = None,
                 cache_dir: str = "") -> tuple[Loaded, dict]:
    """(the student with its head folded in, the raw checkpoint). With `prompts`, an embedding
    student's head is rebuilt for those prompts (`reprompt`)."""
    from ..distill.students import create_student

    rundir = RunDir(run)
    path = rundir.checkpoint(which)
    state = checkpoint.load(path)
    if state is None:
        raise MissingResourceError(f"{path} does not exist; train the run first")
    cfg = state["config"]
    output, n_cls, dim = state["output"], int(state["num_classes"]), int(state["embed_dim"])
    out_dim = n_cls if output == "logits" else dim
    student = create_student(cfg["student"], out_dim)
    checkpoint.load_model(student, state, path)
    spec, head = None, None
    if output == "embedding":
        th = state["teacher_head"]
        spec = head_spec(th["kind"], n_cls, dim, th.get("logit_scale"))
        head = build_head(spec, th["state_dict"])
    elif output != "logits":
        raise ConfigError(f"{path}: unknown student output {output!r}")
    trained = int(state["size"])
    side = size or trained
    result = rundir.read_result() or {}
    calibration = atomic.read_json(rundir.path / "calibration.json") if (rundir.path / "calibration.json").is_file() \
        else None
    new_head = None
    if prompts is not None:
        new_head = reprompt(state, prompts, cache_dir or cfg.get("cache_dir") or default_cache_dir())
        state, spec, head = new_head.state, new_head.spec, new_head.head
        n_cls = int(state["num_classes"])
        result, calibration = {}, None  # measured for the old classes
    info = {
        "role": "student", "name": cfg["student"], "output": "logits", "student_output": output,
        "head": spec["kind"] if spec else "none",
        "arch": {"kind": "timm", "name": cfg["student"], "out_dim": out_dim, "head": spec},
        "num_classes": n_cls, "embed_dim": dim, "classes": list(state["classes"]),
        "prompts": list(state.get("prompts") or []), "teacher": state.get("teacher"),
        "method": state.get("method"), "dataset": cfg.get("dataset"), "trained_size": trained,
        "input": _student_input(side, cfg["student_mean"], cfg["student_std"]),
        "accuracy": {k: result[k] for k in ("test_accuracy", "teacher_agreement", "teacher_test_accuracy", "n_test")
                     if k in result} | ({"source": "result.json (PyTorch, best checkpoint)"} if result else {}),
        "source": {"kind": "run", "run": str(Path(run).resolve()), "checkpoint": which, "epoch": state.get("epoch"),
                   **({"prompts": str(prompts)} if prompts is not None else {})},
    }
    module = Deployable(student, head).eval()
    if new_head is not None:
        calibration = calibrate_reprompted(module, info, cfg, new_head)
    if calibration and isinstance(calibration.get("reject_threshold"), (int, float)):
        info["reject_threshold"] = float(calibration["reject_threshold"])
        info["reject_calibration"] = calibration
    return Loaded(module, info), state


@dataclasses.dataclass
class NewHead:
    """What `reprompt` makes: the re-headed checkpoint, and the teacher and text embeddings that
    made it (the reject threshold is calibrated with them)."""

    state: dict
    spec: dict
    head: nn.Module
    teacher: object
    text: np.ndarray  # (classes, dim), normalised
    cache_dir: str
    prompts: list


def reprompt(state: dict, prompts: str, cache_dir: str) -> NewHead:
    """An embedding student's checkpoint with a text head for new prompts: the student learnt
    the teacher's image embedding, so any prompts the teacher can read are a head for it."""
    from ..data.prompts import read_prompt_file
    from ..teacher.openclip_teacher import create_teacher
    from ..teacher.outputs import text_embeddings

    if state["output"] != "embedding":
        raise ConfigError(f"--prompts: this student learnt class logits ({state.get('method')}), not the teacher's "
                          f"embedding; only an embedding student (--method mse or cosine) can take new prompts. "
                          f"Train one, or distil again with these prompts")
    lines = read_prompt_file(prompts, "--prompts", warn=False)  # warned when the config was made
    tcfg = state["config"]
    fp = state.get("teacher") or {}
    teacher = create_teacher(tcfg["teacher"], tcfg.get("pretrained"), "cpu", fp.get("precision", "fp32"), cache_dir)
    if fp and teacher.fingerprint() != fp:
        raise ConfigError(f"--prompts: the run's teacher ({fp.get('model')}, {fp.get('weights')}) is not what loads "
                          f"here ({teacher.fingerprint().get('weights')}); give --cache-dir where it is")
    text = text_embeddings(teacher, lines, None, cache_dir)
    if text.shape[1] != int(state["embed_dim"]):
        raise ConfigError(f"--prompts: the teacher's text embeddings are {text.shape[1]}-d, the student's "
                          f"{state['embed_dim']}-d")
    scale = float(state["teacher_head"].get("logit_scale") or teacher.logit_scale)
    spec = head_spec("text", len(lines), int(state["embed_dim"]), scale)
    head = build_head(spec, {"text": text})
    new = {**state, "num_classes": len(lines), "classes": lines, "prompts": lines,
           "teacher_head": {"kind": "text", "state_dict": head.state_dict(), "logit_scale": scale}}
    log.info("re-prompted: %d classes from %s (%s text embeddings, logit scale %.1f)", len(lines), prompts,
             fp.get("model"), scale)
    return NewHead(new, spec, head, teacher, text.numpy().astype(np.float32), cache_dir, lines)


def _run_dataset(run_cfg: dict, split: str, cache_dir: str):
    """One split of the run's dataset, opened as training opened it (data.options.DataOptions)."""
    from ..data.datasets import create_dataset, default_data_root

    root = run_cfg.get("data_root") or ("" if run_cfg.get("pool") else default_data_root(cache_dir))
    return create_dataset(run_cfg["dataset"], split, root, run_cfg.get("image_size", 32),
                          run_cfg.get("max_images", 0), tuple(run_cfg.get("pool") or ()), cache_dir)


def _cached_splits(run_cfg: dict, teacher, cache_dir: str) -> dict:
    """split -> (dataset, its complete embedding cache, readable rows) for the run's splits whose
    teacher embeddings are in `cache_dir` (none is computed here: that is `clipdistill embed`'s job)."""
    from ..teacher.cache import EmbeddingCache, cache_path

    cached = {}
    for split in dict.fromkeys([*(run_cfg.get("data") or ["train"]), "test"]):
        try:
            ds = _run_dataset(run_cfg, split, cache_dir)
            cache = EmbeddingCache.load(cache_path(cache_dir, teacher.slug, ds.slug(), split), teacher.fingerprint(),
                                        ds.fingerprint())
        except (ClipDistillError, OSError) as e:  # missing, incomplete, damaged or another teacher's
            log.debug("no teacher embeddings of the run's %s split to calibrate on: %s", split, e)
            continue
        cached[split] = (ds, cache, cache.valid_indices())
    return cached


def _never_rejects(why: str, how: str) -> dict:
    return {"reject_threshold": 0.0, "score": "top softmax probability of the model's output",
            "why": f"this model never answers 'none of these': {why}", "how": how}


WEAK_AGREEMENT = 70.0  # balanced agreement (%, 50 = chance) under which a threshold is not shipped


def calibrate_reprompted(module: nn.Module, info: dict, run_cfg: dict, new: NewHead, max_images: int = 512,
                         seed: int = 0) -> dict:
    """The reject threshold for new prompts, found as fit-prompts finds its own (fit/quality.py):
    the teacher's best-prompt cosine similarity over every cached image of the run, split in two
    by Otsu's cut, is its "matches a prompt" call; the threshold on the student's top probability
    that best reproduces that call on up to `max_images` images is the model's. The images are the
    run's test split (never trained on) when it has enough, else its training images (the record
    says which). A threshold that reproduces the call at under WEAK_AGREEMENT balanced agreement
    would reject about as many images of the new classes as of others (a student that learnt the
    teacher loosely): it is not shipped, only named. Without the run's cached embeddings there is
    nothing to calibrate on. Either way the record says the model never rejects, why, and how to
    get a threshold."""
    from ..teacher.curate import best_similarity
    from .predict import calibrate_reject, otsu, softmax

    cached = _cached_splits(run_cfg, new.teacher, new.cache_dir)
    if not cached:
        return _never_rejects(
            f"the teacher embeddings of the run's images, which calibrate the threshold for new prompts, are not in "
            f"{new.cache_dir}",
            f"export again with --cache-dir set to where the run was trained ({run_cfg.get('cache_dir')}) or where "
            f"`clipdistill embed` has embedded its splits; or give `clipdistill predict --reject P` a probability "
            f"yourself")
    pool = np.concatenate([best_similarity(np.asarray(c.embeddings[v], dtype=np.float32), new.text)
                           for _, c, v in cached.values()])
    cut = otsu(pool)
    held = ["test"] if "test" in cached and len(cached["test"][2]) >= 50 else list(cached)
    rows = [(s, r) for s in held for r in cached[s][2]]
    pick = [rows[i] for i in _subset(len(rows), max_images, seed)]
    emb, pixels = [], []
    for s in held:
        ds, cache, _ = cached[s]
        r = np.asarray([row for split, row in pick if split == s], dtype=np.int64)
        emb.append(np.asarray(cache.embeddings[r], dtype=np.float32))
        pixels.append(ds.pixels(info["trained_size"])[r])
    x = torch.from_numpy(_student_pixels(np.concatenate(pixels), info))
    with torch.no_grad():
        logits = torch.cat([module(x[i:i + 128]) for i in range(0, len(x), 128)]).numpy()
    match = best_similarity(np.concatenate(emb), new.text) >= cut
    top = softmax(logits.astype(np.float64)).max(1)
    cal = calibrate_reject(top, match)
    where = (f"{len(pick)} images of the run's test split (never trained on)" if held == ["test"] else
             f"{len(pick)} of the run's training images ({', '.join(held)}: the student learnt the teacher on them, so "
             f"the threshold may reject too little)")
    record = {"reject_threshold": cal["reject_threshold"], "score": "top softmax probability of the model's output",
              "calibrated_on": f"{where}, against the teacher's similarity cut {cut:.3f} (Otsu, over {len(pool)} "
                               f"cached images of the run; {float(match.mean() * 100):.0f}% of the images match a "
                               f"prompt)",
              "balanced_agreement": cal["balanced_agreement"], "prompts": list(new.prompts),
              "rejected_share_held_out": float((top < cal["reject_threshold"]).mean() * 100)}
    if not cal["reject_threshold"] > 0:
        record.update(_never_rejects(cal.get("why") or "no threshold on its top probability reproduces the teacher's "
                                     "'matches a prompt' call better than accepting every image",
                                     "add a prompt for what else the images show, or give `clipdistill predict "
                                     "--reject P` a probability yourself"))
        return record
    if cal["balanced_agreement"] < WEAK_AGREEMENT:  # a threshold that rejects about as many good images as others
        record.update(_never_rejects(
            f"its top probability follows the teacher's 'matches a new prompt' call at only "
            f"{cal['balanced_agreement']:.1f}% balanced agreement (50% = chance; {WEAK_AGREEMENT:.0f}% wanted), so any "
            f"threshold rejects about as many images of the new classes as of others",
            f"distil longer or on images like these (the student learnt the teacher's embedding too loosely), or use "
            f"the best threshold found anyway with `clipdistill predict --reject {cal['reject_threshold']:.4f}` (it "
            f"rejects {record['rejected_share_held_out']:.0f}% of the images it was calibrated on)"))
        record["weak_threshold"] = cal["reject_threshold"]
        return record
    log.info("reject threshold for the new prompts: top probability %.3f (%s; reproduces the teacher's 'none of "
             "these' call at %.1f%% balanced agreement, rejects %.0f%% of those images)", cal["reject_threshold"],
             record["calibrated_on"], cal["balanced_agreement"], record["rejected_share_held_out"])
    return record


def _clip_input(preprocess, size: int) -> dict:
    """Side, mean/std and resize rule read from open_clip's own transform."""
    spec = {"name": "input", "layout": "NCHW", "dtype": "float32", "channels": "RGB", "size": int(size),
            "scale": "pixels / 255, then (x - mean) / std", "mean": [0.48145466, 0.4578275, 0.40821073],
            "std": [0.26862954, 0.26130258, 0.27577711], "resize": "stretch", "interpolation": "bicubic"}
    crop = False
    for t in getattr(preprocess, "transforms", []):
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


def load_teacher_encoder(name: str, pretrained: Optional[str], cache_dir: str, run_state: Optional[dict] = None
                         ) -> Loaded:
    """The teacher's image encoder (plus the run's head when a run is given)."""
    import open_clip

    from ..teacher.tiny import register_model_configs

    register_model_configs()
    if pretrained == "random":
        if name not in open_clip.list_models():
            raise ConfigError(f"--teacher {name!r} is not an open_clip model")
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
        fingerprint = {"model": name, "weights": "random (architecture only: speed and memory, not accuracy)",
                       "preprocess": repr(preprocess), "precision": "fp32"}
    else:
        from ..teacher.openclip_teacher import create_teacher

        t = create_teacher(name, pretrained, device="cpu", precision="fp32", cache_dir=cache_dir)
        model, preprocess, fingerprint = t.model, t.preprocess, t.fingerprint()
    model = model.float().eval()
    size = model.visual.image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    spec, head, info = None, None, {}
    if run_state is not None:
        run_teacher = (run_state.get("teacher") or {}).get("model")
        if run_teacher != name:
            raise ConfigError(f"--teacher {name}: the run was distilled from {run_teacher}; its head only fits that "
                              f"teacher's embeddings (export {run_teacher}, or leave --run out for embeddings)")
        run_weights = (run_state.get("teacher") or {}).get("weights")
        if pretrained != "random" and run_weights is not None and run_weights != fingerprint.get("weights"):
            raise ConfigError(f"--pretrained: the run was distilled from {name} weights {run_weights}, not "
                              f"{fingerprint.get('weights')}; its head only fits those (leave --pretrained out "
                              f"to use the run's)")
        th = run_state["teacher_head"]
        spec = head_spec(th["kind"], run_state["num_classes"], run_state["embed_dim"], th.get("logit_scale"))
        head = build_head(spec, th["state_dict"])
        info = {"classes": list(run_state["classes"]), "prompts": list(run_state.get("prompts") or []),
                "num_classes": int(run_state["num_classes"]), "dataset": run_state["config"].get("dataset")}
    return Loaded(Deployable(_ImageEncoder(model), head).eval(), {
        "role": "teacher", "name": name, "output": "logits" if head is not None else "embedding",
        "head": spec["kind"] if spec else "none",
        "arch": {"kind": "open_clip", "name": name, "head": spec},
        "teacher": fingerprint, "embed_dim": int(getattr(model.visual, "output_dim", 0) or 0) or None,
        "trained_size": size, "input": _clip_input(preprocess, size),
        "source": {"kind": "open_clip", "name": name, "pretrained": pretrained}, **info})


# ----------------------------------------------------------------------------- data

def _data_root(cfg: dict, cache_dir: str) -> str:
    from ..data.datasets import default_data_root

    if cfg.get("data_root"):
        return cfg["data_root"]
    return default_data_root(cache_dir or cfg.get("cache_dir") or default_cache_dir())


def _split(cfg: dict, split: str, cache_dir: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images N,H,W,3 at the run's native size, labels) of one split of the run's dataset."""
    from ..data.datasets import create_dataset

    root = _data_root(cfg, cache_dir) if cfg.get("data_root") or not cfg.get("pool") else ""
    ds = create_dataset(cfg["dataset"], split, root, image_size=cfg.get("image_size", 32),
                        pools=tuple(cfg.get("pool") or ()), cache_dir=cache_dir or cfg.get("cache_dir"))
    return ds.pixels(size), np.asarray(ds.targets, dtype=np.int64)


def _shapes10_test(n: int, size: int) -> np.ndarray:
    """Real (rendered) images for a check when the run's own data is not on this machine."""
    from ..data.shapes10 import SPLITS, generate

    return generate("test", n, size, SPLITS["test"].seed)[0]


def _student_pixels(images_u8: np.ndarray, info: dict) -> np.ndarray:
    from ..data.pixels import normalize_uint8

    spec = info["input"]
    with torch.no_grad():
        x = normalize_uint8(torch.from_numpy(np.ascontiguousarray(images_u8)), spec["mean"], spec["std"],
                            spec["size"])
    return x.numpy()


def _teacher_pixels(images_u8: np.ndarray, preprocess_spec: dict) -> np.ndarray:
    """The teacher's own pipeline, in the form `predict` replays (PIL resize + crop)."""
    from PIL import Image

    from .predict import preprocess

    return np.stack([preprocess(Image.fromarray(im), preprocess_spec) for im in images_u8])


def parity_inputs(loaded: Loaded, run_cfg: Optional[dict], n: int, cache_dir: str) -> tuple[np.ndarray, str]:
    """`n` real test images, prepared as the model expects, and where they came from."""
    images, where = None, ""
    if run_cfg is not None:
        try:
            test, _ = _split(run_cfg, "test", cache_dir, loaded.info.get("trained_size"))
            images, where = test[:n], f"{run_cfg['dataset']} test"
        except (MissingResourceError, ConfigError, OSError) as e:
            log.warning("warning: the run's test images are not available here (%s); checking parity on shapes10 "
                        "images", e)
    if images is None:
        images, where = _shapes10_test(n, 96), "shapes10 test (rendered)"
    if loaded.info["role"] == "student":
        return _student_pixels(images, loaded.info), where
    return _teacher_pixels(images, loaded.info["input"]), where


# ----------------------------------------------------------------------------- ONNX

def _torch_to_onnx(module: nn.Module, example: torch.Tensor, path: Path, exporter: str, opset: int) -> dict:
    names = {"input_names": ["input"], "output_names": ["output"],
             "dynamic_axes": {"input": {0: "batch"}, "output": {0: "batch"}}}
    t0 = time.time()
    # nn.MultiheadAttention's inference fast path (a fused op, taken under no_grad) has no
    # ONNX form; the plain path computes the same thing.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        _export_call(module, example, path, exporter, opset, names)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return {"name": exporter, "call": f"torch.onnx.export(dynamo={exporter == 'dynamo'}, opset_version={opset})",
            "opset": opset, "torch": torch.__version__, "seconds": round(time.time() - t0, 2)}


def _export_call(module: nn.Module, example: torch.Tensor, path: Path, exporter: str, opset: int, names: dict):
    with warnings.catch_warnings():
        # The exporter was chosen on purpose (recorded in the metadata); its deprecation and
        # tracer chatter would only bury the parity line that tells whether it worked.
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=opset,
                              do_constant_folding=True, **names)
        else:
            import contextlib

            # It reports its progress with print(): keep stdout for the command's own output (--json).
            with contextlib.redirect_stdout(sys.stderr):
                prog = torch.onnx.export(module, (example,), None, dynamo=True, opset_version=opset, verbose=False,
                                         **names)
                prog.save(str(path))


def check_parity(reference: np.ndarray, got: np.ndarray, tolerance: float, what: str = "",
                 envelope: float = 0.0) -> dict:
    """Raise ParityError when ONNX Runtime's output is not PyTorch's (NaN included). `envelope`:
    how far PyTorch's own output moves under another summation order (quantized graphs, see
    compress.rounding_envelope), allowed on top of the tolerance."""
    diff = float(np.max(np.abs(reference.astype(np.float64) - got.astype(np.float64))))
    scale = max(1.0, float(np.max(np.abs(reference))))
    allowed = tolerance * scale + envelope
    info = {"max_abs_diff": diff, "tolerance": tolerance * scale, "images": int(len(reference)),
            "top1_agreement": float((reference.argmax(1) == got.argmax(1)).mean() * 100) if reference.ndim == 2
            else None}
    if envelope:
        info["rounding_envelope"] = envelope
    if not diff <= allowed:
        more = f" + {envelope:.3g}, PyTorch's own spread under another summation order" if envelope else ""
        raise ParityError(f"ONNX Runtime and PyTorch differ by up to {diff:.3g} on {len(reference)} images{what} "
                          f"(allowed: {allowed:.3g} = --tolerance {tolerance} x max(1, max |output| "
                          f"{scale:.3g}){more}); nothing was written. Try the other --exporter (torchscript, dynamo) "
                          f"or another --opset.")
    return info


def sidecar_path(onnx_path: str | Path) -> Path:
    return Path(onnx_path).with_suffix(".json")


def _write(model_path: Path, out: Path, info: dict) -> None:
    """Metadata in, then the file and its sidecar, each written atomically."""
    import onnx

    model = onnx.load(str(model_path))
    flat = {METADATA_KEY: json.dumps(info, default=str), "format": FORMAT, "role": info["role"],
            "output": info["output"], "precision": info["precision"], "image_size": str(info["input"]["size"]),
            "mean": json.dumps(info["input"]["mean"]), "std": json.dumps(info["input"]["std"]),
            "resize": info["input"]["resize"], "exporter": info["exporter"]["call"],
            "opset": str(info["exporter"]["opset"])}
    if "classes" in info:
        flat["classes"] = json.dumps(info["classes"])
    keep = [p for p in model.metadata_props if p.key not in flat]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for k, v in flat.items():
        model.metadata_props.add(key=k, value=v)
    model.doc_string = f"clipdistill {info['role']} {info['name']} ({info['precision']}): {info['output']} out"
    atomic.write_bytes(out, model.SerializeToString())
    atomic.write_json(sidecar_path(out), info)


def int8_path(out: Path, target: str) -> Path:
    return out.with_name(out.stem + (".int8.onnx" if target == "cpu" else f".int8-{target}.onnx"))


def _subset(n_total: int, n: int, seed: int) -> np.ndarray:
    if n <= 0 or n >= n_total:
        return np.arange(n_total)
    return np.sort(np.random.default_rng(seed).permutation(n_total)[:n])


def calibration_images(run_cfg: dict, info: dict, n: int, cache_dir: str, seed: int = 0) -> np.ndarray:
    """`n` images drawn (seeded) from the splits the student was trained on, prepared."""
    parts = []
    for split in run_cfg.get("data") or ["train"]:
        imgs, _ = _split(run_cfg, split, cache_dir, info["trained_size"])
        parts.append(imgs)
    counts = np.array([len(p) for p in parts])
    pick = _subset(int(counts.sum()), n, seed)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    chosen = [parts[k][pick[(pick >= offsets[k]) & (pick < offsets[k + 1])] - offsets[k]] for k in range(len(parts))]
    return _student_pixels(np.concatenate(chosen), info)


def onnx_accuracy(sess, x: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """(top-1 accuracy in percent over labelled rows, predictions)."""
    pred = run_batches(sess, x, 64).argmax(1)
    keep = labels >= 0
    return (float((pred[keep] == labels[keep]).mean() * 100) if keep.any() else float("nan")), pred


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
    state = None
    run_cfg = None
    if cfg.run:
        loaded, state = load_student(cfg.run, cfg.checkpoint, cfg.size, cfg.prompts, cfg.cache_dir)
        run_cfg = state["config"]
    if cfg.teacher:
        cache = cfg.cache_dir or (run_cfg or {}).get("cache_dir") or default_cache_dir()
        # With --run, the weights default to the ones the run distilled from: its head fits only those.
        pretrained = cfg.pretrained if cfg.pretrained is not None else (run_cfg or {}).get("pretrained")
        loaded = load_teacher_encoder(cfg.teacher, pretrained, cache, state)
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
    with atomic.temporary_folder(out.parent, "export") as tmp:
        tmp_path = tmp / "model.onnx"
        exp = _torch_to_onnx(loaded.module, torch.from_numpy(x[:2]), tmp_path, cfg.exporter, cfg.opset)
        sess = session(tmp_path, cfg.threads)
        got = run_batches(sess, x, len(x))
        parity = check_parity(reference, got, cfg.tolerance, f" ({cfg.exporter} exporter, opset {cfg.opset})")
        # The batch axis must really be free: one image alone gives the same numbers.
        check_parity(reference[:1], run_batches(sess, x[:1], 1), cfg.tolerance, " at batch 1")
        parity.update({"inputs": where, "batch_sizes": [int(len(x)), 1], "backend": "onnxruntime CPU"})
        info = {**info, "format": FORMAT, "precision": "fp32", "exporter": exp, "parity": parity,
                "onnxruntime": __import__("onnxruntime").__version__}
        log.info("parity: max abs diff %.3g over %d %s images (tolerance %.3g), top-1 agreement %.1f%%",
                 parity["max_abs_diff"], parity["images"], where, parity["tolerance"], parity["top1_agreement"] or 0)
        if cfg.int8:
            result["int8"] = _int8(cfg, run_cfg, info, tmp_path, sess, out)
        _write(tmp_path, out, info)
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
            test, labels = _split(run_cfg, "test", cfg.cache_dir, info["trained_size"])
            eval_split = f"{run_cfg['dataset']} test"
        except MissingSplitError:  # a pool with no labelled images: how many predictions change
            test, labels = _split(run_cfg, run_cfg["data"][0], cfg.cache_dir, info["trained_size"])
            labels = np.full(len(test), -1, dtype=np.int64)
            eval_split = f"{run_cfg['data'][0]} images (no labels: the drop is the share of changed predictions)"
        pick = _subset(len(test), cfg.eval_images or (0 if (labels >= 0).any() else 1000), seed=0)
        x = _student_pixels(test[pick], info)
        t0 = time.time()
        acc32, p32 = onnx_accuracy(fp32_sess, x, labels[pick])
        acc8, p8 = onnx_accuracy(session(q_tmp, cfg.threads), x, labels[pick])
        drop = acc32 - acc8 if (labels >= 0).any() else float((p32 != p8).mean() * 100)
        q = {"path": str(q_out), "target": cfg.int8_target, "accuracy_fp32": acc32, "accuracy_int8": acc8,
             "accuracy_drop": drop, "agreement_with_fp32": float((p32 == p8).mean() * 100),
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
        _write(q_tmp, q_out, q_info)
    info["int8_model"] = q_out.name
    info["accuracy"] = {**info.get("accuracy", {}), "onnx_fp32_test_accuracy": acc32, "eval_images": int(len(pick))}
    log.info("wrote %s and %s", q_out, sidecar_path(q_out).name)
    return q


# ----------------------------------------------------------------------------- CLI

def run_cli(cfg: ExportConfig, args) -> int:
    res = export(cfg)
    if args.json:
        print(json.dumps({k: v for k, v in res.items() if k != "info"}, default=str))
    return 0
