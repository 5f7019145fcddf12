"""Files a user can trust: what we read back runs no code, damage is detected, one writer
per run folder, bad input gets a one-line message naming the flag or file.

Each test reproduces one finding of the adversarial pass (issue 10) on real files. Most
commands run in-process through `cli.main` (a subprocess per case would cost seconds of
imports each); the payloads are real pickles that would leave a marker file if they ran."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipdistill.cli import main
from clipdistill.core.locks import LockedError
from clipdistill.core.state import read_state, write_state
from clipdistill.distill import checkpoint
from clipdistill.distill.rundir import RunDir


class _Payload:
    """Unpickling this runs `open(marker, "w")`: the marker file proves the code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant_pickle(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": _Payload(marker), "epoch": 1}, path)  # the zip form torch.load reads
    assert pickle.loads(pickle.dumps(_Payload(marker.with_suffix(".selftest")))) is not None  # the payload works
    assert marker.with_suffix(".selftest").exists()
    marker.with_suffix(".selftest").unlink()


def _cli(capsys, *args: str) -> tuple[int, str]:
    try:
        rc = main(list(args))
    except SystemExit as e:  # argparse: bad flags and ConfigError exit 2 with usage
        rc = e.code
    return rc, capsys.readouterr().err


@pytest.fixture
def run_copy(trained_run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(trained_run, dst)
    return dst


# ----------------------------------------------------------------------------- code from files

def test_state_files_round_trip_without_pickle(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": checkpoint.rng_state(),
             "nested": {"t": (1, 2.5, None), 3: "int key"}, "arr": np.arange(5, dtype=np.int32)}
    write_state(tmp_path / "s.safetensors", state)
    back = read_state(tmp_path / "s.safetensors")
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert set(back["optimizer"]["state"]) == {0, 1}  # int keys survive
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert back["nested"] == {"t": (1, 2.5, None), 3: "int key"} and back["arr"].tolist() == [0, 1, 2, 3, 4]
    checkpoint.set_rng_state(back["rng"])
    a = torch.rand(3)
    checkpoint.set_rng_state(state["rng"])
    assert torch.equal(a, torch.rand(3))


@pytest.mark.parametrize("which", ["best", "last"])
def test_a_planted_pickle_as_a_checkpoint_never_runs(run_copy, tmp_path, capsys, which):
    marker = tmp_path / "pwned"
    run = RunDir(run_copy)
    _plant_pickle(run.checkpoint(which), marker)
    if which == "best":
        attempts = [("eval", "--run", str(run_copy)), ("export", "--run", str(run_copy), "--out",
                                                       str(tmp_path / "m.onnx"))]
    else:
        cfg = run.read_config()
        attempts = [("train", "--out", str(run_copy), "--pretrained", cfg["pretrained"], "--cache-dir",
                     cfg["cache_dir"], "--method", "labels", "--student", "resnet10t", "--epochs", "6",
                     "--batch-size", "32", "--lr", "3e-3", "--amp", "fp32", "--device", "cpu", "--no-progress")]
        run.result.unlink()
    for args in attempts:
        rc, err = _cli(capsys, *args)
        assert rc in (1, 2) and str(run.checkpoint(which)) in err and "not a readable clipdistill" in err, err
        assert "Traceback" not in err
    assert not marker.exists()


def test_a_run_folder_of_pickled_checkpoints_is_refused_with_what_to_do(run_copy, tmp_path, capsys):
    marker = tmp_path / "pwned"
    run = RunDir(run_copy)
    for which in ("best", "last"):
        run.checkpoint(which).unlink()
        _plant_pickle(run.checkpoints / f"{which}.pt", marker)
    rc, err = _cli(capsys, "eval", "--run", str(run_copy))
    assert rc == 2 and "clipdistill 0.1" in err and "Train it again" in err
    rc, err = _cli(capsys, "export", "--run", str(run_copy))
    assert rc == 2 and "pickles" in err
    assert not marker.exists()


def test_a_planted_pickle_as_the_cached_probe_never_runs_and_is_retrained(tmp_path, data_root, random_teacher_file,
                                                                          caplog):
    from clipdistill.teacher.evaluate import TeacherEvalConfig, teacher_eval

    cache = tmp_path / "cache"
    cfg = TeacherEvalConfig(pretrained=str(random_teacher_file), cache_dir=str(cache), data_root=str(data_root),
                            max_images=300, probe_epochs=2, progress=False, out=str(tmp_path / "te"))
    first = teacher_eval(cfg)
    probes = list((cache / "probes").rglob("probe-*.safetensors"))
    assert probes
    marker = tmp_path / "pwned"
    for p in probes:
        _plant_pickle(p, marker)
        _plant_pickle(p.with_suffix(".pt"), marker)  # the 0.1 name is never read at all
    with caplog.at_level("WARNING", logger="clipdistill"):
        again = teacher_eval(cfg)
    assert not marker.exists() and len(probes) == 1
    assert again["linear_probe_accuracy"] == first["linear_probe_accuracy"]
    assert any("not usable" in r.getMessage() and "training it again" in r.getMessage() for r in caplog.records)
    read_state(probes[0])  # rewritten in the safe format


def test_a_pickle_as_teacher_weights_is_a_message(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    _plant_pickle(evil, marker)
    rc, err = _cli(capsys, "embed", "--pretrained", str(evil), "--cache-dir", str(tmp_path / "c"), "--max-images",
                   "8", "--no-progress")
    assert rc == 2 and "--pretrained" in err and str(evil) in err and "Traceback" not in err
    assert not marker.exists()
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(3000))
    rc, err = _cli(capsys, "embed", "--pretrained", str(garbage), "--cache-dir", str(tmp_path / "c"), "--no-progress")
    assert rc == 2 and "--pretrained" in err and "Traceback" not in err


def test_random_bytes_as_a_checkpoint_are_named(run_copy, capsys):
    RunDir(run_copy).best.write_bytes(os.urandom(5000))
    rc, err = _cli(capsys, "eval", "--run", str(run_copy))
    assert rc == 1 and "best.safetensors" in err and "Move it away" in err


# ----------------------------------------------------------------------------- damaged caches

def _embed_test_split(cache_dir: Path, teacher: Path, **kw):
    from clipdistill.teacher.embed import EmbedConfig, embed

    return embed(EmbedConfig(pretrained=str(teacher), cache_dir=str(cache_dir), split="test", max_images=200,
                             progress=False, workers=0, data_root=str(cache_dir.parent / "shared-data"), **kw))


@pytest.mark.parametrize("damage", ["truncated", "complete_but_not_done", "nan", "broken_header", "old_format"])
def test_a_damaged_cache_is_detected_and_rebuilt(tmp_path, random_teacher_file, caplog, damage):
    good = _embed_test_split(tmp_path / "cache", random_teacher_file)
    reference = np.array(good.embeddings)
    arr, mf = good.path / "embeddings.npy", good.path / "manifest.json"
    manifest = json.loads(mf.read_text())
    if damage == "truncated":
        with open(arr, "r+b") as f:
            f.truncate(arr.stat().st_size // 2)
    elif damage == "complete_but_not_done":
        mf.write_text(json.dumps({**manifest, "done": 50}))
    elif damage == "nan":
        a = np.load(arr, mmap_mode="r+")
        a[17, 3] = np.nan
        a.flush()
        del a
    elif damage == "broken_header":
        data = bytearray(arr.read_bytes())
        data[10:40] = b"#" * 30
        arr.write_bytes(bytes(data))
    else:
        mf.write_text(json.dumps({**manifest, "format": 1}))
    from clipdistill.teacher.cache import CacheDamagedError, EmbeddingCache

    with pytest.raises(CacheDamagedError):  # a reader refuses it ...
        EmbeddingCache.load(good.path)
    with caplog.at_level("WARNING", logger="clipdistill"):
        rebuilt = _embed_test_split(tmp_path / "cache", random_teacher_file)  # ... a writer rebuilds it
    assert any("damaged" in r.getMessage() for r in caplog.records)
    assert rebuilt.complete and rebuilt.done == 200
    np.testing.assert_array_equal(np.array(rebuilt.embeddings), reference)


def test_non_finite_teacher_output_stops_with_the_precision(tmp_path, random_teacher_file, monkeypatch):
    from clipdistill.core.errors import ClipDistillError
    from clipdistill.teacher.openclip_teacher import Teacher

    real = Teacher.encode_images
    monkeypatch.setattr(Teacher, "encode_images", lambda self, x: real(self, x) * float("nan"))
    with pytest.raises(ClipDistillError, match="non-finite embeddings.*--precision fp32"):
        _embed_test_split(tmp_path / "cache", random_teacher_file)


def test_a_complete_cache_on_a_read_only_disk_serves(tmp_path, random_teacher_file, capsys):
    """Reading a complete cache writes nothing (no lock file): on a read-only disk it serves."""
    done = _embed_test_split(tmp_path / "cache", random_teacher_file)
    (done.path / ".lock").unlink()
    why = _read_only(tmp_path / "cache")
    if why:
        pytest.skip(why)
    try:
        rc, err = _cli(capsys, "embed", "--pretrained", str(random_teacher_file),
                       "--cache-dir", str(tmp_path / "cache"), "--split", "test", "--max-images", "200",
                       "--no-progress", "--workers", "0", "--data-root", str(tmp_path / "shared-data"))
        assert rc == 0 and "already complete" in err, err
        assert not (done.path / ".lock").exists()
    finally:
        subprocess.run(["umount", str(tmp_path / "cache")], capture_output=True)


def _read_only(path: Path) -> str:
    """Bind-mount `path` read-only onto itself; '' when done, else why it cannot be (then
    the test is skipped: permissions alone do not bind root, who runs CI)."""
    if shutil.which("mount") is None:
        return "no mount command"
    for cmd in (["mount", "--bind", str(path), str(path)], ["mount", "-o", "remount,bind,ro", str(path)]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            subprocess.run(["umount", str(path)], capture_output=True)
            return f"cannot mount read-only here ({proc.stderr.strip()[:100]})"
    try:
        (path / ".probe").touch()
    except OSError:
        return ""
    subprocess.run(["umount", str(path)], capture_output=True)
    return "the read-only mount accepted a write"


def test_a_truncated_generated_dataset_is_generated_again(tmp_path, caplog):
    from clipdistill.data.shapes10 import Shapes10

    first = Shapes10(tmp_path, split="test", n=40)
    data = first.path.read_bytes()
    first.path.write_bytes(data[: len(data) // 3])
    with caplog.at_level("WARNING", logger="clipdistill"):
        again = Shapes10(tmp_path, split="test", n=40)
    assert any("damaged" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(again.data, first.data)


# ----------------------------------------------------------------------------- one writer per run

def test_a_second_writer_on_a_run_folder_is_refused(run_copy, capsys):
    run = RunDir(run_copy)
    cfg = run.read_config()
    run.result.unlink()
    args = ("train", "--out", str(run_copy), "--pretrained", cfg["pretrained"], "--cache-dir", cfg["cache_dir"],
            "--method", "labels", "--student", "resnet10t", "--epochs", "5", "--batch-size", "32", "--lr", "3e-3",
            "--amp", "fp32", "--device", "cpu", "--no-progress")
    with run.lock():  # a first writer, as another process would hold it (flock is per open file)
        rc, err = _cli(capsys, *args)
        assert rc == 1 and "another process is writing the run folder" in err and f"(pid {os.getpid()})" in err
        rc, err = _cli(capsys, "eval", "--run", str(run_copy))
        assert rc == 1 and "another process is writing" in err
        with pytest.raises(LockedError):
            with run.lock():
                pass
    assert not run.result.exists()  # nothing was written by the refused ones


# ----------------------------------------------------------------------------- messages, not tracebacks

@pytest.mark.parametrize("flag,value,expect", [
    ("--probe-epochs", "0", ">= 1"), ("--probe-lr", "-1", "> 0"), ("--probe-batch-size", "0", ">= 1"),
    ("--seed", "-1", ">= 0"), ("--loss-weights", "-1", ">= 0"), ("--student-size", "1", "at least 16"),
])
def test_bad_train_values_exit_2_naming_the_flag(capsys, flag, value, expect):
    rc, err = _cli(capsys, "train", flag, value)
    assert rc == 2 and flag in err and expect in err, err


@pytest.mark.parametrize("flag,content,expect", [
    ("--prompts", b"\x00\x01\x02\xff\xfe binary", "binary"), ("--templates", b"\x89PNG\r\n\x1a\n\x00\x00", "binary"),
    ("--prompts", b"caf\xe9\n", "not UTF-8"), ("--templates", b"\n  \n", "empty"),
    ("--templates", b"a photo\n", "{}"),
])
def test_bad_text_files_exit_2_naming_the_flag(tmp_path, capsys, flag, content, expect):
    f = tmp_path / "file.txt"
    f.write_bytes(content)
    for verb in ("train", "teacher-eval", "embed"):
        rc, err = _cli(capsys, verb, flag, str(f))
        assert rc == 2 and flag in err and expect in err, (verb, err)


def test_high_bit_depth_and_float_images_are_scaled_not_clipped(tmp_path):
    from clipdistill.data.images import open_rgb

    g16 = np.full((8, 8), 32768, dtype=np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    f32 = np.full((8, 8), 0.5, dtype=np.float32)
    Image.fromarray(f32, mode="F").save(tmp_path / "f.tiff")
    for name in ("g16.png", "f.tiff"):
        px = np.asarray(open_rgb(tmp_path / name))
        assert px.shape == (8, 8, 3) and 120 <= px.mean() <= 135, (name, px.mean())


def test_a_non_utf8_file_name_is_embedded_and_named(tmp_path, random_teacher_file, capsys):
    root = tmp_path / "imgs"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in (b"ok.png", b"caf\xe9.png", b"bad\xff.jpg"):
        path = os.path.join(os.fsencode(root), name)
        if name.endswith(b".jpg"):
            with open(path, "wb") as f:
                f.write(b"not a jpeg")
        else:
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(os.fsdecode(path), format="PNG")
    rc, err = _cli(capsys, "embed", "--dataset", "folder", "--data-root", str(root), "--split", "train",
                   "--pretrained", str(random_teacher_file), "--cache-dir", str(tmp_path / "c"), "--no-progress",
                   "--workers", "0")
    assert rc == 0, err
    assert "bad\\xff.jpg" in err  # the unreadable one is named, its odd byte shown
    manifest = json.loads(next((tmp_path / "c").rglob("manifest.json")).read_text())
    assert manifest["count"] == 3 and manifest["skipped"] == 1


def test_predict_skips_and_names_an_oversized_image(exported, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("1", (15000, 15000)).save(folder / "huge.png")  # 225 Mpx: over Pillow's bomb limit
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / "small.png")
    rc = main(["predict", "--model", str(exported["fp32"]), str(folder), "--json", "--threads", "1"])
    out = capsys.readouterr()
    assert rc == 0
    res = json.loads(out.out)
    assert [Path(r["path"]).name for r in res["results"]] == ["small.png"]
    assert [Path(s["path"]).name for s in res["skipped"]] == ["huge.png"]
    assert "too large" in res["skipped"][0]["error"] and "huge.png" in out.err


def _mount_tmpfs(path: Path, size: str) -> str:
    """Mount a small tmpfs at `path`; '' when done, else why it cannot be."""
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        return "no mount command"
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                          text=True)
    return "" if proc.returncode == 0 else f"cannot mount a tmpfs here ({proc.stderr.strip()[:100]})"


def test_disk_full_while_embedding_and_checkpointing_is_a_message(tmp_path, trained_run, random_teacher_file,
                                                                  capsys):
    small = tmp_path / "small"
    why = _mount_tmpfs(small, "96k")
    if why:
        pytest.skip(why)
    try:
        rc, err = _cli(capsys, "embed", "--pretrained", str(random_teacher_file), "--cache-dir", str(small),
                       "--data-root", str(tmp_path / "data"), "--split", "test", "--no-progress", "--workers", "0")
        assert rc == 1 and "no space left" in err and str(small) in err and "Traceback" not in err, err
        cfg = RunDir(trained_run).read_config()
        shutil.rmtree(small / "embeddings", ignore_errors=True)
        rc, err = _cli(capsys, "train", "--out", str(small / "run"), "--pretrained", cfg["pretrained"], "--cache-dir",
                       cfg["cache_dir"], "--method", "labels", "--student", "resnet10t", "--epochs", "1",
                       "--batch-size", "32", "--max-images", "200", "--amp", "fp32", "--device", "cpu",
                       "--no-progress")
        assert rc == 1 and "no space left" in err and "Traceback" not in err, err
    finally:
        subprocess.run(["umount", str(small)], capture_output=True)


# ----------------------------------------------------------------------------- leftovers and logs

def test_leftovers_of_killed_writers_are_removed_and_live_ones_kept(run_copy, tmp_path):
    """Ours by name (`clipdistill-PID`), dead by their lock: a temporary whose flock no process
    holds is a leftover, whatever its pid says (tests/test_deploy_trust.py kills real writers)."""
    import fcntl

    from clipdistill.core.atomic import remove_stale_temporaries

    ck = RunDir(run_copy).checkpoints
    stale = [ck / ".best.safetensors.clipdistill-12345.abc_1234.tmp",
             run_copy / ".export.clipdistill-12345.x1y2z3ab.tmp"]
    stale[0].write_bytes(b"half a checkpoint")
    stale[1].mkdir()
    live = ck / f".last.safetensors.clipdistill-{2**22 + 12345}.def45678.tmp"  # a pid that means nothing here
    live.write_bytes(b"being written")
    theirs = ck / ".notes.2024.12.tmp"  # not ours, whatever it looks like
    theirs.write_text("a user's file")
    with open(live, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # what a live writer holds, in whatever pid namespace
        removed = set(remove_stale_temporaries(ck)) | set(remove_stale_temporaries(run_copy))
    assert removed == set(stale) and live.exists() and theirs.exists()


def test_the_student_loads_with_timm_alone(trained_run):
    import timm

    run = RunDir(trained_run)
    record = checkpoint.read_student(run.best)
    config = json.loads((run.student / "config.json").read_text())
    assert config["architecture"] == "resnet10t" and config["num_classes"] == 10
    assert config["label_names"] == list(record.classes)
    x = torch.randn(3, 3, 32, 32)
    ref = timm.create_model("resnet10t", num_classes=10)
    ref.load_state_dict(record.weights)
    a = timm.create_model("resnet10t", pretrained=True, num_classes=10,
                          pretrained_cfg_overlay=dict(file=str(run.student / "model.safetensors"), num_classes=10))
    b = timm.create_model(f"local-dir:{run.student}", pretrained=True)
    with torch.no_grad():
        want = ref.eval()(x)
        torch.testing.assert_close(a.eval()(x), want, rtol=0, atol=0)
        torch.testing.assert_close(b.eval()(x), want, rtol=0, atol=0)
    assert tuple(b.pretrained_cfg["input_size"]) == (3, 32, 32) and tuple(b.pretrained_cfg["mean"]) == (0.5,) * 3
