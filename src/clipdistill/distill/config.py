"""`TrainConfig`: every flag of `clipdistill train`, which is also the Python API's config."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Union

from ..core.config import check, option
from ..data.options import DataOptions
from ..teacher.heads import ProbeConfig
from ..teacher.options import TeacherOptions
from .methods import Method
from .rundir import RunDir
from .augment import AUGMENTATIONS

TEACHING = ("auto", "cached", "online", "views")


@dataclasses.dataclass
class TrainConfig(TeacherOptions, DataOptions):
    data: list[str] = option(default_factory=lambda: ["train"],
                             help="splits to train on, comma-separated (e.g. train,unlabeled)")
    rows: str = option("", "train on these rows of the unlabeled split only: a curation file written by "
                           "`fit-prompts` (CURATION.json); default: every readable image", metavar="FILE")
    method: str = option("kl", "distillation method: labels, kl, mse, cosine, or a sum such as kl+mse")
    loss_weights: list[float] = option(default_factory=list, help="weights of the method's terms, e.g. 1,0.5")
    head: str = option("auto", "teacher head for kl targets and for embedding students: text, linear, or auto "
                               "(linear when train has labels)", choices=["auto", "text", "linear"])
    logit_scale: Union[float, str] = option("auto", "text head: cosine similarities times this; auto = the teacher's "
                                                     "own learnt scale (CLIP ViT-B-32: 100; tiny-shapes: 17.4); the "
                                                     "study's kl used 1", metavar="auto|S")
    temperature: float = option(1.0, "kl temperature T: softmax(logits / T), loss times T^2")
    student: str = option("resnet18", "any timm architecture")
    student_pretrained: bool = option(False, "start from timm's pretrained weights (needs them in the HF cache)")
    student_size: int = option(0, "student input side in pixels (>= 16); 0 = the dataset's native size (folders: 96)")
    student_mean: float = option(0.5, "student input normalisation mean (the study: 0.5)")
    student_std: float = option(0.25, "student input normalisation std (the study: 0.25)")
    augment: str = option("rrc", "augmentation of each training view: none (the study), flip, flip-crop, rrc "
                                 "(random resized crop + flip)", choices=list(AUGMENTATIONS))
    mixup: float = option(0.0, "mixup alpha (0 = off): each batch mixed with its reverse, lambda ~ Beta(alpha, alpha)")
    teaching: str = option("auto", "where the teacher's targets come from: cached (once, on the plain images: the "
                                   "study), online (the teacher runs on every augmented batch the student sees), "
                                   "views (--views augmented views per image embedded once), auto (cached when "
                                   "nothing is augmented, else online or views by the teacher's measured speed)",
                           choices=list(TEACHING))
    views: int = option(8, "teaching views: augmented views embedded per training image")
    epochs: int = option(30, "training epochs (the study: 50); consistent teaching pays off with patience")
    batch_size: int = option(64, "images per step, over all processes (the study: 64)")
    lr: float = option(3e-4, "Adam learning rate (the study: 3e-4)")
    weight_decay: float = option(0.0, "AdamW weight decay (0 = plain Adam, as the study)")
    schedule: str = option("cosine", "learning-rate schedule (the study: constant)", choices=["constant", "cosine"])
    warmup_epochs: float = option(1.0, "linear learning-rate warm-up before the schedule, in epochs (at most half "
                                       "the run)")
    amp: str = option("auto", "student precision: auto (bf16 where the GPU or CPU supports it natively, else fp16 "
                              "on CUDA and fp32 on CPU), fp32, bf16, fp16", choices=["auto", "fp32", "bf16", "fp16"])
    channels_last: bool = option(True, "channels-last memory format (faster convolutions on CPU and tensor cores)")
    val_fraction: float = option(0.1, "fraction of the labelled train split held out to pick `best`")
    pick: str = option("auto", "how `best` is picked on the held-out rows: auto (accuracy where train has labels, else "
                               "teacher agreement), agreement (teacher agreement: no label used at all), last (the "
                               "last epoch)", choices=["auto", "agreement", "last"])
    probe_epochs: int = option(15, "linear head: probe epochs (as teacher-eval)")
    probe_lr: float = option(3e-3, "linear head: probe learning rate (as teacher-eval)")
    probe_batch_size: int = option(64, "linear head: probe batch size (as teacher-eval)")
    seed: int = option(0, "random seed (>= 0): data order, init, augmentation")
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
        self.logit_scale = _scale(self.logit_scale)
        check(self.mixup >= 0, "mixup", "must be >= 0 (0 = off)")
        check(self.views >= 1, "views", "must be >= 1")
        check(self.warmup_epochs >= 0, "warmup_epochs", "must be >= 0")
        check(0 < self.val_fraction < 1, "val_fraction", "must be in (0, 1)")
        check(self.student_size == 0 or self.student_size >= 16, "student_size",
              "must be 0 (the dataset's size) or at least 16 pixels")
        check(self.student_std > 0, "student_std", "must be > 0")
        check(self.probe_epochs >= 1, "probe_epochs", "must be >= 1")
        check(self.probe_lr > 0, "probe_lr", "must be > 0")
        check(self.probe_batch_size >= 1, "probe_batch_size", "must be >= 1")
        check(self.seed >= 0, "seed", "must be >= 0")
        Method(self.method, self.loss_weights)  # validates names and weights

    def probe_config(self) -> ProbeConfig:
        return ProbeConfig(lr=self.probe_lr, batch_size=self.probe_batch_size, epochs=self.probe_epochs,
                           holdout=self.val_fraction, seed=self.seed)

    def run_dir(self) -> RunDir:
        if self.out:
            return RunDir(self.out)
        return RunDir(Path("runs") / f"{self.dataset}-{self.student}-{self.method}-{self.head}-{'+'.join(self.data)}")


def _scale(value: Union[float, str]) -> Union[float, str]:
    """`auto` or a positive number (flags arrive as text, the API may pass numbers)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        scale = float(value)
    except (TypeError, ValueError):
        scale = float("nan")
    check(scale > 0, "logit_scale", f"{value!r}: give auto or a number > 0 (CLIP: 100)")
    return scale
