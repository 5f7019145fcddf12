"""`TrainConfig`: every flag of `clipdistill train`, which is also the Python API's config."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Union

from ..core.config import Options, Rule, above, at_least, check, check_fields, option
from ..data.options import DataOptions
from ..teacher.heads import ProbeConfig
from ..teacher.options import TeacherOptions
from .augment import AUGMENTATIONS
from .methods import Method
from .rundir import RunDir

TEACHING = ("auto", "cached", "online", "views")


# The option groups of `clipdistill train`, in the order of its flags. Each checks its own fields;
# fit-prompts and compress show some of them with their own defaults (`core.config.preset`).

@dataclasses.dataclass
class TrainingDataOptions(Options, title="training data"):
    """Which images of the dataset the student learns from."""

    data: list[str] = option(default_factory=lambda: ["train"],
                             help="splits to train on, comma-separated (e.g. train,unlabeled)")
    rows: str = option("", "train on these rows of the unlabeled split only: a curation file written by "
                           "`fit-prompts` (CURATION.json); default: every readable image", metavar="FILE")

    def _check_training_data(self) -> None:
        check(bool(self.data), "data", "give at least one split, e.g. train or train,unlabeled")
        check("test" not in self.data, "data", "the test split is kept for the final report; train on train "
                                               "and/or unlabeled")


@dataclasses.dataclass
class MethodOptions(Options, title="distillation"):
    """What the student learns from the teacher: the method's terms and the head that makes targets."""

    method: str = option("kl", "distillation method: labels, kl, mse, cosine, or a sum such as kl+mse")
    loss_weights: list[float] = option(default_factory=list, help="weights of the method's terms, e.g. 1,0.5")
    head: str = option("auto", "teacher head for kl targets and for embedding students: text, linear, or auto "
                               "(linear when train has labels)", choices=["auto", "text", "linear"])
    logit_scale: Union[float, str] = option("auto", "text head: cosine similarities times this; auto = the teacher's "
                                                     "own learnt scale (CLIP's is 100; what tiny-shapes learnt: "
                                                     "README.md, 'Beyond the study'); the study's kl used 1",
                                            metavar="auto|S")
    temperature: float = option(1.0, "kl temperature T: softmax(logits / T), loss times T^2", valid=above(0))

    def _check_method(self) -> None:
        check_fields(self, MethodOptions)
        self.logit_scale = _scale(self.logit_scale)
        Method(self.method, self.loss_weights)  # validates names and weights


def _student_side(v: int) -> bool:
    return v == 0 or v >= 16


@dataclasses.dataclass
class StudentOptions(Options, title="student"):
    """The student network and the pixels it reads."""

    student: str = option("resnet18", "any timm architecture")
    student_pretrained: bool = option(False, "start from timm's pretrained weights (needs them in the HF cache)")
    student_size: int = option(0, "student input side in pixels (>= 16); 0 = the dataset's native size (folders: 96)",
                               valid=Rule(_student_side, "must be 0 (the dataset's size) or at least 16 pixels"))
    student_mean: float = option(0.5, "student input normalisation mean (the study: 0.5)")
    student_std: float = option(0.25, "student input normalisation std (the study: 0.25)", valid=above(0))


@dataclasses.dataclass
class AugmentOptions(Options, title="augmentation"):
    """How each training view is changed before the student (and, when teaching online, the teacher) sees it."""

    augment: str = option("rrc", "augmentation of each training view: none (the study), flip, flip-crop, rrc "
                                 "(random resized crop + flip)", choices=list(AUGMENTATIONS))
    mixup: float = option(0.0, "mixup alpha (0 = off): each batch mixed with its reverse, lambda ~ Beta(alpha, alpha)",
                          valid=at_least(0, "0 = off"))


@dataclasses.dataclass
class TeachingOptions(Options, title="teaching"):
    """Where the teacher's targets come from."""

    teaching: str = option("auto", "where the teacher's targets come from: cached (once, on the plain images: the "
                                   "study), online (the teacher runs on every augmented batch the student sees), "
                                   "views (--views augmented views per image embedded once), auto (cached when "
                                   "nothing is augmented, else online or views by the teacher's measured speed)",
                           choices=list(TEACHING))
    views: int = option(8, "teaching views: augmented views embedded per training image", valid=at_least(1))


@dataclasses.dataclass
class OptimiserOptions(Options, title="optimiser"):
    """How long and how fast the student learns: epochs, batch, Adam(W) and its schedule."""

    epochs: int = option(30, "training epochs (the study: 50); consistent teaching pays off with patience",
                         valid=at_least(1))
    batch_size: int = option(64, "images per step, over all processes (the study: 64)",
                             valid=at_least(2, "batch norm needs two samples"))
    lr: float = option(3e-4, "Adam learning rate (the study: 3e-4)", valid=above(0))
    weight_decay: float = option(0.0, "AdamW weight decay (0 = plain Adam, as the study)", valid=at_least(0))
    schedule: str = option("cosine", "learning-rate schedule (the study: constant)", choices=["constant", "cosine"])
    warmup_epochs: float = option(1.0, "linear learning-rate warm-up before the schedule, in epochs (at most half "
                                       "the run)", valid=at_least(0))


@dataclasses.dataclass
class ComputeOptions(Options, title="student compute"):
    """How the student's arithmetic runs: precision and memory layout."""

    amp: str = option("auto", "student precision: auto (bf16 where the GPU or CPU supports it natively, else fp16 "
                              "on CUDA and fp32 on CPU), fp32, bf16, fp16", choices=["auto", "fp32", "bf16", "fp16"])
    channels_last: bool = option(True, "channels-last memory format (faster convolutions on CPU and tensor cores)")


@dataclasses.dataclass
class PickOptions(Options, title="best checkpoint"):
    """Which epoch becomes `best`, judged on rows held out of training."""

    val_fraction: float = option(0.1, "fraction of the labelled train split held out to pick `best`",
                                 valid=Rule(lambda v: 0 < v < 1, "must be in (0, 1)"))
    pick: str = option("auto", "how `best` is picked on the held-out rows: auto (accuracy where train has labels, else "
                               "teacher agreement), agreement (teacher agreement: no label used at all), last (the "
                               "last epoch)", choices=["auto", "agreement", "last"])


@dataclasses.dataclass
class ProbeOptions(Options, title="linear head"):
    """The linear probe trained on the teacher's embeddings when the method needs a linear head."""

    probe_epochs: int = option(15, "linear head: probe epochs (as teacher-eval)", valid=at_least(1))
    probe_lr: float = option(3e-3, "linear head: probe learning rate (as teacher-eval)", valid=above(0))
    probe_batch_size: int = option(64, "linear head: probe batch size (as teacher-eval)", valid=at_least(1))


@dataclasses.dataclass
class RunOptions(Options, title="run"):
    """The run's seed, its folder and how it reports; only the seed changes the result."""

    seed: int = option(0, "random seed (>= 0): data order, init, augmentation", valid=at_least(0))
    out: str = option("", "run folder; default runs/DATASET-STUDENT-METHOD-HEAD-DATA", metavar="DIR", runtime=True)
    resume: str = option("auto", "auto: continue the run in --out if there is one; never: refuse an existing run",
                         choices=["auto", "never"], runtime=True)
    progress: bool = option(True, "show progress bars", runtime=True)


# Listed last-flag-first (dataclasses place the last base's fields first): the flags, and the keys
# of every config.json, come in the order dataset, teacher, training data, ..., run.
@dataclasses.dataclass
class TrainConfig(RunOptions, ProbeOptions, PickOptions, ComputeOptions, OptimiserOptions, TeachingOptions,
                  AugmentOptions, StudentOptions, MethodOptions, TrainingDataOptions, TeacherOptions, DataOptions):
    """Every flag of `clipdistill train`."""

    def __post_init__(self) -> None:
        self._check_teacher()
        self._check_data()
        self._check_training_data()
        self._check_method()
        check_fields(self, StudentOptions, AugmentOptions, TeachingOptions, OptimiserOptions, PickOptions,
                     ProbeOptions, RunOptions)

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
