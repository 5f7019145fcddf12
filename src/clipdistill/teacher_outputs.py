"""Everything a job needs from the teacher, computed once and cached: image embeddings
per split, the prompts' text embeddings and the linear probe."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import atomic
from .cache import EmbeddingCache, cache_path
from .config import DataOptions, TeacherOptions
from .data.datasets import create_dataset, dataset_slug, default_data_root, read_prompts
from .embed import fill_cache
from .errors import ConfigError
from .heads import ProbeConfig, TextHead, load_or_train_probe, probe_path, text_embeddings_path
from .teacher.openclip_teacher import Teacher, create_teacher


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


def _read_lines(path: Optional[str]) -> Optional[list[str]]:
    if path is None:
        return None
    lines = [ln.rstrip("\n") for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]
    bad = [t for t in lines if "{}" not in t]
    if bad:
        raise ConfigError(f"--templates {path}: every line needs {{}} where the prompt goes; not: {bad[0]!r}")
    return lines


def prepare_teacher_outputs(topt: TeacherOptions, dopt: DataOptions, splits: list[str], probe: Optional[ProbeConfig]
                            = None, teacher: Optional[Teacher] = None, progress: bool = True,
                            overwrite: bool = False, log=print, probe_required: bool = True) -> TeacherOutputs:
    """`probe_required=False`: train the probe only if the train split has labels (`--head auto`)."""
    root = dopt.data_root or default_data_root(topt.cache_dir)
    datasets = {s: create_dataset(dopt.dataset, s, root, dopt.image_size, dopt.max_images) for s in splits}  # cheap errors first
    teacher = teacher or create_teacher(topt.teacher, topt.pretrained, topt.device, topt.precision, topt.cache_dir)
    first = datasets[splits[0]]
    classes = list(getattr(first, "classes", []))
    prompts = read_prompts(dopt.prompts, classes, list(getattr(first, "prompts", [])))
    templates = _read_lines(dopt.templates) or (list(first.templates) if getattr(first, "templates", None) else None)
    out = TeacherOutputs(teacher=teacher, classes=classes or prompts, prompts=prompts, templates=templates,
                         datasets=datasets, dataset_slug=dataset_slug(first))
    for s, ds in datasets.items():
        path = cache_path(topt.cache_dir, teacher.slug, dataset_slug(ds), s)
        out.caches[s] = fill_cache(teacher, ds, path, topt.embed_batch_size, topt.workers, overwrite, progress, log)

    tpath = text_embeddings_path(topt.cache_dir, teacher.slug, prompts, templates)
    saved = np.load(tpath) if tpath.exists() else None
    if saved is not None and str(saved["teacher"]) == repr(teacher.fingerprint()):
        out.text_embeddings = torch.from_numpy(saved["embeddings"])
    else:
        out.text_embeddings = teacher.encode_texts(prompts, templates)
        atomic.numpy_save(tpath, embeddings=out.text_embeddings.numpy(), teacher=repr(teacher.fingerprint()),
                          prompts=np.asarray(prompts))

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
