"""A run folder and everything in it, named in one place.

    RUN/config.json                   the resolved TrainConfig
    RUN/checkpoints/last.safetensors  full state (resume)        } safetensors + JSON header:
    RUN/checkpoints/best.safetensors  the weights picked on val  } reading them runs no code
    RUN/metrics.jsonl                 one record per 20 steps and per epoch
    RUN/tensorboard/                  the same, for TensorBoard
    RUN/result.json                   the final report (test accuracy, agreement, ...)
    RUN/student/                      model.safetensors + config.json that timm loads
    RUN/.lock                         held by the one process writing the run

Only one process writes a run: `lock()` is taken for the whole of `train` (and `eval`),
so a second one on the same folder is refused at once instead of mixing two runs' files."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

from ..core import atomic
from ..core.errors import ConfigError
from ..core.locks import exclusive

log = logging.getLogger(__name__)

CHECKPOINTS = ("last", "best")


class RunDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    # ------------------------------------------------------------------ paths
    @property
    def config(self) -> Path:
        return self.path / "config.json"

    @property
    def result(self) -> Path:
        return self.path / "result.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def checkpoint(self, which: str = "best") -> Path:
        if which not in CHECKPOINTS:
            raise ConfigError(f"--checkpoint {which!r}; valid: {', '.join(CHECKPOINTS)}")
        return self.checkpoints / f"{which}.safetensors"

    @property
    def last(self) -> Path:
        return self.checkpoint("last")

    @property
    def best(self) -> Path:
        return self.checkpoint("best")

    @property
    def student(self) -> Path:
        """The timm-loadable student: `timm.create_model("local-dir:" + str(run.student), pretrained=True)`."""
        return self.path / "student"

    def onnx(self, size: Optional[int] = None, trained_size: Optional[int] = None) -> Path:
        return self.path / ("model.onnx" if size in (None, trained_size) else f"model-{size}px.onnx")

    @property
    def teacher_onnx(self) -> Path:
        return self.path / "teacher.onnx"

    # ------------------------------------------------------------------ state
    def exists(self) -> bool:
        return self.config.is_file()

    def read_config(self) -> dict:
        return atomic.read_json(self.config)

    def read_result(self) -> Optional[dict]:
        return atomic.read_json(self.result) if self.result.is_file() else None

    def check_format(self) -> None:
        """Refuse a run folder of clipdistill 0.1, whose checkpoints were pickles (reading a
        pickle runs whatever code it holds, so they are never read)."""
        legacy = [self.checkpoints / f"{w}.pt" for w in CHECKPOINTS]
        if any(p.exists() for p in legacy) and not any(self.checkpoint(w).exists() for w in CHECKPOINTS):
            raise ConfigError(
                f"{self.path} was written by clipdistill 0.1: its checkpoints "
                f"({', '.join(p.name for p in legacy if p.exists())}) "
                f"are pickles, which can run code when read, so clipdistill no longer reads them. Train it again: "
                f"remove {self.path} (or give another --out) and run the same command.")

    def lock(self, wait: bool = False):
        """Exclusive for the block; refused at once (LockedError) when another process holds it."""
        self.path.mkdir(parents=True, exist_ok=True)
        return exclusive(self.path / ".lock", wait=wait,
                         busy_message=f"another process is writing the run folder {self.path} (a `train` or `eval` on "
                                      f"the same --out/--run); wait for it to finish, or use another --out")

    def clean_leftovers(self) -> None:
        """Temporary files that a killed writer left behind (ours by name, and no process holds the lock
        their writer kept until the rename: core/atomic.py)."""
        for folder in (self.path, self.checkpoints):
            for p in atomic.remove_stale_temporaries(folder):
                log.info("removed %s, left by a killed process", p)

    def trim_metrics(self, step: int) -> None:
        """Keep only the records up to `step` (the checkpoint resumed from): a run killed
        mid-epoch logged steps it will now train again."""
        if not self.metrics.is_file():
            return
        lines = self.metrics.read_text(encoding="utf-8").splitlines()
        keep = []
        for ln in lines:
            try:
                rec = json.loads(ln)
            except ValueError:
                continue  # a line torn by the kill
            if rec.get("step", 0) <= step:
                keep.append(ln)
        if len(keep) != len(lines):
            atomic.write_text(self.metrics, "".join(k + "\n" for k in keep))
