"""What a run is, apart from the loop that trains it.

A `RunContext` holds everything a run of a TrainConfig is made of: the teacher's outputs
(cached embeddings, text embeddings, probe), the student's data and its train/validation rows,
the frozen teacher head, the student and the pixel pipeline that feeds it. Training adds an
optimizer, a schedule and a teaching mode on top (trainer.py); evaluating a finished run, assessing
it or compressing it needs only this, with the checkpoint's weights loaded (`load_checkpoint`),
so none of them builds a trainer, times the teacher or embeds anything the caches hold."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Optional

import numpy as np
import torch

from ..core.config import to_dict
from ..core.device import dtype_of, resolve_device, resolve_precision
from ..core.distributed import DistInfo, init_distributed, local_device, main_first
from ..core.errors import ConfigError
from ..data.pixels import normalize, to_float
from ..teacher.outputs import prepare_teacher_outputs
from . import checkpoint, inputs
from .augment import identity_views, render
from .config import TrainConfig
from .methods import Batch, Method
from .record import HeadRecord, StudentRecord
from .student_data import Rows, StudentData, train_val_rows
from .students import create_student

log = logging.getLogger(__name__)


class RunContext:
    """The teacher's outputs, the data, the frozen head and the student of a run of `cfg`.

    `teacher`: an already loaded teacher to reuse (fit-prompts has one); by default the one the
    config names is loaded. Under torchrun the student is wrapped for DDP (`model`); `student` is
    the plain module either way."""

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
        self.num_classes = len(self.outs.classes)
        self.embed_dim = self.outs.caches[splits[0]].dim
        self.train_rows, self.val_rows, self.val_metric = train_val_rows(
            self.data, list(cfg.data), not self.method.uses_unlabeled, cfg.val_fraction, cfg.seed)
        if cfg.pick == "agreement":  # a zero-label run: labels pick nothing either
            self.val_metric = "teacher_agreement"
        self.size = cfg.student_size or self.data.native_size()
        self.precision = resolve_precision(cfg.amp, self.device, "student")
        self.amp_dtype = None if self.precision == "fp32" else dtype_of(self.precision)
        if self.precision == "fp16" and self.device.type == "cpu":
            log.warning("warning: --amp fp16 on a CPU is emulated and many times slower than fp32 or bf16; "
                        "use --amp auto")
        torch.manual_seed(cfg.seed)
        self.model = create_student(cfg.student, self.method.out_dim(self.num_classes, self.embed_dim),
                                    cfg.student_pretrained).to(self.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if self.dist.enabled:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    @property
    def student(self) -> torch.nn.Module:
        """The student itself (not its DDP wrapper)."""
        return checkpoint.unwrap(self.model)

    # ------------------------------------------------------------------ checkpoints
    def load_checkpoint(self, record: StudentRecord, path) -> torch.nn.Module:
        """Put a checkpoint's weights into the student and its head into `teacher_head` (the head
        the student was trained and picked with, exactly as `export` folds it in). Returns the
        student (unwrapped). CheckpointMismatchError naming `path` when the weights do not fit."""
        student = checkpoint.load_model(self.model, record, path)
        if record.head is not None:
            self.teacher_head.load_state_dict(record.head.state_dict)
        return student

    def teacher_mismatch(self, record: StudentRecord) -> str:
        """How the teacher recorded in `record` differs from the one loaded here ('' if it does
        not): `--device` and `--precision auto` resolve per machine, and agreement, targets and
        embedding heads are only meaningful against the teacher the student learnt from."""
        now_t, then_t = self.outs.teacher.fingerprint(), record.teacher
        if then_t is None or then_t == now_t:
            return ""
        keys = [k for k in sorted(set(now_t) | set(then_t)) if now_t.get(k) != then_t.get(k)]
        return "another teacher setting: " + "; ".join(f"{k} {then_t.get(k)!r} then, {now_t.get(k)!r} now"
                                                      for k in keys)

    def record(self, *, epoch: int, step: int, best: float, teaching: Optional[str],
               teaching_costs: Optional[dict]) -> StudentRecord:
        """The checkpoint record of the student as it is now, with the loop's progress."""
        return StudentRecord(
            weights=self.student.state_dict(), config=to_dict(self.cfg), output=self.method.output,
            num_classes=self.num_classes, embed_dim=self.embed_dim, size=self.size, classes=self.outs.classes,
            prompts=self.outs.prompts, method=self.method.spec, teacher=self.outs.teacher.fingerprint(),
            precision=self.precision, teaching=teaching, teaching_costs=teaching_costs, inputs=self.inputs,
            epoch=epoch, step=step, best=best, val_metric=self.val_metric,
            # The frozen head travels with the student, so export needs no teacher.
            head=HeadRecord(self.head_name, self.teacher_head.state_dict(), self.logit_scale))

    # ------------------------------------------------------------------ the student's side
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

    def outputs(self, xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the student's output, its class logits) for student pixels: an embedding student's
        logits come through the frozen teacher head."""
        with self.autocast():
            out = self.model(xs)
        out = out.float()
        return out, (out if self.method.output == "logits" else self.teacher_head(out))

    def plain_batch(self, rows: Rows, gathered=None) -> Batch:
        """`rows` as validation and test see them: the plain images and the cached teacher
        embeddings. `gathered`: the rows' (uint8 images, labels, embeddings), already read."""
        imgs, labels, temb = gathered if gathered is not None else self.data.gather(rows)
        x = to_float(imgs.to(self.device, non_blocking=True))
        temb = temb.to(self.device, non_blocking=True)
        out, logits = self.outputs(self.student_pixels(x, identity_views(len(x)), None))
        return Batch(out, logits, labels.to(self.device), temb, None)

    @torch.no_grad()
    def predict(self, rows: Rows, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(student logits, teacher logits, labels) for `rows`, on CPU; the student is left in the
        mode it was in."""
        was = self.model.training
        self.model.eval()
        s, t, y = [], [], []
        try:
            for i in range(0, len(rows), batch_size):
                b = self.plain_batch(rows.take(np.arange(i, min(i + batch_size, len(rows)))))
                s.append(b.student_logits.cpu())
                t.append(self.teacher_head(b.teacher_emb).cpu())
                y.append(b.labels.cpu())
        finally:
            self.model.train(was)
        return torch.cat(s), torch.cat(t), torch.cat(y)
