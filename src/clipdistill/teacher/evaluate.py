"""`clipdistill teacher-eval`: how good is the teacher on this task? (the study's first
table: zero-shot with text prompts, and a linear probe)."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Optional

import torch

from ..core import atomic
from ..core.config import check, option, to_dict
from ..core.errors import MissingSplitError
from ..data.options import DataOptions
from .heads import ProbeConfig, accuracy
from .openclip_teacher import Teacher
from .options import TeacherOptions
from .outputs import prepare_teacher_outputs

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TeacherEvalConfig(TeacherOptions, DataOptions):
    logit_scale: float = option(100.0, "text head: cosine similarities are multiplied by this (CLIP: 100)")
    probe_epochs: int = option(15, "linear probe epochs (the study: 15)")
    probe_lr: float = option(3e-3, "linear probe Adam learning rate (the study: 3e-4, tuned for 512-d ViT-B-32 "
                                   "embeddings)")
    probe_batch_size: int = option(64, "linear probe batch size (the study: 64)")
    probe_holdout: float = option(0.1, "fraction of train held out to pick the probe's epoch (never the test split)")
    seed: int = option(0, "random seed (>= 0)")
    out: str = option("runs/teacher-eval", "folder for teacher_eval.json", metavar="DIR", runtime=True)
    progress: bool = option(True, "show progress bars", runtime=True)

    def __post_init__(self) -> None:
        self._check_teacher()
        self._check_data()
        check(self.probe_epochs >= 1, "probe_epochs", "must be >= 1")
        check(self.probe_lr > 0, "probe_lr", "must be > 0")
        check(self.probe_batch_size >= 1, "probe_batch_size", "must be >= 1")
        check(0 <= self.probe_holdout < 1, "probe_holdout", "must be in [0, 1)")
        check(self.logit_scale > 0, "logit_scale", "must be > 0")
        check(self.seed >= 0, "seed", "must be >= 0")

    def probe_config(self) -> ProbeConfig:
        return ProbeConfig(lr=self.probe_lr, batch_size=self.probe_batch_size, epochs=self.probe_epochs,
                           holdout=self.probe_holdout, seed=self.seed)


def teacher_eval(cfg: TeacherEvalConfig, teacher: Optional[Teacher] = None) -> dict:
    t0 = time.time()
    try:  # the datasets are opened before the teacher is loaded: a missing split costs nothing
        outs = prepare_teacher_outputs(cfg, cfg, ["train", "test"], probe=cfg.probe_config(), teacher=teacher,
                                       progress=cfg.progress)
    except MissingSplitError as e:
        if e.split != "train":
            raise
        log.info("--data-root %s has no train/ folder: zero-shot only (the linear probe needs labelled "
                 "training images)", cfg.data_root)
        outs = prepare_teacher_outputs(cfg, cfg, ["test"], probe=None, teacher=teacher, progress=cfg.progress)
    emb, labels = outs.labelled("test")
    x, y = torch.from_numpy(emb), torch.from_numpy(labels)
    keep = y >= 0
    x, y = x[keep], y[keep]
    n_cls = len(outs.classes)
    with torch.no_grad():
        zs, zs_pc = accuracy(outs.text_head(cfg.logit_scale)(x), y, n_cls)
        lp, lp_pc = accuracy(outs.probe(x), y, n_cls) if outs.probe is not None else (None, None)
    result = {
        "zero_shot_accuracy": zs,
        "linear_probe_accuracy": lp,
        "zero_shot_per_class": dict(zip(outs.classes, zs_pc)),
        "linear_probe_per_class": dict(zip(outs.classes, lp_pc)) if lp_pc is not None else None,
        "n_test": int(len(y)),
        "classes": outs.classes,
        "prompts": outs.prompts,
        "templates": outs.templates,
        "teacher": outs.teacher.fingerprint(),
        "probe": {k: v for k, v in outs.probe_info.items() if k != "history"} if outs.probe_info else None,
        "config": to_dict(cfg),
        "seconds": round(time.time() - t0, 2),
    }
    path = atomic.write_json(Path(cfg.out) / "teacher_eval.json", result)
    result["path"] = str(path)
    return result
