"""`clipdistill train`: one plain training loop for every distillation method.

Read it top to bottom: prepare the teacher's outputs (cached), build the student, then
epochs of batches; each epoch ends with validation on a held-out part of train, a `best`
checkpoint when it improves and a full-state `last` checkpoint. The test split is only
touched by the final report (`evaluate.py`)."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import atomic, checkpoint
from .config import DataOptions, TeacherOptions, check, option, to_dict
from .device import resolve_device
from .distributed import DistInfo, all_reduce_sum, barrier, cleanup, init_distributed, local_device
from .errors import ConfigError, NonFiniteLossError
from .heads import ProbeConfig
from .methods import Batch, Method, MethodContext
from .students import AUGMENTATIONS, create_student, prepare_images
from .train_data import StudentData, train_val_rows

# Flags that may differ between a run and its resumption without changing the result.
RUNTIME_FIELDS = ("resume", "progress", "workers", "out", "device", "cache_dir", "embed_batch_size", "data_root")


@dataclasses.dataclass
class TrainConfig(TeacherOptions, DataOptions):
    data: list[str] = option(default_factory=lambda: ["train"],
                             help="splits to train on, comma-separated (e.g. train,unlabeled)")
    method: str = option("kl", "distillation method: labels, kl, mse, cosine, or a sum such as kl+mse")
    loss_weights: list[float] = option(default_factory=list, help="weights of the method's terms, e.g. 1,0.5")
    head: str = option("auto", "teacher head for kl targets and for embedding students: text, linear, or auto "
                               "(linear when train has labels)", choices=["auto", "text", "linear"])
    logit_scale: float = option(100.0, "text head: cosine similarities times this (CLIP: 100; the study's kl: 1)")
    temperature: float = option(1.0, "kl temperature T: softmax(logits / T), loss times T^2")
    student: str = option("resnet18", "any timm architecture")
    student_pretrained: bool = option(False, "start from timm's pretrained weights (needs them in the HF cache)")
    student_size: int = option(0, "student input side in pixels; 0 = the dataset's native size (folders: 96)")
    student_mean: float = option(0.5, "student input normalisation mean (the study: 0.5)")
    student_std: float = option(0.25, "student input normalisation std (the study: 0.25)")
    augment: str = option("none", "student augmentation", choices=list(AUGMENTATIONS))
    epochs: int = option(30, "training epochs (the study: 50)")
    batch_size: int = option(64, "images per step, over all processes (the study: 64)")
    lr: float = option(3e-4, "Adam learning rate (the study: 3e-4)")
    weight_decay: float = option(0.0, "AdamW weight decay (0 = plain Adam, as the study)")
    schedule: str = option("cosine", "learning-rate schedule (the study: constant)", choices=["constant", "cosine"])
    amp: str = option("auto", "student precision: auto (fp16 AMP on CUDA, bf16 on CPUs that have it), fp32, "
                              "bf16, fp16", choices=["auto", "fp32", "bf16", "fp16"])
    channels_last: bool = option(True, "channels-last memory format (faster convolutions on CPU and tensor cores)")
    val_fraction: float = option(0.1, "fraction of the labelled train split held out to pick `best`")
    probe_epochs: int = option(15, "linear head: probe epochs (as teacher-eval)")
    probe_lr: float = option(3e-3, "linear head: probe learning rate (as teacher-eval)")
    probe_batch_size: int = option(64, "linear head: probe batch size (as teacher-eval)")
    seed: int = option(0, "random seed (data order, init, augmentation)")
    out: str = option("", "run folder; default runs/DATASET-STUDENT-METHOD-HEAD-DATA", metavar="DIR")
    resume: str = option("auto", "auto: continue the run in --out if there is one; never: refuse an existing run",
                         choices=["auto", "never"])
    progress: bool = option(True, "show progress bars")

    def __post_init__(self) -> None:
        self._check_teacher()
        self._check_data()
        check(bool(self.data), "data", "give at least one split, e.g. train or train,unlabeled")
        check("test" not in self.data, "data", "the test split is kept for the final report; train on train "
                                               "and/or unlabeled")
        check(self.epochs >= 1, "epochs", "must be >= 1")
        check(self.batch_size >= 2, "batch_size", "must be >= 2 (batch norm needs two samples)")
        check(self.lr > 0, "lr", "must be > 0")
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        check(self.temperature > 0, "temperature", "must be > 0")
        check(self.logit_scale > 0, "logit_scale", "must be > 0")
        check(0 < self.val_fraction < 1, "val_fraction", "must be in (0, 1)")
        check(self.student_size >= 0, "student_size", "must be >= 0")
        check(self.student_std > 0, "student_std", "must be > 0")
        Method(self.method, self.loss_weights)  # validates names and weights

    def probe_config(self) -> ProbeConfig:
        return ProbeConfig(lr=self.probe_lr, batch_size=self.probe_batch_size, epochs=self.probe_epochs,
                           holdout=self.val_fraction, seed=self.seed)

    def run_dir(self) -> Path:
        if self.out:
            return Path(self.out)
        return Path("runs") / f"{self.dataset}-{self.student}-{self.method}-{self.head}-{'+'.join(self.data)}"


def _compare(saved: dict, now: dict) -> list[str]:
    keys = sorted((set(saved) | set(now)) - set(RUNTIME_FIELDS))
    return [f"--{k.replace('_', '-')}: {saved.get(k)!r} in the run, {now.get(k)!r} now" for k in keys
            if saved.get(k) != now.get(k)]


def _amp_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    if amp == "fp32":
        return None
    if amp == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu" and torch.backends.mkldnn.is_available() and \
                torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return torch.bfloat16
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


class Trainer:
    """State of one training run; `train()` below is the whole algorithm."""

    def __init__(self, cfg: TrainConfig, log=print, teacher=None):
        from .teacher_outputs import prepare_teacher_outputs

        self.cfg, self.log = cfg, log
        base = resolve_device(cfg.device)
        self.dist: DistInfo = init_distributed(base)
        self.device = local_device(base, self.dist)
        self.run_dir = cfg.run_dir()
        self.method = Method(cfg.method, cfg.loss_weights)
        splits = list(dict.fromkeys(["train"] + list(cfg.data) + ["test"])) if cfg.dataset != "folder" else \
            list(dict.fromkeys(list(cfg.data) + ["test"]))
        head = cfg.head
        # Rank 0 fills the caches first; the others wait, then find them complete.
        if not self.dist.is_main:
            barrier(self.dist)
        self.outs = prepare_teacher_outputs(cfg, cfg, splits, probe=cfg.probe_config() if head != "text" else None,
                                            teacher=teacher, progress=cfg.progress and self.dist.is_main, log=log,
                                            probe_required=head == "linear")
        if self.dist.is_main:
            barrier(self.dist)
        self.data = StudentData(self.outs, splits, cfg.student_size or None, progress=cfg.progress)
        if head == "auto":
            head = "linear" if self.data.has_labels("train") else "text"
        if head == "linear" and self.outs.probe is None:
            raise ConfigError("--head linear needs labels in the train split to train the probe; use --head text")
        self.head_name = head
        self.teacher_head = (self.outs.probe if head == "linear" else self.outs.text_head(cfg.logit_scale))
        self.teacher_head = self.teacher_head.to(self.device).eval()
        for p in self.teacher_head.parameters():
            p.requires_grad_(False)
        self.ctx = MethodContext(self.teacher_head, cfg.temperature)
        self.num_classes = len(self.outs.classes)
        self.embed_dim = self.outs.caches[splits[0]].dim
        labelled_only = not self.method.uses_unlabeled
        self.train_rows, self.val_rows, self.val_metric = train_val_rows(
            self.data, list(cfg.data), labelled_only, cfg.val_fraction, cfg.seed)
        if len(self.train_rows) < cfg.batch_size:
            raise ConfigError(f"--data {','.join(cfg.data)}: only {len(self.train_rows)} usable training images "
                              f"for --batch-size {cfg.batch_size}" + (" (the labels method ignores unlabeled "
                                                                      "images)" if labelled_only else ""))
        self.size = cfg.student_size or self.data.native_size()
        self.amp_dtype = _amp_dtype(cfg.amp, self.device)
        if self.amp_dtype == torch.float16 and self.device.type == "cpu":
            log("warning: --amp fp16 on a CPU is emulated and many times slower than fp32 or bf16; use --amp auto")
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
        total = self.steps_per_epoch * cfg.epochs
        lam = (lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))) if cfg.schedule == "cosine" else \
            (lambda s: 1.0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lam)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.epoch, self.step, self.best, self.history = 0, 0, -1.0, []

    # ------------------------------------------------------------------ state
    def state(self) -> dict:
        return {"model": checkpoint.unwrap(self.model).state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "epoch": self.epoch,
                "step": self.step, "best": self.best, "history": self.history, "config": to_dict(self.cfg),
                "head": self.head_name, "method": self.method.spec, "output": self.method.output,
                "num_classes": self.num_classes, "embed_dim": self.embed_dim, "size": self.size,
                "classes": self.outs.classes, "prompts": self.outs.prompts, "val_metric": self.val_metric,
                "teacher": self.outs.teacher.fingerprint(),
                "amp": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "fp32",
                # The frozen head travels with the student, so export needs no teacher.
                "teacher_head": {"kind": self.head_name, "state_dict": self.teacher_head.state_dict(),
                                 "logit_scale": self.cfg.logit_scale}}

    def try_resume(self) -> bool:
        ckpt_path = self.run_dir / "checkpoints" / "last.pt"
        if not ckpt_path.exists():
            return False
        if self.cfg.resume == "never":
            raise ConfigError(f"--out {self.run_dir} already holds a run; use --resume auto to continue it or "
                              f"another --out")
        state = checkpoint.load(ckpt_path)
        diff = _compare(state["config"], to_dict(self.cfg))
        if diff:
            raise ConfigError(f"--out {self.run_dir} holds a run made with another config: " + "; ".join(diff) +
                              ". Use the same flags to resume it, or another --out for a new run.")
        # `--device`, `--amp auto` and `--precision auto` resolve per machine: a run continued
        # elsewhere must still see the same teacher targets and the same student precision.
        mismatch = self.resolved_mismatch(state)
        if mismatch:
            raise ConfigError(f"--out {self.run_dir} was trained with {mismatch}. Resume it with --device and "
                              f"--amp/--precision set to what the run used, or start a new run in another --out.")
        checkpoint.unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"] and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step, self.best, self.history = state["epoch"], state["step"], state["best"], state["history"]
        checkpoint.set_rng_state(state["rng"])
        self.log(f"resumed {self.run_dir} at epoch {self.epoch}/{self.cfg.epochs} (step {self.step})")
        return True

    def resolved_mismatch(self, state: dict) -> str:
        """What differs between a checkpoint's resolved teacher/precision and this process's ('' if nothing)."""
        now_t, then_t = self.outs.teacher.fingerprint(), state.get("teacher")
        if then_t is not None and then_t != now_t:
            keys = [k for k in sorted(set(now_t) | set(then_t)) if now_t.get(k) != then_t.get(k)]
            return "another teacher setting: " + "; ".join(f"{k} {then_t.get(k)!r} then, {now_t.get(k)!r} now"
                                                          for k in keys)
        now_amp = str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "fp32"
        then_amp = state.get("amp", now_amp)
        if then_amp != now_amp:
            return f"student precision {then_amp}, but this machine resolves it to {now_amp}"
        return ""

    # ------------------------------------------------------------------ one batch
    def forward(self, rows, generator: Optional[torch.Generator], train: bool):
        imgs, labels, temb = self.data.gather(rows)
        x = prepare_images(imgs.to(self.device, non_blocking=True), self.size, self.cfg.student_mean,
                           self.cfg.student_std, self.cfg.augment if train else "none", generator,
                           self.cfg.channels_last)
        autocast = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()
        with autocast:
            out = self.model(x)
        out = out.float()
        logits = out if self.method.output == "logits" else self.teacher_head(out)
        return Batch(out, logits, labels.to(self.device), temb.to(self.device))

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
        ck_dir = self.run_dir / "checkpoints"
        writer = None
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic.write_json(self.run_dir / "config.json", to_dict(cfg))
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        metrics = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") if main else None
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
                for i in bar:
                    batch = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
                    mine = batch[self.dist.rank * per_rank:(self.dist.rank + 1) * per_rank]
                    b = self.forward(self.train_rows.take(mine), aug_g, train=True)
                    terms = self.method.losses(b, self.ctx)
                    loss = sum(terms.values())
                    if not torch.isfinite(loss.detach()):
                        last = ck_dir / "last.pt"
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
                    seen += len(batch)
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
                improved = val > self.best
                if improved:
                    self.best = val
                if main:
                    self.log(f"epoch {self.epoch}/{cfg.epochs}: loss {rec['train_loss']:.4f}, "
                             f"val {self.val_metric} {val:.2f}%{' (best)' if improved else ''}, "
                             f"{rec['img_per_s']:.0f} img/s")
                    metrics.write(json.dumps(rec) + "\n")
                    metrics.flush()
                    writer.add_scalar(f"val/{self.val_metric}", val, self.step)
                    if improved:  # weights and metadata only: resuming always starts from `last`
                        checkpoint.save(ck_dir / "best.pt", **{k: v for k, v in self.state().items()
                                                               if k not in ("optimizer", "scheduler", "scaler")})
                    checkpoint.save(ck_dir / "last.pt", **self.state())
                barrier(self.dist)
        finally:
            if metrics:
                metrics.close()
            if writer:
                writer.close()


def finished_result(cfg: TrainConfig) -> Optional[dict]:
    """The result of a finished run of this very config in its folder, if there is one."""
    run = cfg.run_dir()
    if not (run / "result.json").exists() or not (run / "config.json").exists():
        return None
    if _compare(atomic.read_json(run / "config.json"), to_dict(cfg)):
        return None
    return atomic.read_json(run / "result.json")


def train(cfg: TrainConfig, log=print, teacher=None) -> dict:
    """Train (or resume, or reuse a finished run) and return the test report."""
    from .evaluate import evaluate_trainer

    if cfg.resume == "never" and (cfg.run_dir() / "checkpoints" / "last.pt").exists():
        raise ConfigError(f"--out {cfg.run_dir()} already holds a run (--resume never); use --resume auto to "
                          f"continue or reuse it, or another --out")
    done = finished_result(cfg)
    if done is not None:
        log(f"{cfg.run_dir()} is already complete (result.json); reusing it")
        return done
    t0 = time.time()
    trainer = Trainer(cfg, log=log, teacher=teacher)
    try:
        result_path = trainer.run_dir / "result.json"
        resumed = trainer.try_resume()
        if resumed and trainer.epoch >= cfg.epochs and result_path.exists():
            log(f"{trainer.run_dir} is already complete")
            return atomic.read_json(result_path)
        trainer.fit()
        # Seconds spent in epochs, summed over every resumption of the run.
        seconds = sum(h["seconds"] for h in trainer.history)
        return evaluate_trainer(trainer, extra={"train_seconds": round(seconds, 2),
                                                "wall_seconds": round(time.time() - t0, 2)})
    finally:
        cleanup(trainer.dist)
