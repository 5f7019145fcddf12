"""`FitConfig`: every flag of `clipdistill fit-prompts`, which is also the Python API's config.

The defaults are the small-pool recipe measured on the example pool (README, "Your own
classifier"): the teacher in the loop on the student's own augmented, mixed view, the
student learning the teacher's image embedding (so any prompt can be its head later), a
patient cosine schedule."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from ..core.config import check, option
from ..data.prompts import read_prompt_file, read_templates
from ..distill.augment import AUGMENTATIONS
from ..distill.config import TEACHING, TrainConfig
from ..teacher.curate import CurateOptions
from ..teacher.options import TeacherOptions


@dataclasses.dataclass
class FitConfig(TeacherOptions, CurateOptions):
    prompts: str = option("", "text file, one prompt per class (\"a photo of a forklift\"); with --eval, each "
                              "test/ class folder takes the prompt that names it (folder 'forklift'), else the "
                              "folders' sorted order", metavar="FILE")
    pool: list[str] = option(default_factory=list, help="your unlabeled images: folders of any depth or WebDataset tar "
                                                        "shards ('pool-{000..099}.tar'), comma-separated (sub-folders "
                                                        "never mean classes; duplicates counted once, broken files "
                                                        "skipped and listed)", metavar="DIR|SHARDS[,...]")
    eval: Optional[str] = option(None, "optional labelled images to measure accuracy: a folder with test/<class>/ "
                                       "(or the test/ folder itself); never trained on", metavar="DIR")
    out: str = option("", "folder for everything this writes (model, sidecar, sheets, report); default "
                          "runs/fit-PROMPTS", metavar="DIR")
    templates: Optional[str] = option(None, "prompt templates file, one per line with {} (averaged, as open_clip's "
                                            "zero-shot classifiers)", metavar="FILE")
    student: str = option("resnet10t", "any timm architecture")
    student_size: int = option(0, "student input side; 0 = the teacher's input side, at most 224")
    method: str = option("cosine", "what the student learns: cosine/mse (the teacher's image embedding: any prompts "
                                   "can be its head later, and it can say 'none of these'), kl (the prompts' "
                                   "probabilities only), or a sum such as kl+cosine")
    epochs: int = option(0, "training epochs over the curated pool; 0 = enough for --steps optimizer steps (a small "
                            "pool gets more epochs: patience is what a small pool needs), at least 40")
    steps: int = option(4000, "with --epochs 0: the optimizer steps to aim for")
    batch_size: int = option(64, "images per step")
    lr: float = option(2e-3, "Adam learning rate (cosine schedule, one epoch of warm-up)")
    augment: str = option("rrc", "augmentation of the view the student and the teacher both see",
                          choices=list(AUGMENTATIONS))
    mixup: float = option(1.0, "mixup alpha (0 = off); the teacher sees the mixed image too")
    teaching: str = option("auto", "where the teacher's targets come from (see `clipdistill train --help`); auto "
                                   "measures the teacher and picks online or cached views", choices=list(TEACHING))
    int8: bool = option(True, "also write an INT8 model (calibrated on the pool)")
    seed: int = option(0, "random seed (>= 0)")
    progress: bool = option(True, "show progress bars")

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
        check(self.student_size == 0 or self.student_size >= 16, "student_size", "must be 0 (auto) or >= 16")
        check(self.epochs >= 0, "epochs", "must be >= 0 (0 = from --steps)")
        check(self.steps >= 1, "steps", "must be >= 1")
        check(self.batch_size >= 2, "batch_size", "must be >= 2")
        check(self.lr > 0, "lr", "must be > 0")
        check(self.mixup >= 0, "mixup", "must be >= 0")
        check(self.seed >= 0, "seed", "must be >= 0")
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
        """The `clipdistill train` config of the training stage (recorded in OUT/run/config.json)."""
        return TrainConfig(
            teacher=self.teacher, pretrained=self.pretrained, device=self.device, precision=self.precision,
            cache_dir=self.cache_dir, embed_batch_size=self.embed_batch_size, workers=self.workers,
            dataset="folder", data_root=self.eval, pool=list(self.pool), prompts=self.prompts,
            templates=self.templates, data=["unlabeled"], rows=rows, method=self.method, head="text",
            student=self.student, student_size=student_size, augment=self.augment, mixup=self.mixup,
            teaching=self.teaching, epochs=epochs, batch_size=self.batch_size, lr=self.lr, pick="agreement",
            seed=self.seed, out=str(self.run_path), progress=self.progress)
