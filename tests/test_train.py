"""The trainer on the offline world: every method learns; unlabeled data helps; a killed
run resumes to the same weights; a foreign config is refused; DDP under torchrun."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_plain_log, kill_after_first_epoch, run_cli, train_kwargs

from clipdistill.core.errors import ConfigError
from clipdistill.distill import checkpoint
from clipdistill.distill.config import TrainConfig
from clipdistill.distill.train import train


def _quiet(*a, **k):
    pass


@pytest.mark.parametrize("method,head,data,epochs", [
    ("labels", "auto", ["train"], 4), ("kl", "linear", ["train"], 4), ("kl", "text", ["train"], 4),
    ("mse", "linear", ["train"], 4), ("kl+mse", "linear", ["train"], 4),
    # matching only the direction learns slowest: it gets the unlabeled images too
    ("cosine", "text", ["train", "unlabeled"], 3)])
def test_every_method_trains_and_beats_chance(tmp_path, cache_dir, trained_teacher_file, method, head, data, epochs):
    res = train(TrainConfig(**train_kwargs(cache_dir, trained_teacher_file, method=method, head=head, data=data,
                                           epochs=epochs, out=str(tmp_path / "run"))))
    # chance is 10% (2,000 test images: one standard deviation is 0.7 points)
    assert res["test_accuracy"] > 13.0, res
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert saved["test_accuracy"] == res["test_accuracy"] and "teacher_agreement" in saved
    assert (tmp_path / "run" / "config.json").exists()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert any("val_accuracy" in ln for ln in lines)
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    _timm_loads_the_student(tmp_path / "run")


def _timm_loads_the_student(run: Path) -> None:
    """RUN/student is what timm loads, with the checkpoint's outputs: logits, or for an
    embedding student the embedding (its head is stored beside it, described in config.json)."""
    import timm
    from safetensors.torch import load_file

    from clipdistill.teacher.heads import build_head

    record = checkpoint.read_student(run / "checkpoints" / "best.safetensors")
    ref = timm.create_model(record.arch, num_classes=record.out_dim)
    ref.load_state_dict(record.weights)
    model = timm.create_model(f"local-dir:{run / 'student'}", pretrained=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), ref.eval()(x), rtol=0, atol=0)
    info = json.loads((run / "student" / "config.json").read_text())["clipdistill"]
    assert info["output"] == record.output and info["classes"] == list(record.classes)
    if record.output == "embedding":
        head = build_head(info["head"], load_file(str(run / "student" / info["head_file"])))
        assert head(ref.eval()(x).detach()).shape == (2, record.num_classes)


def test_unlabeled_data_with_the_linear_head_beats_labels_alone(tmp_path, cache_dir, trained_teacher_file):
    # 3 epochs each (the demo's 5-epoch rows: 12.6% from scratch, 49.7% distilled): a wide margin either way
    scratch = train(TrainConfig(**train_kwargs(cache_dir, trained_teacher_file, method="labels", data=["train"],
                                               epochs=3, out=str(tmp_path / "scratch"))))
    distilled = train(TrainConfig(**train_kwargs(cache_dir, trained_teacher_file, method="kl", head="linear",
                                                 data=["train", "unlabeled"], epochs=3,
                                                 out=str(tmp_path / "kl"))))
    assert distilled["test_accuracy"] > scratch["test_accuracy"] + 5, (scratch, distilled)


def test_finished_run_is_reused_and_other_config_refused(tmp_path, cache_dir, trained_teacher_file, caplog):
    kw = train_kwargs(cache_dir, trained_teacher_file, method="kl", data=["train"], epochs=1,
                      out=str(tmp_path / "run"))
    first = train(TrainConfig(**kw))
    caplog.clear()
    t0 = time.time()
    with caplog.at_level("INFO", logger="clipdistill"):
        again = train(TrainConfig(**kw))
    msgs = [r.getMessage() for r in caplog.records]
    assert again == {**first, "reused": True} and time.time() - t0 < 5 and "already complete" in msgs[0]
    with pytest.raises(ConfigError, match=r"--lr: 0\.002 in the run, 0\.001 now"):
        train(TrainConfig(**{**kw, "lr": 1e-3}))


def test_sigkill_then_resume_auto_ends_with_the_same_weights(tmp_path, cache_dir, trained_teacher_file):
    args = ["train", "--pretrained", str(trained_teacher_file), "--cache-dir", str(cache_dir), "--max-images", "600",
            "--student", "resnet10t", "--method", "kl", "--head", "linear", "--data", "train", "--epochs", "3",
            "--lr", "2e-3", "--amp", "fp32"]  # progress on: not a terminal, so plain lines (issue 27)
    killed = tmp_path / "killed"
    epoch_at_kill = kill_after_first_epoch(args, killed, settle=0.5)  # into epoch 2
    assert 1 <= epoch_at_kill < 3, "the run finished before it could be killed"
    assert not (killed / "result.json").exists()

    resumed = run_cli(*args, "--out", str(killed), "--resume", "auto")
    assert f"resumed {killed} at epoch {epoch_at_kill}/3" in resumed.stderr
    clean = run_cli(*args, "--out", str(tmp_path / "clean"), log=tmp_path / "clean.log")
    assert_plain_log(clean.stderr, epochs=3)  # `train ... > log 2>&1`: one line an epoch, no '\r'
    a = checkpoint.read_student(killed / "checkpoints" / "last.safetensors")
    b = checkpoint.read_student(tmp_path / "clean" / "checkpoints" / "last.safetensors")
    assert a.epoch == b.epoch == 3 and a.step == b.step
    for k in b.weights:
        torch.testing.assert_close(a.weights[k], b.weights[k], rtol=0, atol=0, msg=k)
    ra = json.loads((killed / "result.json").read_text())
    rb = json.loads((tmp_path / "clean" / "result.json").read_text())
    assert ra["test_accuracy"] == rb["test_accuracy"]
    # the steps trained again after the kill are logged once: the same records as the clean run's
    steps = [[(r["step"], "loss" in r) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
             for run in (killed, tmp_path / "clean")]
    assert steps[0] == steps[1] and len(set(steps[0])) == len(steps[0])


def test_resume_never_refuses_an_existing_run(tmp_path, cache_dir, trained_teacher_file):
    kw = train_kwargs(cache_dir, trained_teacher_file, method="labels", data=["train"], epochs=1,
                      out=str(tmp_path / "run"))
    train(TrainConfig(**kw))
    (tmp_path / "run" / "result.json").unlink()
    with pytest.raises(ConfigError, match="--resume auto"):
        train(TrainConfig(**{**kw, "resume": "never"}))


def test_non_finite_loss_stops_with_the_step_and_checkpoint(tmp_path, cache_dir, trained_teacher_file):
    from clipdistill.core.errors import NonFiniteLossError

    kw = train_kwargs(cache_dir, trained_teacher_file, method="mse", data=["train"], epochs=1, lr=1e12,
                      amp="fp32", out=str(tmp_path / "run"))
    with pytest.raises(NonFiniteLossError, match=r"at step \d+ .*last good checkpoint"):
        train(TrainConfig(**kw))


@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun not installed")
def test_torchrun_two_processes_on_cpu(tmp_path, cache_dir, trained_teacher_file):
    # The caches are filled by a one-process run first (as rank 0 would).
    one = train(TrainConfig(**train_kwargs(cache_dir, trained_teacher_file, method="kl", data=["train"], epochs=1,
                                           out=str(tmp_path / "one"))))
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [torchrun, "--nproc_per_node", "2", "--master_port", "29517", "-m", "clipdistill", "train",
         "--pretrained", str(trained_teacher_file), "--cache-dir", str(cache_dir), "--max-images", "2000",
         "--student", "resnet10t", "--method", "kl", "--data", "train", "--epochs", "1", "--lr", "2e-3",
         "--no-progress", "--out", str(out), "--device", "cpu"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.safetensors", "last.safetensors"]
    res = json.loads((out / "result.json").read_text())
    assert set(res) == set(one) and res["epochs"] == 1 and 0 <= res["test_accuracy"] <= 100
    record = checkpoint.read_student(out / "checkpoints" / "last.safetensors")
    assert record.step == checkpoint.read_student(tmp_path / "one" / "checkpoints" / "last.safetensors").step
    # one metrics file, written by rank 0 only: one validation record per epoch
    vals = [ln for ln in (out / "metrics.jsonl").read_text().splitlines() if "val_accuracy" in ln]
    assert len(vals) == 1


def test_a_run_is_not_resumed_or_evaluated_against_another_teacher_or_precision(tmp_path, cache_dir,
                                                                                 trained_teacher_file):
    """`--device`, `--amp auto` and `--precision auto` resolve per machine; the checkpoint
    records what they resolved to, and a run continued elsewhere must match it."""
    from clipdistill.distill.evaluate import EvalConfig, evaluate_run

    run = tmp_path / "run"
    kw = train_kwargs(cache_dir, trained_teacher_file, method="labels", data=["train"], epochs=1, out=str(run))
    train(TrainConfig(**kw))
    (run / "result.json").unlink()
    last, training = checkpoint.read_last(run / "checkpoints" / "last.safetensors")
    assert last.precision in ("fp32", "bf16")
    checkpoint.write_student(run / "checkpoints" / "last.safetensors", dataclasses.replace(last, precision="fp16"),
                             training)
    with pytest.raises(ConfigError, match="student precision fp16"):
        train(TrainConfig(**kw))
    best = checkpoint.read_student(run / "checkpoints" / "best.safetensors")
    checkpoint.write_student(run / "checkpoints" / "best.safetensors",
                             dataclasses.replace(best, teacher={**best.teacher, "precision": "fp16"}))
    with pytest.raises(ConfigError, match="precision 'fp16' then"):
        evaluate_run(EvalConfig(run=str(run)))


def test_the_test_split_is_never_training_data(cache_dir, trained_teacher_file):
    with pytest.raises(ConfigError, match="--data"):
        TrainConfig(**train_kwargs(cache_dir, trained_teacher_file, data=["train", "test"]))


def test_zero_label_training_on_a_nested_pool(tmp_path, cache_dir, trained_teacher_file):
    """Prompts + a pool kept in nested folders (pool/unlabeled/2024-05/...) + a labelled test/:
    the pool's folders are not classes, the prompts name them, nothing labelled is trained on."""
    from PIL import Image

    from clipdistill.data.shapes10 import CLASSES, generate

    keep = ["circle", "heart", "square", "star"]
    images, labels = generate("unlabeled", 240, 32, seed=3)
    for i, img in enumerate(images):
        d = tmp_path / "data" / "unlabeled" / f"2024-0{i % 3 + 1}" / ("day2" if i % 2 else "")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i}.png")
    images, labels = generate("test", 120, 32, seed=4)
    for i, (img, y) in enumerate(zip(images, labels)):
        if CLASSES[y] in keep:
            (tmp_path / "data" / "test" / CLASSES[y]).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(tmp_path / "data" / "test" / CLASSES[y] / f"{i}.png")
    (tmp_path / "prompts.txt").write_text("".join(f"a {c}\n" for c in keep))
    res = train(TrainConfig(**train_kwargs(cache_dir, trained_teacher_file, dataset="folder",
                                           data_root=str(tmp_path / "data"), prompts=str(tmp_path / "prompts.txt"),
                                           data=["unlabeled"], head="text", epochs=1, student_size=32,
                                           max_images=0, out=str(tmp_path / "run"))))
    assert res["n_test"] == sum(CLASSES[y] in keep for y in labels)
    assert "val_teacher_agreement" in res and "val_accuracy" not in res  # no label picked the epoch
    assert list(res["per_class_accuracy"]) == keep and 0 <= res["test_accuracy"] <= 100
