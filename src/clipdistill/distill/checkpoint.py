"""Full-state checkpoints, written atomically and read without unpickling anything.

`last` holds everything a killed run needs to continue exactly where it was (model,
optimiser, scheduler, scaler, every RNG, counters, config); `best` the weights and metadata
of the epoch picked on validation. Both are one safetensors file each (tensors) with the
rest as JSON in its header (core/state.py): a checkpoint from someone else can be loaded
without running their code.

Loading one into a model goes through `load_model`: a checkpoint of another student, or of
the same student with another number of classes (the prompts changed since), is one line that
names the file, the first tensor that does not fit, both shapes and the likely cause, where
torch's `load_state_dict` prints every mismatching tensor under a traceback.

What the dict in a file means is record.py's job: `read_student` / `write_student` go through it,
so no stage reads a checkpoint's keys by hand."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..core.errors import ClipDistillError
from ..core.state import StateFileError, read_state, write_state
from .record import StudentRecord, TrainingState


class CheckpointMismatchError(ClipDistillError):
    """A readable checkpoint whose weights do not fit the model being built."""


def rng_state() -> dict:
    """Every RNG of this process (Python, NumPy, torch, each CUDA device), as tensors and JSON."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    rng = {"python": [version, list(internal), gauss],
           "numpy": {"kind": kind, "keys": np.asarray(keys, dtype=np.int64), "pos": int(pos),
                     "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
           "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = list(torch.cuda.get_rng_state_all())
    return rng


def set_rng_state(rng: dict) -> None:
    """Put back what `rng_state` took."""
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    n = rng["numpy"]
    np.random.set_state((n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        # A checkpoint from a node with more GPUs than this one: restore the devices present.
        torch.cuda.set_rng_state_all(rng["cuda"][:torch.cuda.device_count()])


def save(path: str | Path, **state: Any) -> Path:
    state.setdefault("rng", rng_state())
    return write_state(path, state)


def load(path: str | Path) -> Optional[dict]:
    """The checkpoint at `path`, or None when there is none. A file that is not one of ours
    (a pickle, random bytes, a truncated copy) raises StateFileError naming it; nothing in
    it runs."""
    path = Path(path)
    if not path.exists():
        return None
    return read_state(path, "checkpoint")


def read_student(path: str | Path) -> Optional[StudentRecord]:
    """The student record in the checkpoint at `path` (None when there is none)."""
    state = load(path)
    return None if state is None else StudentRecord.from_state(state, path)


def read_last(path: str | Path) -> Optional[tuple[StudentRecord, TrainingState]]:
    """The record and the training state of a `last` checkpoint (None when there is none)."""
    state = load(path)
    return None if state is None else (StudentRecord.from_state(state, path), TrainingState.from_state(state, path))


def write_student(path: str | Path, record: StudentRecord, training: Optional[TrainingState] = None) -> Path:
    """Write `record` (and, for `last`, the training state) atomically."""
    return save(path, **record.to_state(), **(training.to_state() if training is not None else {}))


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def _shape(t) -> str:
    return "x".join(str(d) for d in t.shape) or "scalar"


def _arch(model: torch.nn.Module) -> str:
    return (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__


def _cause(model: torch.nn.Module, record: StudentRecord, name: str) -> str:
    """Why a tensor would not fit: another architecture, or another width of the output layer."""
    file_arch = record.arch
    now_arch = _arch(model)
    if file_arch and file_arch != now_arch:
        return (f"the file holds a {file_arch} and this is a {now_arch}: a checkpoint of a run with another "
                f"--student")
    head = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "fc"
    if name.startswith(head + "."):
        return ("the output layer differs: a run with another number of classes (the prompts or class folders "
                "changed since it was trained) or another output (embedding students have the teacher's width)")
    return "the same architecture built differently: another timm version, or a damaged file"


def load_model(model: torch.nn.Module, record: StudentRecord, path: str | Path) -> torch.nn.Module:
    """Load the weights of a checkpoint's record, read from `path`, into `model` (unwrapped from
    DDP), or raise CheckpointMismatchError naming the first tensor that does not fit, both shapes
    and the likely cause. Returns the unwrapped model."""
    target = unwrap(model)
    weights = record.weights
    if not isinstance(weights, dict):
        raise StateFileError(f"{path} holds no model weights; move it away")
    own = target.state_dict()
    fix = "Is it from another run? Put the run's own checkpoint back or train it again."
    for name, t in weights.items():
        if name in own and tuple(own[name].shape) != tuple(t.shape):
            raise CheckpointMismatchError(f"{path}: its {name} is {_shape(t)} where this {_arch(target)} has "
                                          f"{_shape(own[name])}; {_cause(target, record, name)}. {fix}")
    extra = [k for k in weights if k not in own]
    missing = [k for k in own if k not in weights]
    if extra or missing:
        first = f"its {extra[0]} is unknown to" if extra else f"it lacks {missing[0]} of"
        cause = _cause(target, record, (extra or missing)[0])
        raise CheckpointMismatchError(f"{path}: {first} this {_arch(target)} ({len(extra)} tensors unknown, "
                                      f"{len(missing)} missing); {cause}. {fix}")
    target.load_state_dict(weights)
    return target
