"""`FitConfig`: every flag of `clipdistill fit-prompts`, which is also the Python API's config.

The defaults are the small-pool recipe measured on the example pool (README, "Your own
classifier"): the teacher in the loop on the student's own augmented, mixed view, the
student learning the teacher's image embedding (so any prompt can be its head later), a
patient cosine schedule."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Optional

from ..core.config import Rule, at_least, check, check_fields, common_options, option, preset
from ..data.prompts import read_prompt_file, read_templates
from ..deploy.bundle import BundleOptions
from ..distill.config import (
    AugmentOptions,
    MethodOptions,
    OptimiserOptions,
    RunOptions,
    StudentOptions,
    TeachingOptions,
    TrainConfig,
)
from ..teacher.curate import CurateOptions
from ..teacher.options import TeacherOptions

# fit-prompts is a preset over `clipdistill train`'s options, as an experiment is: the ones it shows
# as flags, with its own defaults and words where they differ; each keeps train's type, choices,
# rule and runtime mark unless changed here.
FitStudent = preset(StudentOptions, student={"default": "resnet10t"},
                    student_size={"help": "student input side; 0 = the teacher's input side, at most 224",
                                  "valid": Rule(lambda v: v == 0 or v >= 16, "must be 0 (auto) or >= 16")})
FitMethod = preset(MethodOptions, method={
    "default": "cosine", "help": "what the student learns: cosine/mse (the teacher's image embedding: any prompts "
                                 "can be its head later, and it can say 'none of these'), kl (the prompts' "
                                 "probabilities only), or a sum such as kl+cosine"})
FitOptimiser = preset(
    OptimiserOptions,
    epochs={"default": 0, "help": "training epochs over the curated pool; 0 = enough for --steps optimizer steps (a "
                                  "small pool gets more epochs: patience is what a small pool needs), at least 40",
            "valid": at_least(0, "0 = from --steps")},
    batch_size={"help": "images per step"},
    lr={"default": 2e-3, "help": "Adam learning rate (cosine schedule, one epoch of warm-up)"})
FitAugment = preset(AugmentOptions, augment={"help": "augmentation of the view the student and the teacher both see"},
                    mixup={"default": 1.0, "help": "mixup alpha (0 = off); the teacher sees the mixed image too"})
FitTeaching = preset(TeachingOptions, teaching={
    "help": "where the teacher's targets come from (see `clipdistill train --help`); auto measures the teacher and "
            "picks online or cached views"})
FitRun = preset(RunOptions, seed={"help": "random seed (>= 0)"}, progress={})

# What the training stage sets beyond the options fit-prompts shares with train: the pool is a
# folder dataset's unlabeled split, the targets come from the prompts (the text head), and the
# best epoch is the one that agrees most with the teacher (no labels anywhere).
TRAINING = {"dataset": "folder", "data": ["unlabeled"], "head": "text", "pick": "agreement"}


# Listed last-flag-first, as TrainConfig's groups are.
@dataclasses.dataclass
class FitConfig(BundleOptions, FitRun, FitTeaching, FitAugment, FitOptimiser, FitMethod, FitStudent, TeacherOptions,
                CurateOptions):
    prompts: str = option("", "text file, one prompt per class (\"a photo of a forklift\"); with --eval, each "
                              "test/ class folder takes the prompt that names it (folder 'forklift'), else the "
                              "folders' sorted order", metavar="FILE")
    pool: list[str] = option(default_factory=list, help="your unlabeled images: folders of any depth or WebDataset tar "
                                                        "shards ('pool-{000..099}.tar'), comma-separated (sub-folders "
                                                        "never mean classes; duplicates counted once, broken files "
                                                        "skipped and listed)", metavar="DIR|SHARDS[,...]")
    eval: Optional[str] = option(None, "optional labelled images to measure accuracy: a folder with test/<class>/ "
                                       "(or the test/ folder itself), and optionally unprompted/<what they are>/ "
                                       "(images no prompt names: what passes as a class); never trained on",
                                 metavar="DIR")
    # Not runtime, unlike train's --out: the stages record the paths they wrote under it.
    out: str = option("", "folder for everything this writes (model, sidecar, sheets, report); default "
                          "runs/fit-PROMPTS", metavar="DIR")
    templates: Optional[str] = option(None, "prompt templates file, one per line with {} (averaged, as open_clip's "
                                            "zero-shot classifiers)", metavar="FILE")
    steps: int = option(4000, "with --epochs 0: the optimizer steps to aim for", valid=at_least(1))
    int8: bool = option(True, "also write an INT8 model (calibrated on the pool)")

    def __post_init__(self) -> None:
        self._check_teacher()
        self._check_curation()
        check(bool(self.prompts), "prompts", "give a text file with one prompt per class (--prompts classes.txt)")
        read_prompt_file(self.prompts)
        read_templates(self.templates)
        check(bool(self.pool), "pool", "give the folder(s) of your unlabeled images (--pool DIR)")
        from ..data.shards import is_shard_spec

        for p in self.pool:
            check(Path(p).is_dir() or is_shard_spec(p), "pool",
                  f"{p} is not a folder or tar shards; give a folder of images (any depth) or 'pool-{{000..099}}.tar'")
        if self.eval:
            e = Path(self.eval)
            check(e.is_dir(), "eval", f"{self.eval} is not a folder; give a folder with test/<class>/ inside")
            if e.name == "test" and not (e / "test").is_dir():
                self.eval = str(e.parent)  # `--eval DATA/test` means DATA's test split
            check((Path(self.eval) / "test").is_dir(), "eval",
                  f"{self.eval} has no test/ folder; put labelled images in {Path(self.eval) / 'test'}/<class>/")
            # unprompted/<what they are>/ beside test/: look-alikes measured after export (lookalikes.py),
            # refused now rather than after training when a folder is named as a prompted class
            from .lookalikes import check_unprompted

            check_unprompted(self.eval, [d.name for s in ("train", "test") if (Path(self.eval) / s).is_dir()
                                         for d in (Path(self.eval) / s).iterdir() if d.is_dir()])
        check_fields(self)
        self._check_bundle()
        if not self.out:
            self.out = str(Path("runs") / f"fit-{Path(self.prompts).stem}")

    @property
    def run_path(self) -> Path:
        return Path(self.out) / "run"

    @property
    def curation_path(self) -> Path:
        return Path(self.out) / "curation.json"

    def epochs_for(self, images: int) -> int:
        """--epochs, or the epochs that make about --steps steps over `images` training images
        (the 10% held out to pick the best epoch excluded), at least 40."""
        if self.epochs:
            return self.epochs
        per_epoch = max(1, int(images * 0.9) // self.batch_size)
        return max(40, -(-self.steps // per_epoch))

    def train_config(self, student_size: int, rows: str = "", epochs: int = 1) -> TrainConfig:
        """The `clipdistill train` config of the training stage (recorded in OUT/run/config.json): every
        option fit-prompts shares with train, TRAINING, and what the stage decides (the student's
        side, the curated rows, the epochs, the run folder inside OUT)."""
        return TrainConfig(**{**common_options(self, TrainConfig), **copy.deepcopy(TRAINING), "data_root": self.eval,
                              "rows": rows, "student_size": student_size, "epochs": epochs,
                              "out": str(self.run_path)})
