"""What an ONNX file is made from: a run's student with its head folded in, or a teacher's image
encoder, each with what its metadata will say (`Loaded.info`: role, architecture, classes, the
input record, the accuracy measured in PyTorch, where it came from).

What the file computes is what the user gets from it: normalised pixels in, class logits out.
An "embedding" student has its teacher head (text or linear probe) folded into the graph, so
no teacher is needed at run time; with `prompts`, that head is rebuilt for new classes
(reprompt.py). A teacher exported with a run gets the run's head the same way; alone, it outputs
embeddings. `build_module` rebuilds the architecture from the metadata's `arch` with random
weights, for `bench --backend torch`."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from ..core import atomic
from ..core.config import default_cache_dir
from ..core.errors import ConfigError, MissingResourceError
from ..distill import checkpoint
from ..distill.record import StudentRecord
from ..distill.rundir import RunDir
from ..teacher.heads import build_head
from .inputs import clip_input, student_input
from .reprompt import calibrate_reprompted, reprompt

log = logging.getLogger(__name__)


class ImageEncoder(nn.Module):
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
        enc = ImageEncoder(open_clip.create_model(arch["name"], pretrained=None))
    else:
        raise ConfigError(f"unknown architecture kind {arch['kind']!r}")
    return Deployable(enc, build_head(arch.get("head"))).eval()


@dataclasses.dataclass
class Loaded:
    """A model ready to export, with everything the metadata will say about it."""

    module: nn.Module
    info: dict  # role, name, arch, output, classes, input spec, ...



def load_student(run: str | Path, which: str = "best", size: int = 0, prompts: Optional[str] = None,
                 cache_dir: str = "") -> tuple[Loaded, StudentRecord]:
    """(the student with its head folded in, its checkpoint record). With `prompts`, an embedding
    student's head is rebuilt for those prompts (`reprompt`), and the record is the re-headed one."""
    from ..distill.students import create_student

    rundir = RunDir(run)
    path = rundir.checkpoint(which)
    record = checkpoint.read_student(path)
    if record is None:
        raise MissingResourceError(f"{path} does not exist; train the run first")
    cfg = record.config
    student = create_student(record.arch, record.out_dim)
    checkpoint.load_model(student, record, path)
    if record.output not in ("logits", "embedding"):
        raise ConfigError(f"{path}: unknown student output {record.output!r}")
    head = record.folded_head()  # None for a logits student: its output already is the logits
    spec = record.head_spec() if head is not None else None
    side = size or record.size
    result = rundir.read_result() or {}
    calibration = atomic.read_json(rundir.path / "calibration.json") if (rundir.path / "calibration.json").is_file() \
        else None
    new_head = None
    if prompts is not None:
        new_head = reprompt(record, prompts, cache_dir or cfg.get("cache_dir") or default_cache_dir())
        record, spec, head = new_head.record, new_head.spec, new_head.head
        result, calibration = {}, None  # measured for the old classes
    info = {
        "role": "student", "name": record.arch, "output": "logits", "student_output": record.output,
        "head": spec["kind"] if spec else "none",
        "arch": {"kind": "timm", "name": record.arch, "out_dim": record.out_dim, "head": spec},
        "num_classes": record.num_classes, "embed_dim": record.embed_dim, "classes": list(record.classes),
        "prompts": list(record.prompts), "teacher": record.teacher,
        "method": record.method, "dataset": record.dataset, "trained_size": record.size,
        "input": student_input(side, record.input.mean, record.input.std),
        "accuracy": {k: result[k] for k in ("test_accuracy", "teacher_agreement", "teacher_test_accuracy", "n_test")
                     if k in result} | ({"source": "result.json (PyTorch, best checkpoint)"} if result else {}),
        "source": {"kind": "run", "run": str(Path(run).resolve()), "checkpoint": which, "epoch": record.epoch,
                   **({"prompts": str(prompts)} if prompts is not None else {})},
    }
    module = Deployable(student, head).eval()
    if new_head is not None:
        calibration = calibrate_reprompted(module, info, cfg, new_head)
    if calibration and isinstance(calibration.get("reject_threshold"), (int, float)):
        info["reject_threshold"] = float(calibration["reject_threshold"])
        info["reject_calibration"] = calibration
    return Loaded(module, info), record


def load_teacher_encoder(name: str, pretrained: Optional[str], cache_dir: str, run: Optional[StudentRecord] = None
                         ) -> Loaded:
    """The teacher's image encoder (plus the head of `run`, a run's checkpoint record, when given)."""
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
    if run is not None:
        run_teacher = (run.teacher or {}).get("model")
        if run_teacher != name:
            raise ConfigError(f"--teacher {name}: the run was distilled from {run_teacher}; its head only fits that "
                              f"teacher's embeddings (export {run_teacher}, or leave --run out for embeddings)")
        run_weights = (run.teacher or {}).get("weights")
        if pretrained != "random" and run_weights is not None and run_weights != fingerprint.get("weights"):
            raise ConfigError(f"--pretrained: the run was distilled from {name} weights {run_weights}, not "
                              f"{fingerprint.get('weights')}; its head only fits those (leave --pretrained out "
                              f"to use the run's)")
        spec, head = run.head_spec(), run.head_module()
        info = {"classes": list(run.classes), "prompts": list(run.prompts), "num_classes": run.num_classes,
                "dataset": run.dataset}
    return Loaded(Deployable(ImageEncoder(model), head).eval(), {
        "role": "teacher", "name": name, "output": "logits" if head is not None else "embedding",
        "head": spec["kind"] if spec else "none",
        "arch": {"kind": "open_clip", "name": name, "head": spec},
        "teacher": fingerprint, "embed_dim": int(getattr(model.visual, "output_dim", 0) or 0) or None,
        "trained_size": size, "input": clip_input(preprocess, size),
        "source": {"kind": "open_clip", "name": name, "pretrained": pretrained}, **info})

