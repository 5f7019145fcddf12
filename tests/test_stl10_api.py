"""The study's own function names (`clipdistill.study.original_functions`) run against the
product: each maps onto a registered experiment of the stl10 suite, and offline they stop at
once saying which files to place where, like the CLI. The old module paths still work."""

from __future__ import annotations

import time

import pytest

import clipdistill.study.original_functions as study
from clipdistill.core.errors import MissingResourceError
from clipdistill.study.experiments import EXPERIMENTS

STUDY_FUNCTIONS = ["precompute_clip_stl10_train_image_embeddings", "precompute_clip_stl10_unlabeled_image_embeddings",
                   "precompute_clip_stl10_test_image_embeddings", "precompute_clip_stl10_text_embeddings",
                   "train_resnet18_from_scratch", "train_resnet18_zero_shot_train_only",
                   "train_resnet18_linear_probe_train_only", "train_resnet18_zero_shot", "train_resnet18_linear_probe",
                   "train_resnet34_linear_probe", "train_resnet50_linear_probe", "train_resnet18_embedding_text",
                   "eval_resnet18_embedding_linear"]


def test_every_study_function_exists_and_trains_a_registered_experiment():
    for name in STUDY_FUNCTIONS:
        assert callable(getattr(study, name)), name
        assert name in study.__all__
    for fn, exp in study.STUDY_FUNCTIONS.items():
        assert EXPERIMENTS.get(exp).kind == "student"
        assert exp in getattr(study, fn).__doc__


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    monkeypatch.setattr(study, "_SETTINGS", dict(study._SETTINGS))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    study.configure(cache_dir=str(tmp_path / "cache"), data_root=str(tmp_path / "data"), out=str(tmp_path / "out"),
                    device="cpu")
    return tmp_path


@pytest.mark.parametrize("name", ["train_resnet18_linear_probe", "precompute_clip_stl10_train_image_embeddings"])
def test_offline_the_study_functions_fail_fast_naming_the_missing_files(isolated, name):
    t0 = time.time()
    with pytest.raises(MissingResourceError) as err:
        getattr(study, name)()
    assert time.time() - t0 < 60
    assert "stl10_binary" in str(err.value) or "laion2b" in str(err.value) or "ViT-B-32" in str(err.value)


def test_configure_rejects_unknown_settings(isolated):
    with pytest.raises(TypeError, match="data_root"):
        study.configure(dataroot="/data")


@pytest.mark.parametrize("old", ["clipdistill.stl10", "clipdistill.study.stl10"])
def test_the_old_module_paths_still_import_the_same_functions_with_a_warning(old):
    import importlib
    import sys

    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match="clipdistill.study.original_functions"):
        module = importlib.import_module(old)
    assert module.__all__ == study.__all__
    for name in study.__all__:
        assert getattr(module, name) is getattr(study, name), name
