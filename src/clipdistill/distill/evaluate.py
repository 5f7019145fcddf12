"""The final report of a student, on the test split (`clipdistill eval --run DIR`).

Loads `best` (picked on validation), then measures top-1 accuracy overall and per class,
and the agreement with the teacher's head, into RUN/result.json; writes the timm-loadable
student (portable.py) beside it."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from ..core import atomic
from ..core.config import check, option
from ..core.errors import ConfigError, MissingResourceError
from . import checkpoint
from .config import TrainConfig
from .portable import write_timm_student
from .rundir import RunDir
from .trainer import Trainer

log = logging.getLogger(__name__)


@dataclasses.dataclass
class EvalConfig:
    run: str = option("", "run folder written by `clipdistill train`", metavar="DIR")
    cache_dir: str = option("", "override the run's cache folder", metavar="DIR")
    device: str = option("", "override the run's device")
    progress: bool = option(False, "show progress bars")

    def __post_init__(self) -> None:
        check(bool(self.run), "run", "give the run folder, e.g. --run runs/shapes10-resnet18-kl-linear-train")
        check(Path(self.run).is_dir(), "run", f"{self.run} is not a folder")
        check(RunDir(self.run).exists(), "run",
              f"{self.run} has no config.json; is it a folder made by `clipdistill train`?")


def evaluate_trainer(trainer: Trainer, extra: dict | None = None) -> dict:
    run = trainer.run
    run.check_format()
    state = checkpoint.load(run.best)
    if state is None:
        raise MissingResourceError(f"{run.best} does not exist; train the run first")
    mismatch = trainer.resolved_mismatch(state)
    if "teacher" in mismatch:  # agreement and embedding heads must be the teacher the student learnt from
        raise ConfigError(f"--run {run} was trained with {mismatch}; evaluate it with the run's "
                          f"--device/--cache-dir (or none of those overrides)")
    checkpoint.load_model(trainer.model, state, run.best)
    # The head the student was trained and picked with, exactly as `export` folds it in.
    trainer.teacher_head.load_state_dict(state["teacher_head"]["state_dict"])
    # Without labelled test images (a pool alone), the held-out pool rows that picked `best`
    # are all there is: agreement with the teacher there, and no accuracy.
    has_test = "test" in trainer.data.names
    s, t, y = trainer.predict(trainer.data.rows("test") if has_test else trainer.val_rows)
    keep = y >= 0
    pred, tpred = s.argmax(1), t.argmax(1)
    acc = float((pred[keep] == y[keep]).float().mean() * 100) if keep.any() else float("nan")
    per_class = {}
    for c, name in enumerate(trainer.outs.classes):
        m = y == c
        per_class[name] = float((pred[m] == c).float().mean() * 100) if m.any() else None
    cfg = trainer.cfg
    fp = trainer.outs.teacher.fingerprint()
    result = {
        "test_accuracy": acc,
        "teacher_agreement": float((pred == tpred).float().mean() * 100),
        "teacher_test_accuracy": float((tpred[keep] == y[keep]).float().mean() * 100) if keep.any() else None,
        "per_class_accuracy": per_class,
        "n_test": int(len(y)) if has_test else 0,
        "agreement_on": "test" if has_test else "held-out training rows (no test split)",
        "best_epoch": state["epoch"],
        f"val_{state['val_metric']}": state["best"],
        "epochs": cfg.epochs,
        "seed": cfg.seed,
        "student": cfg.student,
        "teacher": fp["model"],
        "teacher_weights": fp["weights"],
        "teacher_precision": fp["precision"],
        "student_precision": trainer.precision,
        "method": trainer.method.spec,
        "head": trainer.head_name,
        "logit_scale": trainer.logit_scale if trainer.head_name == "text" else None,
        "teaching": trainer.teaching.mode,
        "teaching_costs": getattr(trainer, "teaching_costs", None),
        "augment": cfg.augment,
        "mixup": cfg.mixup,
        "data": "+".join(cfg.data),
        "dataset": cfg.dataset,
        "run_dir": str(run),
        "timm_student": str(run.student),
        "inputs": trainer.inputs,
        **(extra or {}),
    }
    if trainer.dist.is_main:
        write_timm_student(run, state)
        atomic.write_json(run.result, result)
    return result


def evaluate_run(cfg: EvalConfig) -> dict:
    run = RunDir(cfg.run)
    run.check_format()
    saved = run.read_config()
    overrides = {"progress": cfg.progress, "out": cfg.run}
    if cfg.cache_dir:
        overrides["cache_dir"] = cfg.cache_dir
    if cfg.device:
        overrides["device"] = cfg.device
    try:
        tcfg = TrainConfig(**{**saved, **overrides})
    except TypeError as e:
        raise ConfigError(f"--run {run}: its config.json does not match this version of clipdistill ({e}); "
                          f"train it again") from None
    with run.lock():
        trainer = Trainer(tcfg)
        prev = run.read_result() or {}
        keep = {k: prev[k] for k in ("train_seconds", "wall_seconds") if k in prev}
        return evaluate_trainer(trainer, extra=keep)
