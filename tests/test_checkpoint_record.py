"""The student checkpoint's one typed record: what it reads from a file, what it writes, and
that checkpoints written before it (older layouts, fewer fields) still load."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from clipdistill.core.state import StateFileError
from clipdistill.distill import checkpoint
from clipdistill.distill.record import TrainingState
from clipdistill.distill.rundir import RunDir
from clipdistill.distill.students import create_student
from clipdistill.teacher.heads import TextHead

CLASSES = ["circle", "square", "star"]
CONFIG = {"student": "resnet10t", "student_mean": 0.5, "student_std": 0.25, "dataset": "shapes10"}

# The keys `Trainer.weights()` wrote before the record existed (and still writes, plus teaching_costs).
LAYOUT = {"model", "epoch", "step", "best", "config", "head", "method", "output", "num_classes", "embed_dim", "size",
          "classes", "prompts", "val_metric", "teacher", "amp", "teaching", "inputs", "teacher_head"}


def _old_layout(student: torch.nn.Module, head: torch.nn.Module) -> dict:
    """An embedding student's `best` exactly as the trainer wrote it before the record."""
    return {"model": student.state_dict(), "epoch": 3, "step": 90, "best": 71.5, "config": CONFIG, "head": "text",
            "method": "mse", "output": "embedding", "num_classes": 3, "embed_dim": 16, "size": 32,
            "classes": CLASSES, "prompts": [f"a {c}" for c in CLASSES], "val_metric": "accuracy",
            "teacher": {"model": "tiny-shapes", "weights": "w", "preprocess": "p", "precision": "fp32"},
            "amp": "bf16", "teaching": "online", "inputs": {"prompt_lines": None, "datasets": {}},
            "teacher_head": {"kind": "text", "state_dict": head.state_dict(), "logit_scale": 17.5}}


def test_a_checkpoint_of_the_earlier_layout_reads_into_the_record_and_writes_back_the_same(tmp_path):
    torch.manual_seed(0)
    student, head = create_student("resnet10t", 16).eval(), TextHead(torch.randn(3, 16), 17.5)
    path = tmp_path / "best.safetensors"
    checkpoint.save(path, **_old_layout(student, head))
    record = checkpoint.read_student(path)
    assert (record.output, record.num_classes, record.embed_dim, record.classes) == ("embedding", 3, 16, CLASSES)
    assert (record.arch, record.out_dim, record.dataset) == ("resnet10t", 16, "shapes10")
    assert (record.input.size, record.input.mean, record.input.std) == (32, 0.5, 0.25)
    assert record.head_spec() == {"kind": "text", "classes": 3, "dim": 16, "logit_scale": 17.5}
    assert (record.epoch, record.step, record.best, record.val_metric) == (3, 90, 71.5, "accuracy")
    assert (record.precision, record.teaching, record.teaching_costs) == ("bf16", "online", None)
    x = torch.randn(2, 3, 32, 32)
    folded = record.folded_head()
    with torch.no_grad():
        torch.testing.assert_close(folded(student(x)), head(student(x)))
    fresh = create_student(record.arch, record.out_dim)
    checkpoint.load_model(fresh, record, path)
    assert torch.equal(fresh.state_dict()["fc.weight"], student.state_dict()["fc.weight"])
    # written back: the same keys (and teaching_costs), read back as the same record
    assert set(record.to_state()) == LAYOUT | {"teaching_costs"}
    checkpoint.write_student(tmp_path / "again.safetensors", record)
    again = checkpoint.read_student(tmp_path / "again.safetensors")
    assert {f.name: getattr(again, f.name) for f in dataclasses.fields(again) if f.name not in ("weights", "head")} == \
        {f.name: getattr(record, f.name) for f in dataclasses.fields(record) if f.name not in ("weights", "head")}
    assert again.head.kind == "text" and again.head.logit_scale == 17.5
    assert torch.equal(again.head.state_dict["text"], record.head.state_dict["text"])


def test_an_older_checkpoint_without_the_later_fields_reads_with_them_unknown(tmp_path):
    """From before teaching modes, precision and inputs were recorded (and a logits student):
    those fields read as None, not as an error."""
    student = create_student("resnet10t", 3)
    path = tmp_path / "best.safetensors"
    checkpoint.save(path, model=student.state_dict(), output="logits", num_classes=3, embed_dim=16, size=32,
                    classes=CLASSES, epoch=1, config=CONFIG,
                    teacher_head={"kind": "linear", "state_dict": torch.nn.Linear(16, 3).state_dict()})
    record = checkpoint.read_student(path)
    assert (record.teaching, record.precision, record.inputs, record.teaching_costs, record.teacher) == (None,) * 5
    assert record.prompts == [] and record.head.logit_scale is None and record.folded_head() is None
    assert record.out_dim == 3
    with pytest.raises(StateFileError, match=r"best\.safetensors is not a student checkpoint .*no output"):
        checkpoint.save(path, model=student.state_dict(), config=CONFIG)
        checkpoint.read_student(path)


def test_last_holds_the_record_and_the_training_state(trained_run):
    run = RunDir(trained_run)
    record, training = checkpoint.read_last(run.last)
    best = checkpoint.read_student(run.best)
    assert record.config == best.config and record.epoch >= best.epoch
    assert isinstance(training, TrainingState) and training.history and training.rng
    assert record.teaching == "none" and record.output == "logits" and record.head.kind == "linear"
