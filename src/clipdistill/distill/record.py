"""What a student checkpoint says, typed: the one place that knows its layout.

A checkpoint (`best`, `last`) is one flat dict on disk (checkpoint.py writes it as safetensors
with a JSON header). Readers used to pick its keys by hand in every stage that needed them, so a
renamed or added key had to be found in each. Here the layout is read (`StudentRecord.from_state`)
and written (`to_state`) once; everything else asks the record: what the student outputs, the head
that turns an embedding into logits, its classes, the input it expects, the recipe it came from.

The keys on disk are the ones earlier versions wrote: a checkpoint from before a field existed
(no `teaching`, `amp`, `inputs`, `teaching_costs`, ...) still reads, with that field None."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from ..core.state import StateFileError
from ..teacher.heads import build_head, head_spec

# What a checkpoint cannot be read without: the weights and what they mean.
_REQUIRED = ("model", "config", "output", "num_classes", "embed_dim", "size", "classes")


@dataclasses.dataclass(frozen=True)
class HeadRecord:
    """The frozen teacher head the student was trained and picked with (text or linear): an
    embedding student's logits come through it, and export folds it in, so no teacher is needed."""

    kind: str
    state_dict: dict
    logit_scale: Optional[float] = None

    def spec(self, num_classes: int, embed_dim: int) -> dict:
        return head_spec(self.kind, num_classes, embed_dim, self.logit_scale)


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """The pixels the student expects: stretched to size x size, pixels / 255, (x - mean) / std."""

    size: int
    mean: float
    std: float


@dataclasses.dataclass(frozen=True)
class StudentRecord:
    """A student's weights and everything a later stage needs to use them."""

    weights: dict  # the student's state dict (unwrapped from DDP)
    config: dict  # the recipe: the resolved TrainConfig the run was trained with
    output: str  # "logits" (class logits) or "embedding" (the teacher's embedding; logits via `head`)
    num_classes: int
    embed_dim: int
    size: int  # the input side it was trained at
    classes: list
    prompts: list = dataclasses.field(default_factory=list)
    head: Optional[HeadRecord] = None
    method: Optional[str] = None
    teacher: Optional[dict] = None  # the teacher's fingerprint (model, weights, preprocess, precision)
    precision: Optional[str] = None  # the student's resolved precision (`--amp`)
    teaching: Optional[str] = None  # the resolved teaching mode (cached, online, views, none)
    teaching_costs: Optional[dict] = None  # what `--teaching auto` measured to choose it
    inputs: Optional[dict] = None  # what the run was made from, by content (inputs.py)
    epoch: int = 0
    step: int = 0
    best: Optional[float] = None  # the validation score of this epoch (`val_metric`)
    val_metric: Optional[str] = None

    # ------------------------------------------------------------------ what it means
    @property
    def arch(self) -> str:
        """The timm architecture."""
        return self.config["student"]

    @property
    def dataset(self) -> Optional[str]:
        return self.config.get("dataset")

    @property
    def out_dim(self) -> int:
        """The width of the student's own output layer."""
        return self.num_classes if self.output == "logits" else self.embed_dim

    @property
    def input(self) -> InputSpec:
        return InputSpec(int(self.size), float(self.config["student_mean"]), float(self.config["student_std"]))

    def head_spec(self) -> Optional[dict]:
        """The frozen head's spec (`teacher.heads.head_spec`), None when none was recorded."""
        return self.head.spec(self.num_classes, self.embed_dim) if self.head is not None else None

    def head_module(self) -> Optional[Any]:
        """The frozen head, built with its recorded weights (None when none was recorded): it turns
        the teacher's embedding, or an embedding student's output, into class logits."""
        return build_head(self.head_spec(), self.head.state_dict) if self.head is not None else None

    def folded_head(self) -> Optional[Any]:
        """The head that turns this student's output into class logits: built for an embedding
        student, None for a logits student (its output already is the logits)."""
        return None if self.output == "logits" else self.head_module()

    # ------------------------------------------------------------------ the layout on disk
    def to_state(self) -> dict:
        """The flat dict a checkpoint file holds (the keys earlier versions wrote)."""
        state = {"model": self.weights, "epoch": self.epoch, "step": self.step, "best": self.best,
                 "config": self.config, "head": self.head.kind if self.head else None, "method": self.method,
                 "output": self.output, "num_classes": self.num_classes, "embed_dim": self.embed_dim,
                 "size": self.size, "classes": list(self.classes), "prompts": list(self.prompts),
                 "val_metric": self.val_metric, "teacher": self.teacher, "amp": self.precision,
                 "teaching": self.teaching, "teaching_costs": self.teaching_costs, "inputs": self.inputs}
        if self.head is not None:
            state["teacher_head"] = {"kind": self.head.kind, "state_dict": self.head.state_dict,
                                     "logit_scale": self.head.logit_scale}
        return state

    @classmethod
    def from_state(cls, state: dict, path: object = "the checkpoint") -> "StudentRecord":
        """The record in a checkpoint's dict; StateFileError naming `path` when it is not a
        student checkpoint (what it lacks, and what to do)."""
        if isinstance(state, StudentRecord):
            return state
        missing = [k for k in _REQUIRED if not isinstance(state, dict) or k not in state]
        if missing or not isinstance(state.get("config"), dict) or "student" not in state["config"]:
            what = ", ".join(missing) or "config.student"
            raise StateFileError(f"{path} is not a student checkpoint (it has no {what}); move it away and train "
                                 f"the run again")
        th = state.get("teacher_head")
        head = HeadRecord(th["kind"], th["state_dict"], _float(th.get("logit_scale"))) if th else None
        return cls(weights=state["model"], config=state["config"], output=state["output"],
                   num_classes=int(state["num_classes"]), embed_dim=int(state["embed_dim"]), size=int(state["size"]),
                   classes=list(state["classes"]), prompts=list(state.get("prompts") or []), head=head,
                   method=state.get("method"), teacher=state.get("teacher"), precision=state.get("amp"),
                   teaching=state.get("teaching"), teaching_costs=state.get("teaching_costs"),
                   inputs=state.get("inputs"), epoch=int(state.get("epoch") or 0), step=int(state.get("step") or 0),
                   best=_float(state.get("best")), val_metric=state.get("val_metric"))


@dataclasses.dataclass(frozen=True)
class TrainingState:
    """What `last` holds beyond the record: everything to continue exactly where the run stopped."""

    optimizer: dict
    scheduler: dict
    scaler: dict
    history: list
    rng: Optional[dict] = None  # None when writing: the RNG state is taken as the file is saved

    def to_state(self) -> dict:
        state = {"optimizer": self.optimizer, "scheduler": self.scheduler, "scaler": self.scaler,
                 "history": self.history}
        if self.rng is not None:
            state["rng"] = self.rng
        return state

    @classmethod
    def from_state(cls, state: dict, path: object = "the checkpoint") -> "TrainingState":
        missing = [k for k in ("optimizer", "scheduler", "scaler", "history", "rng") if k not in state]
        if missing:
            raise StateFileError(f"{path} holds no training state to resume from (no {', '.join(missing)}); move "
                                 f"it away, or give another --out")
        return cls(state["optimizer"], state["scheduler"], state["scaler"], list(state["history"]), state["rng"])


def _float(v) -> Optional[float]:
    return None if v is None else float(v)
