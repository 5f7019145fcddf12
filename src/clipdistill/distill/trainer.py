"""The training loop: one plain loop for every distillation method.

Read it top to bottom: prepare the teacher's outputs (cached), build the student, then
epochs of batches; each epoch ends with validation on a held-out part of train, a `best`
checkpoint when it improves and a full-state `last` checkpoint. The test split is only
touched by the final report (evaluate.py)."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from contextlib import nullcontext
from typing import Optional

import numpy as np
import torch

from ..core import atomic
from ..core.config import config_diff, to_dict
from ..core.device import dtype_of, resolve_device, resolve_precision
from ..core.distributed import DistInfo, barrier, init_distributed, local_device, main_first
from ..core.errors import ConfigError, NonFiniteLossError
from ..data.pixels import normalize, to_float
from ..teacher.outputs import prepare_teacher_outputs
from . import checkpoint, inputs
from .augment import AUGMENTATIONS, draw_mix, identity_views, render, sample_views
from .config import TrainConfig
from .data import StudentData, prefetched, train_val_rows
from .methods import Batch, Method, MethodContext
from .students import create_student
from .teaching import resolve_teaching

log = logging.getLogger(__name__)


class Trainer:
    """State of one training run; `fit()` is the whole algorithm."""

    def __init__(self, cfg: TrainConfig, teacher=None):
        self.cfg = cfg
        base = resolve_device(cfg.device)
        self.dist: DistInfo = init_distributed(base)
        self.device = local_device(base, self.dist)
        self.run = cfg.run_dir()
        self.method = Method(cfg.method, cfg.loss_weights)
        splits = inputs.splits_of(cfg)
        head = cfg.head
        # Rank 0 fills the caches (embeddings, then pixels) first; the others wait, then find them
        # complete; a failure on rank 0 stops them at once with its message.
        self.outs = main_first(self.dist, lambda: prepare_teacher_outputs(
            cfg, cfg, splits, probe=cfg.probe_config() if head != "text" else None, teacher=teacher,
            progress=cfg.progress and self.dist.is_main, probe_required=head == "linear", optional=("test",)),
            "preparing the teacher's outputs")
        splits = [s for s in splits if s in self.outs.datasets]  # a pool without labelled test images
        self.inputs = inputs.recorded(cfg, self.outs.datasets)  # what this run is made from, by content
        self.data = main_first(self.dist, lambda: StudentData(self.outs, splits, cfg.student_size or None,
                                                              progress=cfg.progress and self.dist.is_main),
                               "decoding the images")
        if cfg.rows:  # a curated pool: only its rows train (and hold out the rows that pick `best`)
            from ..teacher.curate import load_rows

            if "unlabeled" not in self.data.names:
                raise ConfigError("--rows selects rows of the unlabeled split; add unlabeled to --data")
            k = self.data.names.index("unlabeled")
            self.data.valid[k] = np.intersect1d(self.data.valid[k],
                                                load_rows(cfg.rows, self.outs.datasets["unlabeled"].fingerprint()))
        if head == "auto":
            head = "linear" if self.data.has_labels("train") else "text"
        if head == "linear" and self.outs.probe is None:
            raise ConfigError("--head linear needs labels in the train split to train the probe; use --head text")
        self.head_name = head
        self.logit_scale = self.outs.teacher.logit_scale if cfg.logit_scale == "auto" else float(cfg.logit_scale)
        self.teacher_head = (self.outs.probe if head == "linear" else self.outs.text_head(self.logit_scale))
        self.teacher_head = self.teacher_head.to(self.device).eval()
        for p in self.teacher_head.parameters():
            p.requires_grad_(False)
        self.ctx = MethodContext(self.teacher_head, cfg.temperature)
        self.num_classes = len(self.outs.classes)
        self.embed_dim = self.outs.caches[splits[0]].dim
        labelled_only = not self.method.uses_unlabeled
        self.train_rows, self.val_rows, self.val_metric = train_val_rows(
            self.data, list(cfg.data), labelled_only, cfg.val_fraction, cfg.seed)
        if cfg.pick == "agreement":  # a zero-label run: labels pick nothing either
            self.val_metric = "teacher_agreement"
        if len(self.train_rows) < cfg.batch_size:
            raise ConfigError(f"--data {','.join(cfg.data)}: only {len(self.train_rows)} usable training images "
                              f"for --batch-size {cfg.batch_size}" + (" (the labels method ignores unlabeled "
                                                                      "images)" if labelled_only else ""))
        self.size = cfg.student_size or self.data.native_size()
        self.aug = AUGMENTATIONS.get(cfg.augment)
        self.precision = resolve_precision(cfg.amp, self.device, "student")
        self.amp_dtype = None if self.precision == "fp32" else dtype_of(self.precision)
        if self.precision == "fp16" and self.device.type == "cpu":
            log.warning("warning: --amp fp16 on a CPU is emulated and many times slower than fp32 or bf16; use --amp auto")
        torch.manual_seed(cfg.seed)
        self.model = create_student(cfg.student, self.method.out_dim(self.num_classes, self.embed_dim),
                                    cfg.student_pretrained).to(self.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if self.dist.enabled:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        opt_cls = torch.optim.AdamW if cfg.weight_decay > 0 else torch.optim.Adam
        self.optimizer = opt_cls(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.steps_per_epoch = len(self.train_rows) // cfg.batch_size
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_factor(cfg.schedule, self.steps_per_epoch * cfg.epochs,
                                      min(int(round(cfg.warmup_epochs * self.steps_per_epoch)),
                                          self.steps_per_epoch * cfg.epochs // 2)))
        # Last: the choice between online and cached views times the student built above.
        self.teaching = resolve_teaching(self)
        if self.teaching.mode == "online":
            self.outs.teacher.to(self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.epoch, self.step, self.best, self.history = 0, 0, -1.0, []

    # ------------------------------------------------------------------ state
    def weights(self) -> dict:
        """What `best` holds (and `export`, `eval` need): weights and what they mean."""
        return {"model": checkpoint.unwrap(self.model).state_dict(), "epoch": self.epoch, "step": self.step,
                "best": self.best, "config": to_dict(self.cfg), "head": self.head_name, "method": self.method.spec,
                "output": self.method.output, "num_classes": self.num_classes, "embed_dim": self.embed_dim,
                "size": self.size, "classes": self.outs.classes, "prompts": self.outs.prompts,
                "val_metric": self.val_metric, "teacher": self.outs.teacher.fingerprint(), "amp": self.precision,
                "teaching": self.teaching.mode, "inputs": self.inputs,
                # The frozen head travels with the student, so export needs no teacher.
                "teacher_head": {"kind": self.head_name, "state_dict": self.teacher_head.state_dict(),
                                 "logit_scale": self.logit_scale}}

    def state(self) -> dict:
        """What `last` holds: everything to continue exactly where the run stopped."""
        return {**self.weights(), "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "history": self.history}

    def try_resume(self) -> bool:
        self.run.check_format()
        if not self.run.last.exists():
            return False
        if self.cfg.resume == "never":
            raise ConfigError(f"--out {self.run} already holds a run; use --resume auto to continue it or "
                              f"another --out")
        state = checkpoint.load(self.run.last)
        diff = config_diff(state["config"], to_dict(self.cfg))
        if diff:
            raise ConfigError(f"--out {self.run} holds a run made with another config: " + "; ".join(diff) +
                              ". Use the same flags to resume it, or another --out for a new run.")
        changed = inputs.differences(state.get("inputs"), self.inputs)
        if changed == [inputs.UNRECORDED]:
            log.warning("warning: %s: %s; resuming it as before", self.run, inputs.UNRECORDED)
        elif changed:
            raise ConfigError(f"--out {self.run} holds a run made from other inputs: " + "; ".join(changed) +
                              f". Its checkpoints learnt from those; give another --out for a run on what the "
                              f"files hold now (or delete {self.run} to train there again).")
        # `--device`, `--amp auto` and `--precision auto` resolve per machine: a run continued
        # elsewhere must still see the same teacher targets and the same student precision.
        mismatch = self.resolved_mismatch(state)
        if mismatch:
            raise ConfigError(f"--out {self.run} was trained with {mismatch}. Resume it with --device and "
                              f"--amp/--precision set to what the run used, or start a new run in another --out.")
        checkpoint.load_model(self.model, state, self.run.last)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"] and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step, self.best, self.history = state["epoch"], state["step"], state["best"], state["history"]
        checkpoint.set_rng_state(state["rng"])
        log.info("resumed %s at epoch %d/%d (step %d)", self.run, self.epoch, self.cfg.epochs, self.step)
        return True

    def resolved_mismatch(self, state: dict) -> str:
        """What differs between a checkpoint's resolved teacher/precision and this process's ('' if nothing)."""
        now_t, then_t = self.outs.teacher.fingerprint(), state.get("teacher")
        if then_t is not None and then_t != now_t:
            keys = [k for k in sorted(set(now_t) | set(then_t)) if now_t.get(k) != then_t.get(k)]
            return "another teacher setting: " + "; ".join(f"{k} {then_t.get(k)!r} then, {now_t.get(k)!r} now"
                                                          for k in keys)
        then_amp = state.get("amp", self.precision)
        if then_amp != self.precision:
            return f"student precision {then_amp}, but this machine resolves it to {self.precision}"
        then_teaching = state.get("teaching", self.teaching.mode)
        if then_teaching != self.teaching.mode:
            return (f"--teaching {then_teaching} (resolved from {self.cfg.teaching}), but this machine resolves it to "
                    f"{self.teaching.mode}")
        return ""

    # ------------------------------------------------------------------ one batch
    def forward(self, rows, generator: Optional[torch.Generator], train: bool, gathered=None):
        """One batch through the student (and, teaching online, through the teacher on the
        very same augmented, mixed pixels). Validation and test see the plain images and the
        cached teacher embeddings. `gathered`: the rows' (uint8 images, labels, embeddings),
        already read (and pinned) by the prefetcher; resize, augmentation and normalisation
        happen on the device, so the host only moves uint8."""
        imgs, labels, temb = gathered if gathered is not None else self.data.gather(rows)
        x = to_float(imgs.to(self.device, non_blocking=True))
        temb = temb.to(self.device, non_blocking=True)
        if train:
            views = self.teaching.draw(rows, generator) if self.teaching.mode == "views" else \
                sample_views(len(x), self.aug, generator)
            mix = draw_mix(len(x), self.cfg.mixup, generator)
        else:
            views, mix = identity_views(len(x)), None
        xs = self.student_pixels(x, views, mix)
        if train and self.teaching.mode == "online":
            temb = self.teaching.encode(x, views, mix)
        elif train and self.teaching.mode == "views":
            temb = self.teaching.embeddings(rows).to(self.device)
            if mix is not None:
                temb = mix.apply(temb)  # an approximation: the mix of the views' embeddings
        elif mix is not None:
            temb = mix.apply(temb)
        with self.autocast():
            out = self.model(xs)
        out = out.float()
        logits = out if self.method.output == "logits" else self.teacher_head(out)
        return Batch(out, logits, labels.to(self.device), temb, mix)

    def student_pixels(self, x: torch.Tensor, views: torch.Tensor, mix) -> torch.Tensor:
        """The student's input for views of float images in [0, 1]: rendered at its size,
        mixed, normalised, in its memory format."""
        xs = render(x, views, self.size)
        if mix is not None:
            xs = mix.apply(xs)
        xs = normalize(xs, self.cfg.student_mean, self.cfg.student_std)
        return xs.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last else xs

    def autocast(self):
        """The student's mixed precision (a no-op context in fp32)."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()

    @torch.no_grad()
    def predict(self, rows, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(student logits, teacher logits, labels) for `rows`, on CPU."""
        self.model.eval()
        s, t, y = [], [], []
        for i in range(0, len(rows), batch_size):
            b = self.forward(rows.take(np.arange(i, min(i + batch_size, len(rows)))), None, train=False)
            s.append(b.student_logits.cpu())
            t.append(self.teacher_head(b.teacher_emb).cpu())
            y.append(b.labels.cpu())
        self.model.train()
        return torch.cat(s), torch.cat(t), torch.cat(y)

    def validate(self) -> float:
        s, t, y = self.predict(self.val_rows)
        if self.val_metric == "accuracy":
            return float((s.argmax(1) == y).float().mean() * 100)
        return float((s.argmax(1) == t.argmax(1)).float().mean() * 100)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> None:
        from tqdm import tqdm

        cfg, main = self.cfg, self.dist.is_main
        writer = metrics = None
        if main:
            self.run.path.mkdir(parents=True, exist_ok=True)
            self.run.clean_leftovers()
            atomic.write_json(self.run.config, to_dict(cfg))
            self.run.trim_metrics(self.step)  # steps logged after the checkpoint are trained again
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(self.run.tensorboard))
            metrics = open(self.run.metrics, "a", encoding="utf-8")
        per_rank = cfg.batch_size // self.dist.world_size
        self.model.train()
        try:
            while self.epoch < cfg.epochs:
                # The epoch's order and augmentations come from generators seeded by (seed, epoch):
                # a run resumed at an epoch boundary repeats exactly what it would have done.
                g = torch.Generator().manual_seed(cfg.seed * 100_003 + self.epoch)
                perm = torch.randperm(len(self.train_rows), generator=g).numpy()
                perm = perm[: self.steps_per_epoch * cfg.batch_size]
                aug_g = torch.Generator().manual_seed(cfg.seed * 7_919 + self.epoch + 1)
                bar = tqdm(range(self.steps_per_epoch), desc=f"epoch {self.epoch + 1}/{cfg.epochs}", unit="step",
                           disable=not (cfg.progress and main), file=sys.stderr, dynamic_ncols=True, leave=False)
                t0, seen, run_loss = time.time(), 0, 0.0
                batches = (self.train_rows.take(perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
                                                [self.dist.rank * per_rank:(self.dist.rank + 1) * per_rank])
                           for i in range(self.steps_per_epoch))
                for i, (rows, gathered) in zip(bar, prefetched(batches, self.data, pin=self.device.type == "cuda")):
                    batch = rows  # its length is this rank's share of the step
                    b = self.forward(rows, aug_g, train=True, gathered=gathered)
                    terms = self.method.losses(b, self.ctx)
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
                    seen += len(batch) * self.dist.world_size
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
                       f"val_{self.val_metric}": val, "img_per_s": seen / max(time.time() - t0, 1e-9),
                       "seconds": time.time() - t0}
                self.history.append(rec)
                improved = val > self.best or cfg.pick == "last"
                if improved:
                    self.best = val
                if main:
                    recent = [h["seconds"] for h in self.history[-5:]]
                    left = (cfg.epochs - self.epoch) * sum(recent) / len(recent)
                    log.info("epoch %d/%d: loss %.4f, val %s %.2f%%%s, %.0f img/s%s", self.epoch, cfg.epochs,
                             rec["train_loss"], self.val_metric, val, " (best)" if improved else "", rec["img_per_s"],
                             f", about {left / 60:.0f} min {left % 60:.0f} s left" if left else "")
                    metrics.write(json.dumps(rec) + "\n")
                    metrics.flush()
                    writer.add_scalar(f"val/{self.val_metric}", val, self.step)
                    if improved:  # weights and metadata only: resuming always starts from `last`
                        checkpoint.save(self.run.best, **self.weights())
                    checkpoint.save(self.run.last, **self.state())
                barrier(self.dist)
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
