"""Experiments are data; reproduce writes the report from runs on disk and reuses them."""

from __future__ import annotations

import json
import time

import pytest
from conftest import run_cli

from clipdistill.distill.config import TrainConfig
from clipdistill.study.experiments import EXPERIMENTS, SUITES, build_config, select
from clipdistill.study.reproduce import ReproduceConfig, reproduce
from clipdistill.teacher.evaluate import TeacherEvalConfig

STUDY_ROWS = ["openclip_text", "openclip_linear", "resnet18_from_scratch", "resnet18_text_train",
              "resnet18_linear_train", "resnet18_text_train_unlabeled", "resnet18_linear_train_unlabeled",
              "resnet34_linear_train_unlabeled", "resnet50_linear_train_unlabeled",
              "resnet18_embedding_text_train_unlabeled", "resnet18_embedding_linear_train_unlabeled"]


@pytest.mark.parametrize("suite", list(SUITES))
@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_every_experiment_of_every_suite_builds(suite, name):
    cfg = build_config(suite, name)
    e = EXPERIMENTS.get(name)
    assert isinstance(cfg, TrainConfig if e.kind == "student" else TeacherEvalConfig)
    assert cfg.teacher == SUITES.get(suite).base["teacher"]
    if e.kind == "student":
        assert cfg.dataset == SUITES.get(suite).base["dataset"]


def test_the_study_rows_are_all_there_with_their_published_figures():
    for name in STUDY_ROWS:
        assert EXPERIMENTS.get(name).published.get("stl10") is not None
    assert build_config("stl10", "resnet18_text_train_unlabeled").logit_scale == 1.0  # the study's T=1 on cosines
    stl = build_config("stl10", "resnet18_from_scratch")
    assert (stl.epochs, stl.lr, stl.batch_size, stl.schedule) == (50, 3e-4, 64, "constant")


def test_shapes10_suite_swaps_students_and_equalises_compute():
    # The study's rows keep their names; shapes10 trains deep-stem students and more epochs on 1,000 images.
    assert build_config("stl10", "resnet34_linear_train_unlabeled").student == "resnet34"
    assert build_config("shapes10", "resnet34_linear_train_unlabeled").student == "resnet14t"
    scratch, unl = build_config("shapes10", "resnet18_from_scratch"), build_config("shapes10",
                                                                                 "resnet18_linear_train_unlabeled")
    assert (scratch.student, scratch.epochs, unl.epochs) == ("resnet10t", 40, 4)
    assert build_config("shapes10", "resnet18_from_scratch", epochs=2).epochs == 2  # explicit flags win


def test_demo_selection_answers_each_question():
    qs = {e.question for e in select("shapes10")}
    assert qs == {"teacher", "labels_vs_distill", "data", "method"}
    full = select("shapes10", full=True)
    assert not any(e.recipe for e in full)  # the study's rows only
    assert len(select("shapes10", full=True, recipe=True)) == len(EXPERIMENTS)
    assert [e.name for e in select("shapes10", recipe=True) if e.recipe][-1] == "recipe_zero_label"


def test_experiments_verb_lists_them():
    out = run_cli("experiments").stdout
    for name in STUDY_ROWS:
        assert name in out
    assert "suite stl10" in out and "suite shapes10" in out


def test_stl10_suite_without_network_fails_fast_with_what_to_download(tmp_path):
    t0 = time.time()
    proc = run_cli("reproduce", "--suite", "stl10", "--only", "resnet18_linear_train_unlabeled", "--cache-dir",
                   str(tmp_path), "--out", str(tmp_path / "out"), check=False, env={"HF_HOME": str(tmp_path / "hf")})
    assert time.time() - t0 < 60
    assert proc.returncode == 1
    assert "stl10_binary" in proc.stderr and "--data-root" in proc.stderr


def test_reproduce_writes_report_and_reuses_everything(tmp_path, cache_dir, trained_teacher_file):
    cfg = ReproduceConfig(suite="shapes10", only=["openclip_text", "openclip_linear", "resnet18_from_scratch",
                                                  "resnet18_linear_train"],
                          out=str(tmp_path / "rep"), cache_dir=str(cache_dir), pretrained=str(trained_teacher_file),
                          max_images=2000, epochs=1, progress=False)
    first = reproduce(cfg)
    out = tmp_path / "rep"
    records = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in records] == cfg.only
    for r in records:
        assert {"name", "student", "teacher", "data", "method", "test_accuracy", "teacher_agreement",
                "train_seconds", "run_dir"} <= set(r)
    # every number comes from a result file on disk
    scratch = json.loads((out / "resnet18_from_scratch" / "seed0" / "result.json").read_text())
    assert records[2]["test_accuracy"] == scratch["test_accuracy"]
    teacher = json.loads((out / "teacher" / "teacher_eval.json").read_text())
    assert records[0]["test_accuracy"] == teacher["zero_shot_accuracy"]
    assert records[1]["test_accuracy"] == teacher["linear_probe_accuracy"]
    md = (out / "RESULTS.md").read_text()
    assert "resnet18_from_scratch" in md and f"{scratch['test_accuracy']:.2f}" in md
    for q in ("teacher", "labels_vs_distill"):
        assert (out / f"plot_{q}.png").stat().st_size > 1000 and (out / f"plot_{q}.svg").exists()

    t0 = time.time()
    second = reproduce(cfg)
    assert time.time() - t0 < 15
    assert [r["test_accuracy"] for r in second["records"]] == [r["test_accuracy"] for r in first["records"]]
    # --only adds to a report; it never drops the rows already finished in the folder
    import dataclasses

    third = reproduce(dataclasses.replace(cfg, only=["resnet18_from_scratch"]))
    assert [r["name"] for r in third["records"]] == cfg.only
    assert "Overridden for this report: --epochs 1, --max-images 2000" in (out / "RESULTS.md").read_text()
