"""The recipe: augmented views batched on the tensor, the teacher in the loop on exactly the
student's view (consistent teaching), cached views, mixup, warm-up, the teacher's own logit
scale, seeds in the report. Small sizes; the accuracy of the recipe itself is measured by
`reproduce --recipe --seeds 3` (README), not here."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import kill_after_first_epoch, run_cli, train_kwargs

from clipdistill.distill import checkpoint
from clipdistill.distill.augment import AUGMENTATIONS, Mix, draw_mix, identity_views, render, sample_views
from clipdistill.distill.config import TrainConfig
from clipdistill.distill.methods import TERMS, Batch, MethodContext, label_cross_entropy
from clipdistill.distill.train import train
from clipdistill.distill.trainer import lr_factor


def _small(cache_dir, teacher, tmp_path, name, **over):
    """A tiny run with the product's recipe defaults (teaching auto, warm-up) plus mixup."""
    default = TrainConfig()
    kw = train_kwargs(cache_dir, teacher, max_images=400, epochs=2, batch_size=32, method="kl", head="text",
                      data=["train", "unlabeled"], augment="rrc", mixup=1.0, teaching=default.teaching,
                      warmup_epochs=default.warmup_epochs, out=str(tmp_path / name))
    kw.update(over)
    return TrainConfig(**kw)


# ----------------------------------------------------------------------------- views and mixup

def test_identity_views_are_a_plain_resize_and_a_flip_view_flips():
    x = torch.rand(3, 3, 16, 16)
    assert torch.equal(render(x, identity_views(3), 16), x)
    torch.testing.assert_close(render(x, identity_views(3), 8),
                               torch.nn.functional.interpolate(x, size=(8, 8), mode="bilinear", antialias=True))
    flip = identity_views(3)
    flip[:, 4] = 1
    torch.testing.assert_close(render(x, flip, 16), x.flip(-1), atol=1e-5, rtol=0)


def test_a_crop_view_shows_that_part_of_the_image():
    x = torch.zeros(1, 3, 32, 32)
    x[..., :16, :16] = 1.0  # the top-left quarter is white
    v = identity_views(1)
    v[0, :4] = torch.tensor([0.5, 0.5, -0.5, -0.5])  # half the side, centred on the top-left quarter
    out = render(x, v, 16)
    assert out[..., 2:14, 2:14].min() > 0.99


def test_random_resized_crops_stay_in_the_image_and_follow_the_generator():
    aug = AUGMENTATIONS.get("rrc")
    a = sample_views(500, aug, torch.Generator().manual_seed(3))
    b = sample_views(500, aug, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    w, h, cx, cy, flip = a.unbind(1)
    area = w * h
    assert (w <= 1).all() and (h <= 1).all() and (cx.abs() <= 1 - w + 1e-6).all() and (cy.abs() <= 1 - h + 1e-6).all()
    assert 0.3 < area.min() and area.max() <= 1.0 and 0.3 < flip.mean() < 0.7


def test_mixup_mixes_inputs_and_labels_alike():
    g = torch.Generator().manual_seed(0)
    assert draw_mix(4, 0.0, g) is None
    mix = draw_mix(4, 1.0, g)
    assert 0 <= mix.lam <= 1 and mix.perm.tolist() == [3, 2, 1, 0]
    x = torch.arange(4.0)
    torch.testing.assert_close(mix.apply(x), mix.lam * x + (1 - mix.lam) * x.flip(0))
    logits = torch.randn(4, 5)
    labels = torch.tensor([1, -1, 3, 0])
    got = TERMS.get("labels").fn(Batch(logits, logits, labels, torch.zeros(4, 2), Mix(0.3, torch.arange(3, -1, -1))),
                                 MethodContext(None))
    want = 0.3 * label_cross_entropy(logits, labels) + 0.7 * label_cross_entropy(logits, labels.flip(0))
    torch.testing.assert_close(got, want)


def test_labelled_images_weigh_as_much_as_unlabeled_ones():
    logits = torch.randn(8, 5)
    labels = torch.tensor([1, -1, -1, -1, 3, -1, -1, -1])
    per_image = torch.nn.functional.cross_entropy(logits[[0, 4]], labels[[0, 4]], reduction="none")
    torch.testing.assert_close(label_cross_entropy(logits, labels), per_image.sum() / 8)
    everyone = torch.tensor([1, 0, 2, 3, 3, 4, 0, 1])  # all labelled: the plain mean
    torch.testing.assert_close(label_cross_entropy(logits, everyone),
                               torch.nn.functional.cross_entropy(logits, everyone))
    assert label_cross_entropy(logits, torch.full((8,), -1)).item() == 0.0


def test_warmup_then_cosine():
    f = lr_factor("cosine", total=100, warmup=10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5) and f(100) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor("constant", 100, 0)(50) == 1.0
    assert lr_factor("cosine", 100, 0)(50) == pytest.approx(0.5)


# ----------------------------------------------------------------------------- consistent teaching

def test_the_teacher_sees_exactly_the_students_augmented_view(tmp_path, cache_dir, trained_teacher_file,
                                                              monkeypatch):
    """Online teaching: every training batch reaches the teacher as the same pixels the
    student got (same crop, flip and mix), each in its own normalisation."""
    from clipdistill.teacher.openclip_teacher import Teacher

    seen = {"teacher": [], "student": []}
    real = Teacher.encode_images

    def spy(self, x):
        seen["teacher"].append(x.detach().float().clone())
        return real(self, x)

    monkeypatch.setattr(Teacher, "encode_images", spy)
    cfg = _small(cache_dir, trained_teacher_file, tmp_path, "online", epochs=1, teaching="online", amp="fp32")
    from clipdistill.distill.context import RunContext
    from clipdistill.distill.trainer import Trainer

    trainer = Trainer(RunContext(cfg))
    trainer.ctx.model.register_forward_pre_hook(lambda m, args: seen["student"].append(args[0].detach().float().clone())
                                                if m.training else None)
    seen["teacher"].clear()
    trainer.fit()
    tmean, tstd = trainer.ctx.outs.teacher.normalization
    n = min(len(seen["teacher"]), len(seen["student"]))
    assert n == trainer.steps_per_epoch
    for t, s in zip(seen["teacher"][:n], seen["student"][:n]):
        pix_t = t * torch.tensor(tstd).view(1, 3, 1, 1) + torch.tensor(tmean).view(1, 3, 1, 1)
        pix_s = s * cfg.student_std + cfg.student_mean
        torch.testing.assert_close(pix_t, pix_s, atol=2e-2, rtol=0)  # bf16 teacher input
    assert trainer.teaching.mode == "online"


def test_auto_teaching_is_cached_without_augmentation_and_measured_with_it(tmp_path, cache_dir,
                                                                           trained_teacher_file, caplog):
    plain = train(_small(cache_dir, trained_teacher_file, tmp_path, "plain", augment="none", mixup=0.0, epochs=1))
    assert plain["teaching"] == "cached"
    with caplog.at_level("INFO", logger="clipdistill"):
        auto = train(_small(cache_dir, trained_teacher_file, tmp_path, "auto", epochs=1))
    assert auto["teaching"] in ("online", "views")
    msg = next(r.getMessage() for r in caplog.records if "teaching auto" in r.getMessage())
    assert "ms per image" in msg and "seconds per epoch" in msg and "online" in msg and "views" in msg
    assert set(auto["teaching_costs"]) >= {"seconds_per_epoch_online", "seconds_per_epoch_views",
                                           "seconds_per_epoch_cached"}


def test_cached_views_train_and_are_reused(tmp_path, cache_dir, trained_teacher_file):
    res = train(_small(cache_dir, trained_teacher_file, tmp_path, "views", teaching="views", views=2, epochs=1))
    assert res["teaching"] == "views" and 0 <= res["test_accuracy"] <= 100
    caches = list(cache_dir.rglob("*-views2-rrc-seed0/manifest.json"))
    assert caches and all(json.loads(p.read_text())["complete"] for p in caches)
    stamp = [p.stat().st_mtime_ns for p in caches]
    train(_small(cache_dir, trained_teacher_file, tmp_path, "views2", teaching="views", views=2, epochs=1))
    assert [p.stat().st_mtime_ns for p in caches] == stamp


def test_logit_scale_auto_is_the_teachers_own(tmp_path, cache_dir, trained_teacher_file):
    res = train(_small(cache_dir, trained_teacher_file, tmp_path, "scale", augment="none", mixup=0.0, epochs=1))
    from clipdistill.teacher.tiny import read_sidecar

    learnt = read_sidecar(trained_teacher_file)["stats"]["logit_scale"]
    assert res["logit_scale"] == pytest.approx(learnt, rel=1e-3) and 5 < learnt < 100
    record = checkpoint.read_student(Path(res["run_dir"]) / "checkpoints" / "best.safetensors")
    assert record.head.logit_scale == pytest.approx(learnt, rel=1e-3)
    with pytest.raises(Exception, match="--logit-scale"):
        TrainConfig(logit_scale="big")


def test_zero_label_runs_pick_by_teacher_agreement(tmp_path, cache_dir, trained_teacher_file):
    res = train(_small(cache_dir, trained_teacher_file, tmp_path, "zero", pick="agreement", augment="none",
                       mixup=0.0, epochs=1))
    assert "val_teacher_agreement" in res and "val_accuracy" not in res


# ----------------------------------------------------------------------------- resume and torchrun

def _online_args(teacher: Path, cache_dir: Path) -> list[str]:
    return ["train", "--pretrained", str(teacher), "--cache-dir", str(cache_dir), "--max-images", "400",
            "--student", "resnet10t", "--method", "kl+labels", "--head", "linear", "--data", "train,unlabeled",
            "--augment", "rrc", "--mixup", "1", "--teaching", "online", "--epochs", "3", "--batch-size", "32",
            "--lr", "2e-3", "--warmup-epochs", "1", "--no-progress", "--amp", "fp32", "--device", "cpu"]


def test_a_killed_online_run_resumes_to_the_same_weights(tmp_path, cache_dir, trained_teacher_file):
    args = _online_args(trained_teacher_file, cache_dir)
    killed = tmp_path / "killed"
    assert 1 <= kill_after_first_epoch(args, killed, settle=0.3) < 3, "the run finished before it could be killed"
    run_cli(*args, "--out", str(killed))
    run_cli(*args, "--out", str(tmp_path / "clean"))
    a = checkpoint.read_student(killed / "checkpoints" / "last.safetensors")
    b = checkpoint.read_student(tmp_path / "clean" / "checkpoints" / "last.safetensors")
    assert a.epoch == b.epoch == 3 and a.teaching == b.teaching == "online"
    for k in b.weights:
        assert torch.equal(a.weights[k], b.weights[k]), k


@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun not installed")
def test_online_teaching_under_torchrun_keeps_the_bookkeeping(tmp_path, cache_dir, trained_teacher_file):
    args = _online_args(trained_teacher_file, cache_dir)
    args[args.index("--epochs") + 1] = "1"
    run_cli(*args, "--out", str(tmp_path / "one"))
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    proc = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29519", "-m", "clipdistill", *args,
                           "--out", str(tmp_path / "ddp")], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "result.json").read_text())
    ddp = json.loads((tmp_path / "ddp" / "result.json").read_text())
    assert set(ddp) == set(one) and ddp["teaching"] == one["teaching"] == "online"
    a = checkpoint.read_student(tmp_path / "ddp" / "checkpoints" / "last.safetensors")
    b = checkpoint.read_student(tmp_path / "one" / "checkpoints" / "last.safetensors")
    assert a.step == b.step and a.epoch == b.epoch == 1
    vals = [ln for ln in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines() if "val_accuracy" in ln]
    assert len(vals) == 1


# ----------------------------------------------------------------------------- seeds in the report

def test_reproduce_over_seeds_reports_mean_std_and_every_seed(tmp_path, cache_dir, trained_teacher_file):
    from clipdistill.study.reproduce import ReproduceConfig, reproduce

    cfg = ReproduceConfig(suite="shapes10", only=["openclip_text", "resnet18_from_scratch"], seeds=2, epochs=1,
                          max_images=300, pretrained=str(trained_teacher_file), cache_dir=str(cache_dir),
                          out=str(tmp_path / "rep"), progress=False)
    res = reproduce(cfg)
    rec = next(r for r in res["records"] if r["name"] == "resnet18_from_scratch")
    assert rec["seeds"] == [0, 1] and len(rec["test_accuracy_per_seed"]) == 2
    assert rec["test_accuracy"] == pytest.approx(np.mean(rec["test_accuracy_per_seed"]))
    assert rec["test_accuracy_std"] == pytest.approx(np.std(rec["test_accuracy_per_seed"], ddof=1))
    assert [Path(d).name for d in rec["run_dirs"]] == ["seed0", "seed1"]
    md = (tmp_path / "rep" / "RESULTS.md").read_text()
    assert f"{rec['test_accuracy']:.2f} ± {rec['test_accuracy_std']:.2f}" in md
    saved = json.loads((tmp_path / "rep" / "results.json").read_text())
    assert next(r for r in saved if r["name"] == "resnet18_from_scratch")["test_accuracy_per_seed"] == \
        rec["test_accuracy_per_seed"]
