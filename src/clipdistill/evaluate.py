"""`clipdistill eval --run DIR`: the final report of a student, on the test split.

Loads `best` (picked on validation), then measures top-1 accuracy overall and per class,
and the agreement with the teacher's head, into DIR/result.json."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from . import atomic, checkpoint
from .config import check, option
from .errors import ConfigError, MissingResourceError


@dataclasses.dataclass
class EvalConfig:
    run: str = option("", "run folder written by `clipdistill train`", metavar="DIR")
    cache_dir: str = option("", "override the run's cache folder", metavar="DIR")
    device: str = option("", "override the run's device")
    progress: bool = option(False, "show progress bars")

    def __post_init__(self) -> None:
        check(bool(self.run), "run", "give the run folder, e.g. --run runs/shapes10-resnet18-kl-linear-train")
        check(Path(self.run).is_dir(), "run", f"{self.run} is not a folder")
        check((Path(self.run) / "config.json").is_file(), "run",
              f"{self.run} has no config.json; is it a folder made by `clipdistill train`?")


def evaluate_trainer(trainer, extra: dict | None = None) -> dict:
    ck = trainer.run_dir / "checkpoints" / "best.pt"
    state = checkpoint.load(ck)
    if state is None:
        raise MissingResourceError(f"{ck} does not exist; train the run first")
    mismatch = trainer.resolved_mismatch(state)
    if "teacher" in mismatch:  # agreement and embedding heads must be the teacher the student learnt from
        raise ConfigError(f"--run {trainer.run_dir} was trained with {mismatch}; evaluate it with the run's "
                          f"--device/--cache-dir (or none of those overrides)")
    checkpoint.unwrap(trainer.model).load_state_dict(state["model"])
    # The head the student was trained and picked with, exactly as `export` folds it in.
    trainer.teacher_head.load_state_dict(state["teacher_head"]["state_dict"])
    test = trainer.data.rows("test")
    s, t, y = trainer.predict(test)
    keep = y >= 0
    pred, tpred = s.argmax(1), t.argmax(1)
    acc = float((pred[keep] == y[keep]).float().mean() * 100) if keep.any() else float("nan")
    per_class = {}
    for c, name in enumerate(trainer.outs.classes):
        m = y == c
        per_class[name] = float((pred[m] == c).float().mean() * 100) if m.any() else None
    cfg = trainer.cfg
    result = {
        "test_accuracy": acc,
        "teacher_agreement": float((pred == tpred).float().mean() * 100),
        "teacher_test_accuracy": float((tpred[keep] == y[keep]).float().mean() * 100) if keep.any() else None,
        "per_class_accuracy": per_class,
        "n_test": int(len(y)),
        "best_epoch": state["epoch"],
        f"val_{state['val_metric']}": state["best"],
        "epochs": cfg.epochs,
        "student": cfg.student,
        "teacher": trainer.outs.teacher.fingerprint()["model"],
        "teacher_weights": trainer.outs.teacher.fingerprint()["weights"],
        "method": trainer.method.spec,
        "head": trainer.head_name,
        "data": "+".join(cfg.data),
        "dataset": cfg.dataset,
        "run_dir": str(trainer.run_dir),
        **(extra or {}),
    }
    if trainer.dist.is_main:
        atomic.write_json(trainer.run_dir / "result.json", result)
    return result


def evaluate_run(cfg: EvalConfig, log=print) -> dict:
    from .train import TrainConfig, Trainer

    saved = atomic.read_json(Path(cfg.run) / "config.json")
    overrides = {"progress": cfg.progress, "out": cfg.run}
    if cfg.cache_dir:
        overrides["cache_dir"] = cfg.cache_dir
    if cfg.device:
        overrides["device"] = cfg.device
    tcfg = TrainConfig(**{**saved, **overrides})
    trainer = Trainer(tcfg, log=log)
    prev = atomic.read_json(Path(cfg.run) / "result.json") if (Path(cfg.run) / "result.json").exists() else {}
    keep = {k: prev[k] for k in ("train_seconds", "wall_seconds") if k in prev}
    return evaluate_trainer(trainer, extra=keep)
