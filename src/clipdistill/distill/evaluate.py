"""The final report of a student, on the test split (`clipdistill eval --run DIR`).

Evaluating a run reads what the run recorded and changes nothing it did not compute: the
student and its head come from `best` (picked on validation), the data and the head's classes
from the run's config (a `RunContext`, not a trainer: the teacher is neither timed nor run on
any image, the caches hold its outputs), the teaching mode and what `--teaching auto` measured
from the checkpoint. `measure_student` measures top-1 accuracy overall and per class, and the
agreement with the teacher's head, and writes nothing; `write_evaluation` puts the result in
RUN/result.json (everything else there stays as the run wrote it) and the timm-loadable student
(portable.py) beside it. `train` and `eval` both go through `evaluate_student`, which does one
then the other, so a trained run and a re-evaluated one report alike."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Optional

from ..core import atomic
from ..core.config import check, option
from ..core.errors import ConfigError, MissingResourceError
from ..core.metrics import accuracy, agreement, per_class_accuracy
from . import checkpoint
from .config import TrainConfig
from .context import RunContext
from .portable import write_timm_student
from .record import StudentRecord
from .rundir import RunDir

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


def read_best(run: RunDir) -> StudentRecord:
    """The record of the run's `best` checkpoint; MissingResourceError when it has none."""
    run.check_format()
    record = checkpoint.read_student(run.best)
    if record is None:
        raise MissingResourceError(f"{run.best} does not exist; train the run first")
    return record


def measure_student(ctx: RunContext, record: StudentRecord, *, teaching: Optional[str],
                    teaching_costs: Optional[dict], inputs: Optional[dict]) -> dict:
    """Load `record` (the run's best checkpoint) into `ctx` and measure it on the test split (or,
    without one, on the held-out rows that picked it); the result, written nowhere.

    `teaching`, `teaching_costs` and `inputs` are what the run recorded about itself, reported as
    they are."""
    run = ctx.run
    mismatch = ctx.teacher_mismatch(record)
    if mismatch:  # agreement and embedding heads must be the teacher the student learnt from
        raise ConfigError(f"--run {run} was trained with {mismatch}; evaluate it with the run's "
                          f"--device/--cache-dir (or none of those overrides)")
    ctx.load_checkpoint(record, run.best)
    # Without labelled test images (a pool alone), the held-out pool rows that picked `best`
    # are all there is: agreement with the teacher there, and no accuracy.
    has_test = "test" in ctx.data.names
    s, t, y = ctx.predict(ctx.data.rows("test") if has_test else ctx.val_rows)
    pred, tpred = s.argmax(1), t.argmax(1)
    cfg = ctx.cfg
    fp = ctx.outs.teacher.fingerprint()
    return {
        "test_accuracy": accuracy(pred, y),
        "teacher_agreement": agreement(pred, tpred),
        "teacher_test_accuracy": accuracy(tpred, y) if bool((y >= 0).any()) else None,
        "per_class_accuracy": per_class_accuracy(pred, y, ctx.outs.classes),
        "n_test": int(len(y)) if has_test else 0,
        "agreement_on": "test" if has_test else "held-out training rows (no test split)",
        "best_epoch": record.epoch,
        f"val_{record.val_metric}": record.best,
        "epochs": cfg.epochs,
        "seed": cfg.seed,
        "student": cfg.student,
        "teacher": fp["model"],
        "teacher_weights": fp["weights"],
        "teacher_precision": fp["precision"],
        "student_precision": ctx.precision,
        "method": ctx.method.spec,
        "head": ctx.head_name,
        "logit_scale": ctx.logit_scale if ctx.head_name == "text" else None,
        "teaching": teaching,
        "teaching_costs": teaching_costs,
        "augment": cfg.augment,
        "mixup": cfg.mixup,
        "data": "+".join(cfg.data),
        "dataset": cfg.dataset,
        "run_dir": str(run),
        "timm_student": str(run.student),
        "inputs": inputs,
    }


def write_evaluation(ctx: RunContext, record: StudentRecord, result: dict) -> None:
    """RUN/student (the timm folder of `record`) and RUN/result.json, from the main process only:
    every rank measures, one writes."""
    if ctx.dist.is_main:
        write_timm_student(ctx.run, record)
        atomic.write_json(ctx.run.result, result)


def evaluate_student(ctx: RunContext, record: StudentRecord, *, teaching: Optional[str],
                     teaching_costs: Optional[dict], inputs: Optional[dict], extra: Optional[dict] = None,
                     previous: Optional[dict] = None) -> dict:
    """Measure `record` (`measure_student`) and write the result (`write_evaluation`); returns it.

    `previous`: a result.json to keep every other field of (the measured ones are replaced);
    `extra`: fields to add."""
    measured = measure_student(ctx, record, teaching=teaching, teaching_costs=teaching_costs, inputs=inputs)
    result = {**(previous or {}), **measured, **(extra or {})}
    write_evaluation(ctx, record, result)
    return result


def evaluate_run(cfg: EvalConfig) -> dict:
    """`clipdistill eval`: the run as its files recorded it, measured again on test."""
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
        record = read_best(run)
        previous = run.read_result() or {}

        def recorded(value, key: str):  # a checkpoint older than the field: what result.json said
            return value if value is not None else previous.get(key)

        return evaluate_student(RunContext(tcfg), record, teaching=recorded(record.teaching, "teaching"),
                                teaching_costs=recorded(record.teaching_costs, "teaching_costs"),
                                inputs=recorded(record.inputs, "inputs"), previous=previous)
