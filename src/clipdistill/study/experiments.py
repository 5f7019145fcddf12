"""The study's experiments as data: one named preset per row of its tables.

Each experiment is a set of overrides on a suite's base `TrainConfig` (or the teacher's
own evaluation), so every row runs the same code a user runs from the CLI; nothing here
is a function per experiment. Published figures come from the study's README and are only
shown beside ours, never mixed in."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from ..core.registry import Registry


@dataclass(frozen=True)
class Question:
    key: str
    title: str


QUESTIONS = [
    Question("teacher", "How good is the teacher on this task?"),
    Question("labels_vs_distill", "How does distillation compare to training with ground-truth labels? "
                                  "(train split only)"),
    Question("data", "How does the data used for distillation impact accuracy?"),
    Question("architecture", "How does the student architecture impact accuracy?"),
    Question("method", "How does the distillation method impact accuracy?"),
    Question("recipe", "Beyond the study: what gets the student to the teacher? (each row adds one change to the one "
                       "above)"),
]


@dataclass(frozen=True, kw_only=True)
class Experiment:
    name: str
    question: str
    kind: str  # "zero_shot", "linear_probe" (teacher-eval) or "student" (train)
    overrides: dict = field(default_factory=dict)
    teacher_label: str = ""
    published: dict = field(default_factory=dict)  # suite -> the study's figure
    demo: bool = False  # part of the compact `clipdistill demo` selection
    beyond: bool = False  # not in the study
    recipe: bool = False  # a step of the recipe ablation: trained with the suite's patient schedule
    change: str = ""  # what this recipe step changes, for the ablation table
    compare_to: str = ""  # the row this step's gain is measured against in the ablation table


EXPERIMENTS: Registry[Experiment] = Registry("experiment", flag="--only")

_TRAIN = ["train"]
_TRAIN_UNL = ["train", "unlabeled"]
# The study's KL on the text head used T = 1 on *raw* cosines: logit scale 1 (methods.py).
_STUDY_TEXT_KL = {"method": "kl", "head": "text", "logit_scale": 1.0, "temperature": 1.0}
_LINEAR_KL = {"method": "kl", "head": "linear", "temperature": 1.0}


def _add(e: Experiment) -> None:
    EXPERIMENTS.add(e.name, e)


_add(Experiment(name="openclip_text", question="teacher", kind="zero_shot", teacher_label="openclip_text",
                published={"stl10": 96.68}, demo=True))
_add(Experiment(name="openclip_linear", question="teacher", kind="linear_probe", teacher_label="openclip_linear",
                published={"stl10": 98.57}, demo=True))
_add(Experiment(name="resnet18_from_scratch", question="labels_vs_distill", kind="student",
                overrides={"student": "resnet18", "method": "labels", "data": _TRAIN},
                teacher_label="none (labels)", published={"stl10": 57.93}, demo=True))
_add(Experiment(name="resnet18_text_train", question="labels_vs_distill", kind="student",
                overrides={"student": "resnet18", **_STUDY_TEXT_KL, "data": _TRAIN},
                teacher_label="openclip_text", published={"stl10": 44.04}))
_add(Experiment(name="resnet18_linear_train", question="labels_vs_distill", kind="student",
                overrides={"student": "resnet18", **_LINEAR_KL, "data": _TRAIN},
                teacher_label="openclip_linear", published={"stl10": 60.65}, demo=True))
_add(Experiment(name="resnet18_text_train_unlabeled", question="data", kind="student",
                overrides={"student": "resnet18", **_STUDY_TEXT_KL, "data": _TRAIN_UNL},
                teacher_label="openclip_text", published={"stl10": 94.32}))
_add(Experiment(name="resnet18_linear_train_unlabeled", question="data", kind="student",
                overrides={"student": "resnet18", **_LINEAR_KL, "data": _TRAIN_UNL},
                teacher_label="openclip_linear", published={"stl10": 96.88}, demo=True))
for _arch, _fig in (("resnet34", 96.69), ("resnet50", 96.76)):
    _add(Experiment(name=f"{_arch}_linear_train_unlabeled", question="architecture", kind="student",
                    overrides={"student": _arch, **_LINEAR_KL, "data": _TRAIN_UNL},
                    teacher_label="openclip_linear", published={"stl10": _fig}))
_add(Experiment(name="resnet18_embedding_text_train_unlabeled", question="method", kind="student",
                overrides={"student": "resnet18", "method": "mse", "head": "text", "data": _TRAIN_UNL},
                teacher_label="openclip_embedding", published={"stl10": 94.575}))
_add(Experiment(name="resnet18_embedding_linear_train_unlabeled", question="method", kind="student",
                overrides={"student": "resnet18", "method": "mse", "head": "linear", "data": _TRAIN_UNL},
                teacher_label="openclip_embedding", published={"stl10": 96.912}, demo=True))
# Beyond the study: CLIP's own logit scale for the text head (the study's T=1 on raw cosines
# gives nearly uniform targets).
_add(Experiment(name="resnet18_text100_train_unlabeled", question="method", kind="student",
                overrides={"student": "resnet18", "method": "kl", "head": "text", "logit_scale": 100.0,
                           "temperature": 1.0, "data": _TRAIN_UNL},
                teacher_label="openclip_text", beyond=True))


# Beyond the study: the recipe, one change at a time (`reproduce --recipe`). Each step keeps
# the ones above it; the suite's `patient` settings (a long cosine schedule with warm-up)
# apply from step 1 on. The default of `clipdistill train` is `recipe_online` (kl on the
# teacher's probabilities, random resized crops, the teacher in the loop on the same view),
# chosen on the held-out *validation* accuracy of a one-seed screen of the steps, where it led
# the two steps after it (README.md, "Beyond the study", has the screen's figures); those two
# are measured, not used. `recipe_zero_label` is the default without any label: not to train
# (KL on the text head at the teacher's own logit scale) nor to pick the checkpoint (teacher
# agreement on held-out rows).
_RECIPE = [
    ("recipe_patient", "a long schedule with warm-up (patience); targets still computed once on the plain images",
     {"student": "resnet18", **_LINEAR_KL, "data": _TRAIN_UNL, "teaching": "cached"}),
    ("recipe_augment", "+ random resized crop and flip; targets still of the plain images (inconsistent)",
     {"augment": "rrc", "teaching": "cached"}),
    ("recipe_online", "+ the teacher in the loop on the student's own view (consistent teaching): the default of "
                      "`clipdistill train`", {"teaching": "online"}),
    ("recipe_mixup", "+ mixup (alpha 1), the teacher on the mixed view", {"mixup": 1.0}),
    ("recipe_labels", "+ cross-entropy on the labelled part (kl+labels)", {"method": "kl+labels"}),
]
_acc: dict = {}
_prev = "resnet18_linear_train_unlabeled"  # the study's best row: where the recipe starts from
for _name, _change, _over in _RECIPE:
    _acc = {**_acc, **_over}
    _add(Experiment(name=_name, question="recipe", kind="student", overrides=dict(_acc), change=_change,
                    teacher_label="openclip_linear", beyond=True, recipe=True, compare_to=_prev))
    _prev = _name
_add(Experiment(name="recipe_zero_label", question="recipe", kind="student",
                overrides={"student": "resnet18", "method": "kl", "head": "text", "logit_scale": "auto",
                           "temperature": 1.0, "data": _TRAIN_UNL, "augment": "rrc", "teaching": "online",
                           "pick": "agreement"},
                change="the default with zero labels: KL on the text head at the teacher's own logit scale, best "
                       "epoch by teacher agreement", teacher_label="openclip_text", beyond=True, recipe=True))


# ----------------------------------------------------------------------------- suites

@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    base: dict  # TrainConfig fields shared by every experiment of the suite
    # The study's student -> the one this suite trains in its place (same role, other input size).
    students: dict = field(default_factory=dict)
    # Overrides for rows that train on exactly these splits ("train", "train+unlabeled").
    by_data: dict = field(default_factory=dict)
    # Overrides for the recipe rows: the patient schedule.
    patient: dict = field(default_factory=dict)


SUITES: Registry[Suite] = Registry("suite", flag="--suite")

# The study's own ways, pinned in every suite's rows (the defaults of `clipdistill train` are the
# new recipe): targets once on plain images, no augmentation, best epoch by held-out accuracy.
_STUDY_RECIPE = {"augment": "none", "mixup": 0.0, "teaching": "cached", "warmup_epochs": 0.0, "pick": "auto"}

SUITES.add("stl10", Suite(
    "stl10",
    "the study itself: OpenCLIP ViT-B-32 (laion2b_s34b_b79k) teacher, STL10 at 96 px, the study's settings "
    "(Adam 3e-4, batch 64, 50 epochs, constant lr, Normalize(0.5, 0.25), no augmentation)",
    {"teacher": "ViT-B-32", "pretrained": "laion2b_s34b_b79k", "dataset": "stl10", "epochs": 50, "batch_size": 64,
     "lr": 3e-4, "schedule": "constant", "student_mean": 0.5, "student_std": 0.25, "probe_lr": 3e-4,
     "probe_epochs": 15, **_STUDY_RECIPE},
    patient={"epochs": 200, "lr": 1e-3, "schedule": "cosine", "warmup_epochs": 2}))

# shapes10 is 32 px: a ResNet's 7x7/2 stem + max-pool leaves 8x8 of it, and resnet18 learnt
# far less in the demo's budget than timm's deep-stem "t" ResNets (three 3x3 convs) or than
# resnet18d, the same depth with a deep stem (README.md, "What `make demo` printed here", has
# the figures). So this suite keeps the study's rows and their sizes' order but trains the "t"
# family; the report names the real student.
# The labelled-only rows get 40 epochs (1,000 images each) so that every row sees about as many
# images as the 4 epochs over 11,000 of the unlabeled rows: the same compute for each answer.
SUITES.add("shapes10", Suite(
    "shapes10",
    "the offline world: the tiny-shapes teacher on shapes10 at 32 px (1,000 labelled, 10,000 unlabeled, 2,000 "
    "test images), sized to run on two CPU cores: students resnet10t/14t/26t (deep stems suit 32 px) in place "
    "of resnet18/34/50, Adam 2e-3 with a cosine schedule, batch 64, 4 epochs with unlabeled data and 40 "
    "without (about the same number of images seen)",
    {"teacher": "tiny-shapes", "dataset": "shapes10", "image_size": 32, "epochs": 4,
     "batch_size": 64, "lr": 2e-3, "schedule": "cosine", "student_mean": 0.5, "student_std": 0.25,
     **_STUDY_RECIPE},
    students={"resnet18": "resnet10t", "resnet34": "resnet14t", "resnet50": "resnet26t"},
    by_data={"train": {"epochs": 40}},
    patient={"epochs": 20, "warmup_epochs": 1}))


def build_config(suite: str, name: str, **overrides: Any):
    """The TrainConfig (student rows) or TeacherEvalConfig (teacher rows) of one experiment."""
    from ..distill.config import TrainConfig
    from ..teacher.evaluate import TeacherEvalConfig

    s, e = SUITES.get(suite), EXPERIMENTS.get(name)
    values = {**s.base, **(s.patient if e.recipe else {}), **e.overrides}
    if e.kind == "student":
        values["student"] = s.students.get(values["student"], values["student"])
        if not e.recipe:
            values.update(s.by_data.get("+".join(values["data"]), {}))
    values.update(overrides)
    if e.kind == "student":
        return TrainConfig(**values)
    names = {f.name for f in dataclasses.fields(TeacherEvalConfig)}
    return TeacherEvalConfig(**{k: v for k, v in values.items() if k in names})


def select(suite: str, only: Optional[list[str]] = None, full: bool = False, recipe: bool = False
           ) -> list[Experiment]:
    """The rows to run: `only` these; else the demo's, or all of the study's (`full`), plus the
    recipe ablation (`recipe`, with the study's best row as its reference)."""
    SUITES.get(suite)
    if only:
        return [EXPERIMENTS.get(n) for n in only]
    rows = [EXPERIMENTS.get(n) for n in EXPERIMENTS]
    keep = [e for e in rows if not e.recipe and (full or e.demo)]
    if recipe:
        keep += [e for e in rows if e.recipe and e not in keep]
    return keep
