"""Everything a job needs from the teacher, computed once and cached: image embeddings
per split, the prompts' text embeddings and the linear probe."""

from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from ..core import atomic
from ..core.errors import ConfigError, MissingSplitError
from ..data.options import DataOptions
from ..data.prompts import read_prompts, read_templates
from .cache import cache_path
from .embed import fill_cache
from .heads import ProbeConfig, TextHead, load_or_train_probe, probe_path, text_embeddings_path
from .openclip_teacher import Teacher, create_teacher
from .options import TeacherOptions

log = logging.getLogger(__name__)


@dataclass
class TeacherOutputs:
    teacher: Teacher
    classes: list[str]
    prompts: list[str]
    templates: Optional[list[str]]
    datasets: dict = field(default_factory=dict)
    caches: dict = field(default_factory=dict)
    text_embeddings: Optional[torch.Tensor] = None
    probe: Optional[torch.nn.Linear] = None
    probe_info: Optional[dict] = None
    dataset_slug: str = ""

    def text_head(self, logit_scale: float) -> TextHead:
        return TextHead(self.text_embeddings, logit_scale)

    def labelled(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(embeddings float32, labels) of the readable rows of a split."""
        cache = self.caches[split]
        idx = cache.valid_indices()
        return np.asarray(cache.embeddings[idx], dtype=np.float32), np.asarray(self.datasets[split].targets)[idx]


def prepare_teacher_outputs(topt: TeacherOptions, dopt: DataOptions, splits: list[str], probe: Optional[ProbeConfig]
                            = None, teacher: Optional[Teacher] = None, progress: bool = True,
                            overwrite: bool = False, probe_required: bool = True, optional: tuple[str, ...] = ()
                            ) -> TeacherOutputs:
    """`probe_required=False`: train the probe only if the train split has labels (`--head auto`).
    Splits in `optional` that the dataset does not have are left out (a pool with no test/)."""
    datasets = {}
    for s in splits:  # cheap errors first
        try:
            datasets[s] = dopt.open_split(s, topt.cache_dir)
        except MissingSplitError:
            if s not in optional:
                raise
            log.info("no %s split: it is left out", s)
    teacher = teacher or create_teacher(topt.teacher, topt.pretrained, topt.device, topt.precision, topt.cache_dir)
    first = next(iter(datasets.values()))
    classes = list(first.classes)
    prompts = read_prompts(dopt.prompts, classes, list(first.prompts))
    templates = read_templates(dopt.templates) or (list(first.templates) if first.templates else None)
    out = TeacherOutputs(teacher=teacher, classes=classes or prompts, prompts=prompts, templates=templates,
                         datasets=datasets, dataset_slug=first.slug())
    for s, ds in datasets.items():
        path = cache_path(topt.cache_dir, teacher.slug, ds.slug(), s)
        out.caches[s] = fill_cache(teacher, ds, path, topt.embed_batch_size, topt.workers, overwrite, progress)
    out.text_embeddings = text_embeddings(teacher, prompts, templates, topt.cache_dir)

    if probe is not None:
        if "train" not in datasets and not probe_required:
            return out
        if "train" not in datasets:
            raise ConfigError("the linear probe needs the labelled train split")
        emb, labels = out.labelled("train")
        if (labels < 0).all() and not probe_required:
            return out
        if (labels < 0).all():
            raise ConfigError(f"--dataset {dopt.dataset}: the train split has no labels, so no linear probe can be "
                              f"trained; use the text head")
        ppath = probe_path(topt.cache_dir, teacher.slug, out.dataset_slug, probe)
        out.probe, out.probe_info = load_or_train_probe(ppath, emb, labels, len(out.classes), probe,
                                                        teacher.fingerprint())
    return out


def text_embeddings(teacher: Teacher, prompts: list[str], templates: Optional[list[str]], cache_dir: str
                    ) -> torch.Tensor:
    """The prompts' normalised text embeddings, cached per (teacher, prompts, templates)."""
    tpath = text_embeddings_path(cache_dir, teacher.slug, prompts, templates)
    if tpath.exists():
        try:
            with np.load(tpath, allow_pickle=False) as saved:
                if str(saved["teacher"]) == repr(teacher.fingerprint()) and \
                        saved["embeddings"].shape[0] == len(prompts) and np.isfinite(saved["embeddings"]).all():
                    return torch.from_numpy(np.array(saved["embeddings"]))
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:  # only a cache: computed again
            log.warning("the cached text embeddings %s are damaged (%s); computing them again", tpath, e)
    emb = teacher.encode_texts(prompts, templates)
    atomic.numpy_save(tpath, embeddings=emb.numpy(), teacher=repr(teacher.fingerprint()), prompts=np.asarray(prompts))
    return emb
