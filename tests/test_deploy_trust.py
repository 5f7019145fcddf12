"""Deployment a user can trust (issue 23, "trust, second round"): each test reproduces one finding
on real files — a re-prompted export that never rejects, degenerate prompts, a video shorter
than its header, tampered model metadata, a huge file that is not ONNX, a cleanup that deleted
what it did not write, and a bench that lost its table to a folder."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from clipdistill.cli import main
from clipdistill.core.errors import ConfigError


def _prompts(tmp_path: Path, name: str, lines: list[str]) -> Path:
    p = tmp_path / name
    p.write_text("".join(f"{ln}\n" for ln in lines))
    return p


# ----------------------------------------------------------------------------- 1. re-prompting and rejecting

def test_a_reprompted_threshold_is_calibrated_on_the_runs_images_and_separates(embedding_run, cache_dir, tmp_path):
    """Three of shapes10's ten classes as new prompts, calibrated on the run's cached teacher
    embeddings and its test images. The model here is the teacher's own image encoder under the new
    head (a student that learnt the teacher perfectly): on images it never saw, the other seven
    shapes are mostly answered 'none of these' and the three mostly are not."""
    import torch

    from clipdistill.data.shapes10 import CLASSES, generate
    from clipdistill.deploy.deployable import Deployable, ImageEncoder
    from clipdistill.deploy.inputs import clip_input, prepare
    from clipdistill.deploy.reject import softmax
    from clipdistill.deploy.reprompt import WEAK_AGREEMENT, calibrate_reprompted, reprompt
    from clipdistill.distill import checkpoint

    new = ["ring", "cross", "heart"]
    record = checkpoint.read_student(embedding_run / "checkpoints" / "best.safetensors")
    head = reprompt(record, str(_prompts(tmp_path, "new.txt", [f"a {c}" for c in new])), str(cache_dir))
    model = Deployable(ImageEncoder(head.teacher.model.float().eval()), head.head).eval()
    info = {"trained_size": 32, "input": clip_input(head.teacher.preprocess, 32)}
    cal = calibrate_reprompted(model, info, record.config, head)
    assert 0 < cal["reject_threshold"] < 1 and cal["balanced_agreement"] >= WEAK_AGREEMENT and "why" not in cal
    assert cal["prompts"] == [f"a {c}" for c in new] and "test split" in cal["calibrated_on"]

    images, labels = generate("test", 300, 32, 3003)  # not the images it was calibrated on
    with torch.no_grad():
        logits = model(torch.from_numpy(prepare(images, info["input"]))).numpy()
    rejected = softmax(logits.astype(np.float64)).max(1) < cal["reject_threshold"]
    inside = np.isin(labels, [CLASSES.index(c) for c in new])
    share_in, share_out = rejected[inside].mean() * 100, rejected[~inside].mean() * 100
    assert share_out > 60 and share_in < 30, (share_in, share_out)  # measured: 13% and 77%; before: 0% and 0%


def test_a_reprompted_export_records_its_calibration_and_ships_only_a_useful_threshold(embedding_run, cache_dir,
                                                                                        tmp_path, caplog):
    """The real student of the run, exported with new prompts: the calibration for them is in the
    sidecar and the ONNX metadata, and `--reject auto` takes what it says. The quick-recipe student
    follows the teacher loosely (its top probability reproduces the teacher's call at about 55%
    balanced agreement): such a threshold would reject good images as often as others, so the
    model is said to never reject, with the threshold found for whoever wants it anyway."""
    from clipdistill.deploy.export import ExportConfig, export
    from clipdistill.deploy.predict import PredictConfig, open_model
    from clipdistill.deploy.reprompt import WEAK_AGREEMENT
    from clipdistill.deploy.writer import sidecar_path

    new = [f"a {c}" for c in ("ring", "cross", "heart")]
    out = tmp_path / "m.onnx"
    with caplog.at_level("WARNING"):
        res = export(ExportConfig(run=str(embedding_run), prompts=str(_prompts(tmp_path, "new.txt", new)), out=str(out),
                                  cache_dir=str(cache_dir), threads=1))
    cal = res["info"]["reject_calibration"]
    assert cal["prompts"] == new and "test split" in cal["calibrated_on"] and 0 <= cal["balanced_agreement"] <= 100
    assert json.loads(sidecar_path(out).read_text())["reject_calibration"] == cal
    _, meta = open_model(str(out), threads=1)
    threshold = PredictConfig(model=str(out)).reject_threshold(meta)  # what --reject auto uses
    assert threshold == res["info"]["reject_threshold"] == meta["reject_threshold"]
    said = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    if cal["balanced_agreement"] >= WEAK_AGREEMENT:
        assert 0 < threshold < 1 and "why" not in cal and str(out) not in said
    else:
        assert threshold == 0 and "balanced agreement" in cal["why"] and str(out) in said and "never" in said
        assert 0 < cal["weak_threshold"] < 1 and f"--reject {cal['weak_threshold']:.4f}" in cal["how"]


def test_a_reprompted_export_without_the_runs_embeddings_says_it_never_rejects(embedding_run, tmp_path, caplog):
    """Another --cache-dir holds none of the run's teacher embeddings: nothing to calibrate on, so
    the export says so (log and sidecar) and how to get a threshold."""
    from clipdistill.deploy.export import ExportConfig, export
    from clipdistill.deploy.writer import sidecar_path

    prompts = _prompts(tmp_path, "new.txt", ["a ring", "a cross"])
    out = tmp_path / "m.onnx"
    with caplog.at_level("WARNING"):
        res = export(ExportConfig(run=str(embedding_run), prompts=str(prompts), out=str(out),
                                  cache_dir=str(tmp_path / "empty-cache"), threads=1))
    side = json.loads(sidecar_path(out).read_text())
    assert side["reject_threshold"] == 0.0 == res["info"]["reject_threshold"]
    assert "never" in side["reject_calibration"]["why"] and "--cache-dir" in side["reject_calibration"]["how"]
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("never" in m and "none of these" in m and str(out) in m for m in said), said


# ----------------------------------------------------------------------------- 2. degenerate prompts

def test_export_prompts_refuses_copies_and_warns_on_a_single_prompt(trained_run, tmp_path, capsys, caplog):
    from clipdistill.deploy.export import ExportConfig

    one = _prompts(tmp_path, "one.txt", ["a ring"])
    with caplog.at_level("WARNING"):
        ExportConfig(run=str(trained_run), prompts=str(one))
    assert any("one prompt" in r.getMessage() and str(one) in r.getMessage() for r in caplog.records)
    for lines, words in ((["a ring", "a cross", "a ring"], "lines 1 and 3"),
                         (["A ring.", "a cross", "a RING!"], "but for case or punctuation")):
        bad = _prompts(tmp_path, "bad.txt", lines)
        with pytest.raises(ConfigError, match=f"--prompts {re.escape(str(bad))}: .*{words}"):
            ExportConfig(run=str(trained_run), prompts=str(bad))
        with pytest.raises(SystemExit) as e:  # the command line: usage error, exit 2, before any model loads
            main(["export", "--run", str(trained_run), "--prompts", str(bad)])
        assert e.value.code == 2 and words in capsys.readouterr().err


# ----------------------------------------------------------------------------- 3. a video shorter than its header

def _truncated_avi(path: Path, frames: int, keep: int) -> None:
    """A real MJPG AVI of `frames` frames, cut right before frame `keep` (its index lost with
    the tail): the header still says `frames`."""
    import cv2

    rng = np.random.default_rng(0)
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (32, 32))
    for _ in range(frames):
        w.write(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    w.release()
    data = path.read_bytes()
    movi = data.index(b"movi")
    chunks = [m.start() for m in re.finditer(b"00dc", data[movi:data.index(b"idx1")])]
    assert len(chunks) == frames
    path.write_bytes(data[:movi + chunks[keep]])


def test_a_video_shorter_than_its_header_says_so(exported, tmp_path, capsys):
    import cv2

    video = tmp_path / "cut.avi"
    _truncated_avi(video, 60, 27)
    assert int(cv2.VideoCapture(str(video)).get(cv2.CAP_PROP_FRAME_COUNT)) == 60  # what OpenCV believes

    from clipdistill.deploy.predict import open_model
    from clipdistill.deploy.video import predict_video

    sess, meta = open_model(str(exported["fp32"]), threads=1)
    res = predict_video(sess, meta, str(video), 3, 0.0, batch_size=16)
    assert len(res["frames"]) == 27
    assert res["frames_in_header"] == 60 and res["frames_read"] == 27 and res["truncated"] is True

    capsys.readouterr()
    assert main(["predict", "--model", str(exported["fp32"]), str(video), "--json", "--threads", "1"]) == 0
    out, err = capsys.readouterr()
    lines = [json.loads(ln) for ln in out.splitlines()]
    assert [ln["frame"] for ln in lines[:-1]] == list(range(27))
    assert lines[-1] == {"source": str(video), "truncated": True, "frames_in_header": 60, "frames_read": 27}
    assert str(video) in err and "60" in err and "27" in err and "warning" in err

    # a whole video says nothing of the kind
    whole = tmp_path / "whole.avi"
    w = cv2.VideoWriter(str(whole), cv2.VideoWriter_fourcc(*"MJPG"), 10, (32, 32))
    for _ in range(12):
        w.write(np.zeros((32, 32, 3), dtype=np.uint8))
    w.release()
    res = predict_video(sess, meta, str(whole), 3, 0.0)
    assert len(res["frames"]) == 12 and res["truncated"] is False
    assert main(["predict", "--model", str(exported["fp32"]), str(whole), "--json", "--threads", "1"]) == 0
    out, err = capsys.readouterr()
    assert [json.loads(ln)["frame"] for ln in out.splitlines()] == list(range(12)) and "header" not in err


# ----------------------------------------------------------------------------- 4. tampered metadata

def _tampered(src: Path, dst: Path, change) -> Path:
    import onnx

    from clipdistill.deploy.model_file import METADATA_KEY

    model = onnx.load(str(src))
    props = {p.key: p.value for p in model.metadata_props}
    meta = json.loads(props[METADATA_KEY])
    change(meta)
    for p in model.metadata_props:
        if p.key == METADATA_KEY:
            p.value = json.dumps(meta)
    onnx.save(model, str(dst))
    return dst


@pytest.mark.parametrize("field,change", [
    ("reject_threshold", lambda m: m.update(reject_threshold=float("nan"))),
    ("reject_threshold", lambda m: m.update(reject_threshold=-1)),
    ("reject_threshold", lambda m: m.update(reject_threshold=1e9)),
    ("classes", lambda m: m.update(classes="airplane")),
    ("classes", lambda m: m.update(classes=m["classes"][:-1])),
    ("input.std", lambda m: m["input"].update(std=[0.25, 0.0, 0.25])),
])
def test_tampered_metadata_is_refused_naming_the_field(exported, tmp_path, field, change):
    from clipdistill.deploy.predict import open_model

    bad = _tampered(exported["fp32"], tmp_path / "tampered.onnx", change)
    with pytest.raises(ConfigError) as e:
        open_model(str(bad), threads=1)
    msg = str(e.value)
    assert str(bad) in msg and f"`{field}`" in msg and "valid" in msg and "\n" not in msg, msg


def test_intact_metadata_is_accepted(exported):
    from clipdistill.deploy.predict import open_model

    _, meta = open_model(str(exported["fp32"]), threads=1)
    assert len(meta["classes"]) == 10


# ----------------------------------------------------------------------------- 5. a huge file that is not ONNX

def _varint(n: int) -> bytes:
    out = b""
    while True:
        b, n = n & 0x7F, n >> 7
        if not n:
            return out + bytes([b])
        out += bytes([b | 0x80])


def test_a_huge_file_that_is_not_onnx_is_refused_without_being_read(tmp_path):
    """Sparse files (no disk used): 3 GB of junk, and a file under protobuf's 2 GiB limit whose
    header is right but whose only field is a 2 GB string (ONNX Runtime reads it all, then fails)."""
    from clipdistill.deploy.bench import _peak_rss_kb, _reset_peak, _status_kb, describe_model
    from clipdistill.deploy.runtime import session

    junk = tmp_path / "junk.onnx"
    with open(junk, "wb") as f:
        f.write(b"\x08\x07not a model")
        f.truncate(3 << 30)
    string = tmp_path / "string.onnx"
    n = (2 << 30) - 1024
    with open(string, "wb") as f:
        f.write(b"\x08\x08\x12" + _varint(n))
        f.truncate(4 + len(_varint(n)) + n)
    for path in (junk, string):
        for load in (session, describe_model):
            base = _status_kb("VmRSS")
            assert _reset_peak()
            t0 = time.perf_counter()
            with pytest.raises(ConfigError) as e:
                load(str(path))
            seconds, grew_mb = time.perf_counter() - t0, (_peak_rss_kb() - base) / 1024
            msg = str(e.value)
            assert str(path) in msg and "ONNX" in msg and "\n" not in msg, msg
            assert seconds < 2 and grew_mb < 100, (path.name, load.__name__, seconds, grew_mb)


# ----------------------------------------------------------------------------- 6. leftovers

WRITER = """
import sys, time
from clipdistill.core import atomic
with atomic.replacing(sys.argv[1]) as f:
    f.write(b"half a model")
    f.flush()
    print("writing", flush=True)
    time.sleep(120)
"""


def _writer(target: Path, namespace: bool = False) -> tuple[subprocess.Popen, Path]:
    """A real writer, stopped mid-write; (its process, its temporary file)."""
    before = set(target.parent.iterdir())
    cmd = [sys.executable, "-c", WRITER, str(target)]
    if namespace:  # its own pid namespace: the pid in its temporary's name means nothing here
        cmd = ["unshare", "--pid", "--fork", "--kill-child", *cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    (tmp,) = set(target.parent.iterdir()) - before
    return proc, tmp


def _pid_namespaces() -> bool:
    try:
        proc = subprocess.run(["unshare", "--pid", "--fork", "--kill-child", "true"], capture_output=True, timeout=10)
        return proc.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def test_cleanup_removes_only_our_dead_temporaries(tmp_path):
    from clipdistill.core.atomic import remove_stale_temporaries

    notes, drafts = tmp_path / ".notes.2024.12.tmp", tmp_path / ".export-2024-drafts"
    notes.write_text("the user's own")
    drafts.mkdir()
    (drafts / "a.txt").write_text("the user's own")
    assert remove_stale_temporaries(tmp_path) == [] and notes.exists() and (drafts / "a.txt").exists()

    target = tmp_path / "model.onnx"
    killed, left = _writer(target)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    live, writing = _writer(target, namespace=_pid_namespaces())
    try:
        assert remove_stale_temporaries(tmp_path) == [left]  # dead: removed; live (in any namespace): kept
        assert writing.read_bytes() == b"half a model" and notes.exists() and (drafts / "a.txt").exists()
    finally:
        live.kill()  # under unshare, its child (the writer) gets SIGKILL too (--kill-child), a moment later
        live.wait()
    deadline, removed = time.time() + 10, []
    while not removed and time.time() < deadline:
        removed = remove_stale_temporaries(tmp_path)
        time.sleep(0.05)
    assert removed == [writing]
    assert not target.exists() and sorted(p.name for p in tmp_path.iterdir()) == [drafts.name, notes.name]


# ----------------------------------------------------------------------------- 7. bench --out

def test_bench_out_naming_a_folder_writes_the_table_inside_it(exported, tmp_path):
    from clipdistill.deploy.bench import BenchConfig, bench

    folder = tmp_path / "results"
    folder.mkdir()
    cfg = BenchConfig(model=[str(exported["fp32"])], out=str(folder), warmup=0, iters=2, threads=1)
    assert Path(cfg.out) == folder / "bench.json"
    res = bench(cfg)
    assert json.loads((folder / "bench.json").read_text())[0]["fps"] == res["records"][0]["fps"] > 0
    # a path that cannot be written is refused before anything is measured
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ConfigError, match="--out"):
        BenchConfig(model=[str(exported["fp32"])], out=str(tmp_path / "a-file" / "bench.json"))
