"""Trust, second round (issue 23): bounds checked before anything big is allocated, messages
that point to a fix that exists, contact sheets that never overwrite each other.

Each test reproduces one finding on real files and real models (the tiny teacher's own
architecture, a real run folder), in-process through `cli.main` where a user would meet it."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from clipdistill.cli import build_parser, main
from clipdistill.core.errors import ClipDistillError, ConfigError
from clipdistill.core.state import FORMAT, StateFileError, read_state, write_state
from clipdistill.distill import checkpoint
from clipdistill.distill.rundir import RunDir


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


# ----------------------------------------------------------------------------- image sizes

def test_image_size_is_bounded_before_any_image_is_rendered(capsys, tmp_path):
    from clipdistill.teacher.embed import EmbedConfig

    # The config refuses it: `embed` would otherwise render a 20000 px shapes10 split in memory.
    with pytest.raises(ConfigError, match=r"--image-size: 20000: must be 8\.\.512 pixels"):
        EmbedConfig(image_size=20000, cache_dir=str(tmp_path / "c"))
    assert EmbedConfig(image_size=512, cache_dir=str(tmp_path / "c")).image_size == 512  # the bound itself is fine
    rc, err = _cli(capsys, "embed", "--image-size", "20000", "--cache-dir", str(tmp_path / "c"), "--no-progress")
    assert rc == 2 and "--image-size" in err and "GB" in err and "Traceback" not in err, err
    assert not (tmp_path / "c").exists()  # nothing generated, nothing cached


def _huge_model_config(tmp_path: Path, size: int) -> str:
    """An open_clip model config of the tiny teacher's architecture that says `image_size`
    SIZE, registered with open_clip as a user's own config would be."""
    import open_clip

    from clipdistill.teacher.tiny import MODEL_CONFIG_DIR, TINY_NAME

    cfg = json.loads((MODEL_CONFIG_DIR / f"{TINY_NAME}.json").read_text())
    cfg["vision_cfg"]["image_size"] = size
    name = f"clipdistill-test-{size}px"
    folder = tmp_path / "model_configs"
    folder.mkdir()
    (folder / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder)
    return name


def test_a_teacher_whose_image_size_is_absurd_is_refused_before_it_is_built(tmp_path, random_teacher_file,
                                                                            capsys):
    from clipdistill.teacher.openclip_teacher import create_teacher
    from clipdistill.teacher.tiny import TinyTeacherConfig

    name = _huge_model_config(tmp_path, 12000)
    with pytest.raises(ConfigError, match=rf"--teacher {name}.*12000.*1024"):
        create_teacher(name, str(random_teacher_file), "cpu", "fp32", str(tmp_path / "c"))
    # Refused from the config alone: weights that cannot even be read are never opened.
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x07" * 3000)
    with pytest.raises(ConfigError, match="12000") as e:
        create_teacher(name, str(garbage), "cpu", "auto", str(tmp_path / "c"))
    assert "could not load" not in str(e.value)
    rc, err = _cli(capsys, "embed", "--teacher", name, "--pretrained", str(random_teacher_file), "--cache-dir",
                   str(tmp_path / "c"), "--max-images", "8", "--no-progress", "--workers", "0")
    assert rc == 2 and "12000" in err and "Traceback" not in err, err
    with pytest.raises(ConfigError, match="size"):
        TinyTeacherConfig(size=12000)


# ----------------------------------------------------------------------------- state headers

def _raw_safetensors(path: Path, header: str) -> Path:
    """A safetensors file with exactly this JSON header and one 8-byte tensor `x`."""
    h = header.encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"\0" * 8)
    return path


def test_state_headers_nested_too_deep_or_too_large_are_refused(tmp_path):
    from safetensors.torch import save

    deep = 200_000
    cases = {
        # our JSON tree, inside the metadata string: Python's json would raise RecursionError
        "tree_200k": save({"x": torch.zeros(2)}, metadata={"format": FORMAT, "clipdistill": "[" * deep + "]" * deep}),
        # deep enough for _decode's recursion, shallow enough for json.loads
        "tree_400": save({"x": torch.zeros(2)}, metadata={"format": FORMAT, "clipdistill": json.dumps(
            {"model": json.loads("[" * 400 + "]" * 400)})}),
        # a tree that is not a dict: every reader indexes it by name
        "tree_list": save({"x": torch.zeros(2)}, metadata={"format": FORMAT, "clipdistill": "[1, 2]"}),
        # 17 MB of metadata: json.loads of it would hold gigabytes of Python objects
        "oversized": save({"x": torch.zeros(2)}, metadata={"format": FORMAT, "clipdistill": json.dumps(
            {"pad": "x" * (17 << 20)})}),
    }
    for name, blob in cases.items():
        (tmp_path / f"{name}.safetensors").write_bytes(blob)
    # safetensors' own header nested deep (its parser has a recursion limit: still one message)
    _raw_safetensors(tmp_path / "header_200k.safetensors",
                     '{"__metadata__":{"format":"%s"},"x":{"dtype":"F32","shape":%s,"data_offsets":[0,8]}}'
                     % (FORMAT, "[" * deep + "2" + "]" * deep))
    for p in sorted(tmp_path.glob("*.safetensors")):
        with pytest.raises(StateFileError) as e:
            read_state(p)
        msg = str(e.value)
        assert str(p) in msg and "\n" not in msg, msg
        if p.stem.startswith("tree_2") or p.stem == "tree_400":
            assert "nested" in msg, msg
        if p.stem == "oversized":
            assert "17 MiB" in msg, msg
    # the real thing still reads, optimiser state (the deepest we write) included
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    write_state(tmp_path / "ok.st", {"model": model.state_dict(), "optimizer": opt.state_dict()})
    assert read_state(tmp_path / "ok.st")["optimizer"]["state"][0]["step"] == 1


def test_a_deeply_nested_checkpoint_is_a_message_in_eval(run_copy, capsys):
    from safetensors.torch import save

    best = RunDir(run_copy).best
    best.write_bytes(save({"x": torch.zeros(2)}, metadata={"format": FORMAT, "clipdistill": "[" * 200_000 +
                                                            "]" * 200_000}))
    rc, err = _cli(capsys, "eval", "--run", str(run_copy))
    errors = [ln for ln in err.splitlines() if "error" in ln]
    assert rc == 1 and len(errors) == 1 and str(best) in errors[0] and "nested" in errors[0], err
    assert "Traceback" not in err


# ----------------------------------------------------------------------------- checkpoints of other models

def test_a_checkpoint_of_another_shape_is_one_line_with_the_tensor_and_the_cause(run_copy):
    from clipdistill.distill.portable import write_timm_student
    from clipdistill.distill.students import create_student

    run = RunDir(run_copy)
    record = checkpoint.read_student(run.best)
    n, arch = record.num_classes, record.arch
    # a run whose classes changed since (another prompts file): 12 outputs where the file has 10
    more = create_student(arch, n + 2)
    with pytest.raises(checkpoint.CheckpointMismatchError) as e:
        checkpoint.load_model(more, record, run.best)
    msg = str(e.value)
    assert str(run.best) in msg and "fc.weight" in msg and f"{n}x512" in msg and f"{n + 2}x512" in msg, msg
    assert "classes" in msg and "\n" not in msg, msg
    # another --student: resnet18 where the file holds a resnet10t
    with pytest.raises(checkpoint.CheckpointMismatchError, match=rf"{arch}.*resnet18.*--student"):
        checkpoint.load_model(create_student("resnet18", n), record, run.best)
    # the same, met where the run's timm folder is written from a checkpoint
    with pytest.raises(ClipDistillError, match=r"best\.safetensors.*fc\.weight"):
        write_timm_student(run, dataclasses.replace(record, num_classes=n + 2))
    # and what fits still loads
    fits = create_student(arch, n)
    checkpoint.load_model(fits, checkpoint.read_student(run.best), run.best)
    assert torch.equal(fits.state_dict()["fc.weight"], record.weights["fc.weight"])


# ----------------------------------------------------------------------------- messages name real flags

def _flags_that_do_not_exist(verb: str, message: str) -> list[str]:
    """Every `--flag` in `message` that the verb the user ran does not have; a flag inside a
    quoted command (`clipdistill embed ... --overwrite`) is checked against that command."""
    def flags(v: str) -> set[str]:
        return {s for a in build_parser(v)._actions for s in a.option_strings}

    bad = []
    for span in re.split(r"(`[^`]*`)", message):
        quoted = re.match(r"`clipdistill ([a-z-]+)", span)
        own = flags(quoted.group(1) if quoted else verb)
        bad += [f for f in re.findall(r"--[a-z][a-z0-9-]*", span) if f not in own]
    return bad


def test_a_foreign_cache_names_a_fix_the_verb_has(tmp_path, data_root, random_teacher_file, capsys):
    from clipdistill.data.pixel_store import PixelStore
    from clipdistill.teacher.embed import EmbedConfig, embed

    common = ["--pretrained", str(random_teacher_file), "--cache-dir", str(tmp_path / "c"), "--data-root",
              str(data_root), "--max-images", "40", "--no-progress", "--workers", "0", "--precision", "fp32"]
    cache = embed(EmbedConfig(pretrained=str(random_teacher_file), cache_dir=str(tmp_path / "c"), split="train",
                              data_root=str(data_root), max_images=40, progress=False, workers=0, precision="fp32"))
    manifest = json.loads((cache.path / "manifest.json").read_text())
    manifest["teacher"]["weights"] = "file:0123456789abcdef"  # made by another teacher
    (cache.path / "manifest.json").write_text(json.dumps(manifest))
    rc, err = _cli(capsys, "teacher-eval", *common, "--out", str(tmp_path / "te"))
    assert rc == 1 and "another teacher" in err and str(cache.path) in err, err
    assert _flags_that_do_not_exist("teacher-eval", err) == [], err
    rc, err = _cli(capsys, "embed", *common, "--split", "train")
    assert rc == 1 and "--overwrite" in err and _flags_that_do_not_exist("embed", err) == [], err
    # the pixel store has no --overwrite anywhere
    owner = {"dataset": {"name": "a"}, "resize": "x"}
    PixelStore.open_for_writing(tmp_path / "px", owner, {"count": 2, "size": 8})
    with pytest.raises(ClipDistillError) as e:
        PixelStore.open_for_writing(tmp_path / "px", {**owner, "dataset": {"name": "b"}}, {"count": 2, "size": 8})
    assert _flags_that_do_not_exist("train", str(e.value)) == [] and "delete" in str(e.value), str(e.value)


# ----------------------------------------------------------------------------- contact sheets

def test_contact_sheet_names_are_unique_per_class_and_stable(tmp_path):
    from clipdistill.data.protocol import InMemoryDataset
    from clipdistill.teacher.curate import curate, write_sheets

    classes = ["none", "a cat", "a_cat", "x" * 70 + "1", "x" * 70 + "2", "Dog", "dog", "猫", "犬", "🐱 cat",
               "🐶 cat", "dog"[::-1], "Cat-top", "cat"]
    n = len(classes)

    class Pool(InMemoryDataset):
        name, split = "pool", "unlabeled"

        def __init__(self):
            self.classes, self.prompts = classes, classes
            self.data = np.random.default_rng(0).integers(0, 255, (3 * n, 8, 8, 3), dtype=np.uint8)
            self.targets = np.full(3 * n, -1)

        def fingerprint(self):
            return {"name": "pool"}

        def slug(self):
            return "pool"

    probs = np.full((3 * n, n), 0.1 / n)
    probs[np.arange(3 * n), np.arange(3 * n) % n] += 0.9  # every class gets images
    probs[-3:] = 1.0 / n  # and a few match no prompt
    cur = curate(probs, np.arange(3 * n), classes, threshold=0.5)
    paths = write_sheets(cur, Pool(), tmp_path / "sheets", n=2)
    names = [p.name for p in paths]
    assert len(paths) == 2 * n + 1
    assert len({s.casefold() for s in names}) == len(names), names  # also on a case-insensitive disk
    assert sorted(p.name for p in (tmp_path / "sheets").iterdir()) == sorted(names)
    assert names[-1] == "none-top.png" and names.count("none-top.png") == 1
    assert {"cat-top.png", "cat-edge.png", "Dog-top.png", "god-top.png"} <= set(names)  # plain names stay plain
    assert names == [p.name for p in write_sheets(cur, Pool(), tmp_path / "again", n=2)]  # and stable
