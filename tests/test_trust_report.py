"""What REPORT.md and bench tell a person before they trust a model (issue 27), from hand-made
arrays: the table of answers by the teacher's call, the confused pairs, what "matching no prompt"
means at --keep-threshold 0, and bench's word on the tiny offline teacher. The real fit-prompts
run's report is checked in tests/test_own_classifier.py."""

from __future__ import annotations

import numpy as np


def test_answers_by_teacher_call_and_top_confusions_by_hand():
    from clipdistill.fit.quality import NO_PROMPT, answers_by_teacher_call, top_confusions

    classes = ["cat", "dog"]
    t_pred = np.array([0, 0, 0, 1, 1, 0, 1, 1])
    s_pred = np.array([0, 1, 0, 1, 0, 1, 1, 1])
    match = np.array([1, 1, 1, 1, 1, 0, 0, 0], bool)
    accepted = np.array([1, 1, 0, 1, 1, 1, 1, 0], bool)
    a = answers_by_teacher_call(s_pred, accepted, t_pred, match, classes)
    assert a["rows"] == ["cat", "dog", NO_PROMPT] and a["columns"] == ["cat", "dog", "none of these"]
    assert a["counts"] == [[1, 1, 1],   # teacher cat: one right, one taken for a dog, one rejected
                           [1, 1, 0],   # teacher dog: one taken for a cat, one right
                           [0, 2, 1]]   # no prompt: two pass as dog, one rejected
    confusion = np.array([[5, 3, 0], [1, 7, 2], [0, 0, 4]])
    assert top_confusions(confusion, ["a", "b", "c"]) == [
        {"teacher": "a", "student": "b", "images": 3, "of": 8}, {"teacher": "b", "student": "c", "images": 2, "of": 10},
        {"teacher": "b", "student": "a", "images": 1, "of": 10}]
    assert top_confusions(np.diag([3, 4]), ["a", "b"]) == []  # no confusion: no pair


def test_curation_at_keep_threshold_0_says_every_image_was_kept_and_the_teachers_call():
    """`matching no prompt: 0` at --keep-threshold 0 read as "the whole pool is prompted classes";
    the line says every image was kept and how many the teacher's cosine cut calls no prompt."""
    from clipdistill.deploy.reject import otsu
    from clipdistill.teacher.curate import curate

    rng = np.random.default_rng(0)
    sim = np.concatenate([rng.normal(0.3, 0.03, 60), rng.normal(0.7, 0.03, 40)])  # 60 look like no prompt
    probs = rng.dirichlet(np.ones(3), 100)
    cur = curate(probs, np.arange(100), ["a", "b", "c"], similarity=sim)
    call = cur.teacher_call()
    assert call["similarity_cut"] == otsu(sim) and call["no_prompt"] == int((sim < otsu(sim)).sum()) == 60
    assert call["no_prompt_share"] == 60.0
    line = cur.summary()
    assert "kept every image in its best prompt's class (--keep-threshold 0)" in line
    assert "60 of them (60%) match no prompt" in line and "matching no prompt: 0" not in line
    strict = curate(probs, np.arange(100), ["a", "b", "c"], threshold=0.6, negatives="drop", similarity=sim)
    dropped = strict.counts()["dropped"]
    assert dropped == int((probs.max(1) < 0.6).sum()) > 0
    assert f"under --keep-threshold 0.6: {dropped} dropped" in strict.summary()
    assert curate(probs, np.arange(100), ["a", "b", "c"]).teacher_call() is None  # no similarities: no call


def _record(name: str, role: str, fps: float) -> dict:
    return {"model": f"/x/{name}.onnx", "name": name, "role": role, "backend": "ort-cpu", "batch": 8, "size": 32,
            "precision": "fp32", "fps": fps, "memory_mb": 10.0}


def test_bench_says_the_tiny_offline_teacher_is_smaller_than_the_student():
    from clipdistill.deploy.bench import TINY_TEACHER, ratio_lines, ratios
    from clipdistill.teacher.tiny import TINY_NAME

    assert TINY_TEACHER == TINY_NAME  # bench spells the name out (no torch on a device install)
    rs = ratios([_record("student", "student", 500.0), _record(TINY_NAME, "teacher", 2000.0)])
    assert rs[0]["teacher_name"] == TINY_NAME and rs[0]["fps_ratio"] == 0.25
    text = ratio_lines(rs)
    assert "0.25x the throughput" in text
    assert f"note: the teacher here is {TINY_NAME}" in text and "the student is slower: 0.25x" in text
    real = ratio_lines(ratios([_record("student", "student", 500.0), _record("ViT-B-32", "teacher", 5.0)]))
    assert "100.00x the throughput" in real and "note:" not in real
