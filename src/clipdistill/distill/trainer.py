"""The training loop: one plain loop for every distillation method.

Read it top to bottom: the run itself (teacher outputs, data, frozen head, student) is a
`RunContext` (context.py); the trainer adds the optimizer, the schedule and the teaching mode,
then epochs of batches; each epoch ends with validation on a held-out part of train, a `best`
checkpoint when it improves and a full-state `last` checkpoint. The test split is only
touched by the final report (evaluate.py)."""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Optional

import torch

from ..core import atomic
from ..core.config import config_diff, to_dict
from ..core.distributed import barrier
from ..core.errors import ConfigError, NonFiniteLossError
from ..core.metrics import accuracy, agreement
from ..core.progress import bar as progress_bar
from ..core.progress import duration
from ..data.pixels import to_float
from . import checkpoint, inputs
from .augment import draw_mix
from .context import RunContext
from .methods import Batch, MethodContext
from .record import StudentRecord, TrainingState
from .student_data import prefetched
from .teaching import TeachingChoice, choose_teaching, create_teaching

log = logging.getLogger(__name__)


class Trainer:
    """The loop over a run's context; `fit()` is the whole algorithm.

    `optimizer`: one to use instead of the recipe's (Adam, or AdamW with weight decay), e.g. over
    a student another tool has rewrapped; the schedule is built over it. `teaching`: a mode already
    resolved (a finished run's recorded one) instead of choosing it here, which times the teacher
    under `--teaching auto`."""

    def __init__(self, ctx: RunContext, *, optimizer: Optional[torch.optim.Optimizer] = None,
                 teaching: Optional[TeachingChoice] = None):
        self.ctx = ctx
        self.cfg, self.run = ctx.cfg, ctx.run
        cfg = self.cfg
        if len(ctx.train_rows) < cfg.batch_size:
            ignored = " (the labels method ignores unlabeled images)" if not ctx.method.uses_unlabeled else ""
            raise ConfigError(f"--data {','.join(cfg.data)}: only {len(ctx.train_rows)} usable training images "
                              f"for --batch-size {cfg.batch_size}{ignored}")
        self.method_ctx = MethodContext(ctx.teacher_head, cfg.temperature)
        if optimizer is None:
            opt_cls = torch.optim.AdamW if cfg.weight_decay > 0 else torch.optim.Adam
            optimizer = opt_cls(ctx.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.optimizer = optimizer
        self.steps_per_epoch = len(ctx.train_rows) // cfg.batch_size
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_factor(cfg.schedule, self.steps_per_epoch * cfg.epochs,
                                      min(int(round(cfg.warmup_epochs * self.steps_per_epoch)),
                                          self.steps_per_epoch * cfg.epochs // 2)))
        # Last: the choice between online and cached views times the student built above.
        self.choice = teaching if teaching is not None else choose_teaching(ctx)
        self.teaching = create_teaching(ctx, self.choice.mode)
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=ctx.precision == "fp16")
        self.epoch, self.step, self.best, self.history = 0, 0, -1.0, []

    # ------------------------------------------------------------------ state
    def record(self) -> StudentRecord:
        """What `best` holds (and `export`, `eval` need): weights and what they mean."""
        return self.ctx.record(epoch=self.epoch, step=self.step, best=self.best, teaching=self.choice.mode,
                               teaching_costs=self.choice.costs)

    def training_state(self) -> TrainingState:
        """What `last` holds beyond the record: everything to continue exactly where the run stopped."""
        return TrainingState(optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                             scaler=self.scaler.state_dict(), history=self.history)

    def try_resume(self) -> bool:
        self.run.check_format()
        if not self.run.last.exists():
            return False
        if self.cfg.resume == "never":
            raise ConfigError(f"--out {self.run} already holds a run; use --resume auto to continue it or "
                              f"another --out")
        record, training = checkpoint.read_last(self.run.last)
        diff = config_diff(record.config, to_dict(self.cfg))
        if diff:
            raise ConfigError(f"--out {self.run} holds a run made with another config: " + "; ".join(diff) +
                              ". Use the same flags to resume it, or another --out for a new run.")
        changed = inputs.differences(record.inputs, self.ctx.inputs)
        if changed == [inputs.UNRECORDED]:
            log.warning("warning: %s: %s; resuming it as before", self.run, inputs.UNRECORDED)
        elif changed:
            raise ConfigError(f"--out {self.run} holds a run made from other inputs: " + "; ".join(changed) +
                              f". Its checkpoints learnt from those; give another --out for a run on what the "
                              f"files hold now (or delete {self.run} to train there again).")
        # `--device`, `--amp auto` and `--precision auto` resolve per machine: a run continued
        # elsewhere must still see the same teacher targets and the same student precision.
        mismatch = self.resolved_mismatch(record)
        if mismatch:
            raise ConfigError(f"--out {self.run} was trained with {mismatch}. Resume it with --device and "
                              f"--amp/--precision set to what the run used, or start a new run in another --out.")
        checkpoint.load_model(self.ctx.model, record, self.run.last)
        self.optimizer.load_state_dict(training.optimizer)
        self.scheduler.load_state_dict(training.scheduler)
        if training.scaler and self.scaler.is_enabled():
            self.scaler.load_state_dict(training.scaler)
        self.epoch, self.step, self.best, self.history = record.epoch, record.step, record.best, training.history
        checkpoint.set_rng_state(training.rng)
        log.info("resumed %s at epoch %d/%d (step %d)", self.run, self.epoch, self.cfg.epochs, self.step)
        return True

    def resolved_mismatch(self, record: StudentRecord) -> str:
        """What differs between a checkpoint's resolved teacher/precision/teaching and this
        process's ('' if nothing)."""
        teacher = self.ctx.teacher_mismatch(record)
        if teacher:
            return teacher
        if record.precision is not None and record.precision != self.ctx.precision:
            return f"student precision {record.precision}, but this machine resolves it to {self.ctx.precision}"
        if record.teaching is not None and record.teaching != self.choice.mode:
            return (f"--teaching {record.teaching} (resolved from {self.cfg.teaching}), but this machine resolves it "
                    f"to {self.choice.mode}")
        return ""

    # ------------------------------------------------------------------ one batch
    def forward(self, rows, generator: Optional[torch.Generator], gathered=None) -> Batch:
        """One training batch through the student: augmented views (and mixup) drawn from
        `generator`, the teacher's targets from the teaching mode (online: the teacher on the very
        same augmented, mixed pixels). `gathered`: the rows' (uint8 images, labels, embeddings),
        already read (and pinned) by the prefetcher; resize, augmentation and normalisation
        happen on the device, so the host only moves uint8. Validation and test go through
        `RunContext.predict` (the plain images, the cached teacher embeddings)."""
        ctx = self.ctx
        imgs, labels, cached = gathered if gathered is not None else ctx.data.gather(rows)
        x = to_float(imgs.to(ctx.device, non_blocking=True))
        cached = cached.to(ctx.device, non_blocking=True)
        views = self.teaching.draw_views(rows, generator)
        mix = draw_mix(len(x), self.cfg.mixup, generator)
        xs = ctx.student_pixels(x, views.params, mix)
        targets = self.teaching.targets(rows, x, views, mix, cached)
        out, logits = ctx.outputs(xs)
        return Batch(out, logits, labels.to(ctx.device), targets, mix)

    def validate(self) -> float:
        s, t, y = self.ctx.predict(self.ctx.val_rows)
        if self.ctx.val_metric == "accuracy":
            return accuracy(s.argmax(1), y)
        return agreement(s.argmax(1), t.argmax(1))

    # ------------------------------------------------------------------ the loop
    def fit(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        main = ctx.dist.is_main
        writer = metrics = None
        if main:
            self.run.path.mkdir(parents=True, exist_ok=True)
            self.run.clean_leftovers()
            atomic.write_json(self.run.config, to_dict(cfg))
            self.run.trim_metrics(self.step)  # steps logged after the checkpoint are trained again
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(self.run.tensorboard))
            metrics = open(self.run.metrics, "a", encoding="utf-8")
        per_rank = cfg.batch_size // ctx.dist.world_size
        ctx.model.train()
        try:
            while self.epoch < cfg.epochs:
                # The epoch's order and augmentations come from generators seeded by (seed, epoch):
                # a run resumed at an epoch boundary repeats exactly what it would have done.
                g = torch.Generator().manual_seed(cfg.seed * 100_003 + self.epoch)
                perm = torch.randperm(len(ctx.train_rows), generator=g).numpy()
                perm = perm[: self.steps_per_epoch * cfg.batch_size]
                aug_g = torch.Generator().manual_seed(cfg.seed * 7_919 + self.epoch + 1)
                # In a log the epoch's line below is its progress; an epoch longer than minutes also
                # says where it is, at most every 10% and every 5 minutes.
                bar = progress_bar(range(self.steps_per_epoch), desc=f"epoch {self.epoch + 1}/{cfg.epochs}",
                                   unit="step", enabled=cfg.progress and main, leave=False, min_seconds=300,
                                   end_line=False)
                t0, seen, run_loss = time.time(), 0, 0.0
                batches = (ctx.train_rows.take(perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
                                               [ctx.dist.rank * per_rank:(ctx.dist.rank + 1) * per_rank])
                           for i in range(self.steps_per_epoch))
                for i, (rows, gathered) in zip(bar, prefetched(batches, ctx.data, pin=ctx.device.type == "cuda")):
                    batch = rows  # its length is this rank's share of the step
                    b = self.forward(rows, aug_g, gathered=gathered)
                    terms = ctx.method.losses(b, self.method_ctx)
                    loss = sum(terms.values())
                    if not torch.isfinite(loss.detach()):
                        last = self.run.last
                        raise NonFiniteLossError(
                            f"loss became {loss.item()} at step {self.step} (epoch {self.epoch + 1}); the last good "
                            f"checkpoint is {last if last.exists() else 'none (the first epoch never finished)'}. "
                            f"Try a lower --lr or --amp fp32.")
                    self.optimizer.zero_grad(set_to_none=True)
                    self.scaler.scale(loss).backward()
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                    self.scheduler.step()
                    self.step += 1
                    seen += len(batch) * ctx.dist.world_size
                    run_loss += loss.item()
                    rate = seen / max(time.time() - t0, 1e-9)
                    bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{rate:.0f}")
                    if main and (self.step % 20 == 0 or i == self.steps_per_epoch - 1):
                        rec = {"step": self.step, "epoch": self.epoch + 1, "loss": loss.item(),
                               "lr": self.scheduler.get_last_lr()[0], "img_per_s": rate,
                               **{f"loss_{k}": v.item() for k, v in terms.items()}}
                        metrics.write(json.dumps(rec) + "\n")
                        metrics.flush()
                        for k, v in rec.items():
                            if k not in ("step", "epoch"):
                                writer.add_scalar(f"train/{k}", v, self.step)
                bar.close()
                self.epoch += 1
                val = self.validate()
                rec = {"epoch": self.epoch, "step": self.step, "train_loss": run_loss / max(1, self.steps_per_epoch),
                       f"val_{ctx.val_metric}": val, "img_per_s": seen / max(time.time() - t0, 1e-9),
                       "seconds": time.time() - t0}
                self.history.append(rec)
                improved = val > self.best or cfg.pick == "last"
                if improved:
                    self.best = val
                if main:
                    recent = [h["seconds"] for h in self.history[-5:]]
                    left = (cfg.epochs - self.epoch) * sum(recent) / len(recent)
                    log.info("epoch %d/%d: loss %.4f, val %s %.2f%%%s, %.0f img/s, %s elapsed%s", self.epoch,
                             cfg.epochs, rec["train_loss"], ctx.val_metric, val, " (best)" if improved else "",
                             rec["img_per_s"], duration(sum(h["seconds"] for h in self.history)),
                             f", about {duration(left)} left" if left else "")
                    metrics.write(json.dumps(rec) + "\n")
                    metrics.flush()
                    writer.add_scalar(f"val/{ctx.val_metric}", val, self.step)
                    record = self.record()
                    if improved:  # weights and metadata only: resuming always starts from `last`
                        checkpoint.write_student(self.run.best, record)
                    checkpoint.write_student(self.run.last, record, self.training_state())
                barrier(ctx.dist)
        finally:
            if metrics:
                metrics.close()
            if writer:
                writer.close()


def lr_factor(schedule: str, total: int, warmup: int):
    """The learning rate's factor at each step: a linear warm-up over `warmup` steps, then
    constant or a cosine decay to 0 at `total`."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "cosine":
            t = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
        return 1.0
    return factor
