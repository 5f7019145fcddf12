"""`clipdistill train`: train (or resume, or reuse a finished run) and report on test."""

from __future__ import annotations

import logging
import os
import time
from typing import Optional

from ..core.config import config_diff, to_dict
from ..core.distributed import cleanup
from ..core.errors import ConfigError
from . import checkpoint, inputs
from .config import TrainConfig
from .context import RunContext
from .evaluate import evaluate_student, read_best
from .rundir import RunDir
from .trainer import Trainer

log = logging.getLogger(__name__)


def finished_result(cfg: TrainConfig) -> Optional[dict]:
    """The result of a finished run of this very config, made from what its files hold now, in
    its folder, if there is one."""
    run = cfg.run_dir()
    if not run.result.exists() or not run.exists():
        return None
    if config_diff(run.read_config(), to_dict(cfg)):
        return None
    result = run.read_result()
    changed = inputs.differences(result.get("inputs"), inputs.current(cfg))
    if changed == [inputs.UNRECORDED]:
        log.warning("warning: %s: %s; reusing it as before", run, inputs.UNRECORDED)
    elif changed:
        log.info("%s finished on other inputs (%s); not reusing its result", run, "; ".join(changed))
        return None
    return result


def run_differences(cfg: TrainConfig) -> list[str]:
    """Why the run in `cfg`'s folder is not a run of `cfg` on what its files hold now ([] when it
    can be resumed or reused, or when there is none): the flags that differ, then the inputs."""
    run = cfg.run_dir()
    if run.last.exists():
        last = checkpoint.read_student(run.last)
        then_cfg, then_inputs = last.config, last.inputs
    elif run.result.exists() and run.exists():
        then_cfg, then_inputs = run.read_config(), (run.read_result() or {}).get("inputs")
    else:
        return []
    return config_diff(then_cfg, to_dict(cfg)) + inputs.differences(then_inputs, inputs.current(cfg))


def train(cfg: TrainConfig, teacher=None) -> dict:
    """Train (or resume, or reuse a finished run) and return the test report.

    Rank 0 holds the run folder's lock throughout: a second process on the same `--out`
    is refused at once (its message names this one's pid)."""
    run: RunDir = cfg.run_dir()
    main = int(os.environ.get("RANK", "0")) == 0
    if not main:
        return _train(cfg, run, teacher)
    with run.lock():
        return _train(cfg, run, teacher)


def _train(cfg: TrainConfig, run: RunDir, teacher) -> dict:
    run.check_format()
    if cfg.resume == "never" and run.last.exists():
        raise ConfigError(f"--out {run} already holds a run (--resume never); use --resume auto to "
                          f"continue or reuse it, or another --out")
    done = finished_result(cfg)
    if done is not None:
        log.info("%s is already complete (result.json); reusing it", run)
        return {**done, "reused": True}  # the caller's timings must not read this call as the training
    t0 = time.time()
    trainer = Trainer(RunContext(cfg, teacher))
    try:
        resumed = trainer.try_resume()
        if resumed and trainer.epoch >= cfg.epochs and run.result.exists():
            log.info("%s is already complete", run)
            return {**run.read_result(), "reused": True}
        trainer.fit()
        # Seconds spent in epochs, summed over every resumption of the run.
        seconds = sum(h["seconds"] for h in trainer.history)
        return evaluate_student(trainer.ctx, read_best(run), teaching=trainer.choice.mode,
                                teaching_costs=trainer.choice.costs, inputs=trainer.ctx.inputs,
                                extra={"train_seconds": round(seconds, 2), "wall_seconds": round(time.time() - t0, 2)})
    finally:
        cleanup(trainer.ctx.dist)
