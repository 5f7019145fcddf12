"""The original study's function names, as thin calls into the experiment registry, so code
written against the study keeps running:

    from clipdistill.study.original_functions import precompute_clip_stl10_train_image_embeddings
    from clipdistill.study.original_functions import train_resnet18_linear_probe
    precompute_clip_stl10_train_image_embeddings()
    train_resnet18_linear_probe()

Nothing here knows STL10 itself: each name runs (or reuses) a row of the `stl10` suite
(experiments.py) or embeds one of its splits. Paths and devices come from the same places
as the CLI: $CLIPDISTILL_CACHE, and `configure(data_root=..., out=...)`."""

from __future__ import annotations

from typing import Any

_SETTINGS: dict[str, Any] = {"data_root": None, "out": "runs/reproduce-stl10", "device": "auto", "cache_dir": None}


def configure(**settings: Any) -> None:
    """Set data_root, out, device or cache_dir for the calls below."""
    unknown = set(settings) - set(_SETTINGS)
    if unknown:
        raise TypeError(f"unknown settings {sorted(unknown)}; valid: {sorted(_SETTINGS)}")
    _SETTINGS.update(settings)


def _embed(split: str):
    from ..teacher.embed import EmbedConfig, embed
    from .experiments import SUITES

    base = SUITES.get("stl10").base
    kw = {k: v for k, v in _SETTINGS.items() if k in ("data_root", "device", "cache_dir") and v is not None}
    return embed(EmbedConfig(teacher=base["teacher"], pretrained=base["pretrained"], dataset="stl10", split=split,
                             **kw))


def _run(name: str) -> dict:
    from .reproduce import ReproduceConfig, reproduce

    kw = {k: v for k, v in _SETTINGS.items() if k in ("data_root", "device", "cache_dir", "out") and v is not None}
    return reproduce(ReproduceConfig(suite="stl10", only=[name], **kw))["records"][0]


def precompute_clip_stl10_train_image_embeddings():
    return _embed("train")


def precompute_clip_stl10_unlabeled_image_embeddings():
    return _embed("unlabeled")


def precompute_clip_stl10_test_image_embeddings():
    return _embed("test")


def precompute_clip_stl10_text_embeddings():
    """Text embeddings of the study's ten prompts (cached beside the image embeddings)."""
    from ..data.options import DataOptions
    from ..teacher.options import TeacherOptions
    from ..teacher.outputs import prepare_teacher_outputs
    from .experiments import SUITES

    base = SUITES.get("stl10").base
    kw = {k: v for k, v in _SETTINGS.items() if k in ("device", "cache_dir") and v is not None}
    outs = prepare_teacher_outputs(TeacherOptions(teacher=base["teacher"], pretrained=base["pretrained"], **kw),
                                   DataOptions(dataset="stl10", data_root=_SETTINGS["data_root"]), ["test"])
    return outs.text_embeddings


# The study's training functions, each one row (experiment) of the stl10 suite.

def train_resnet18_from_scratch() -> dict:
    """The study's `train_resnet18_from_scratch`:
    runs (or reuses) experiment `resnet18_from_scratch` of the stl10 suite."""
    return _run("resnet18_from_scratch")


def train_resnet18_zero_shot_train_only() -> dict:
    """The study's `train_resnet18_zero_shot_train_only`:
    runs (or reuses) experiment `resnet18_text_train` of the stl10 suite."""
    return _run("resnet18_text_train")


def train_resnet18_linear_probe_train_only() -> dict:
    """The study's `train_resnet18_linear_probe_train_only`:
    runs (or reuses) experiment `resnet18_linear_train` of the stl10 suite."""
    return _run("resnet18_linear_train")


def train_resnet18_zero_shot() -> dict:
    """The study's `train_resnet18_zero_shot`:
    runs (or reuses) experiment `resnet18_text_train_unlabeled` of the stl10 suite."""
    return _run("resnet18_text_train_unlabeled")


def train_resnet18_linear_probe() -> dict:
    """The study's `train_resnet18_linear_probe`:
    runs (or reuses) experiment `resnet18_linear_train_unlabeled` of the stl10 suite."""
    return _run("resnet18_linear_train_unlabeled")


def train_resnet34_linear_probe() -> dict:
    """The study's `train_resnet34_linear_probe`:
    runs (or reuses) experiment `resnet34_linear_train_unlabeled` of the stl10 suite."""
    return _run("resnet34_linear_train_unlabeled")


def train_resnet50_linear_probe() -> dict:
    """The study's `train_resnet50_linear_probe`:
    runs (or reuses) experiment `resnet50_linear_train_unlabeled` of the stl10 suite."""
    return _run("resnet50_linear_train_unlabeled")


def train_resnet18_embedding_text() -> dict:
    """The study's `train_resnet18_embedding_text`:
    runs (or reuses) experiment `resnet18_embedding_text_train_unlabeled` of the stl10 suite."""
    return _run("resnet18_embedding_text_train_unlabeled")


def eval_resnet18_embedding_linear() -> dict:
    """The study's `eval_resnet18_embedding_linear`:
    runs (or reuses) experiment `resnet18_embedding_linear_train_unlabeled` of the stl10 suite."""
    return _run("resnet18_embedding_linear_train_unlabeled")


# name in the study -> experiment in the registry (what tests and `clipdistill experiments` check)
STUDY_FUNCTIONS = {
    "train_resnet18_from_scratch": "resnet18_from_scratch",
    "train_resnet18_zero_shot_train_only": "resnet18_text_train",
    "train_resnet18_linear_probe_train_only": "resnet18_linear_train",
    "train_resnet18_zero_shot": "resnet18_text_train_unlabeled",
    "train_resnet18_linear_probe": "resnet18_linear_train_unlabeled",
    "train_resnet34_linear_probe": "resnet34_linear_train_unlabeled",
    "train_resnet50_linear_probe": "resnet50_linear_train_unlabeled",
    "train_resnet18_embedding_text": "resnet18_embedding_text_train_unlabeled",
    "eval_resnet18_embedding_linear": "resnet18_embedding_linear_train_unlabeled",
}

__all__ = ["configure", "precompute_clip_stl10_train_image_embeddings",
           "precompute_clip_stl10_unlabeled_image_embeddings", "precompute_clip_stl10_test_image_embeddings",
           "precompute_clip_stl10_text_embeddings", *STUDY_FUNCTIONS]
