"""Configs compose option groups (issue 24): `clipdistill train`'s flags come from groups, fit-prompts
is a preset over them, and whether a field changes a result is said once, where it is declared.

The groups must not change what a config is: the same flags give the same config.json as before
(tests/data/configs_before_groups.json, captured from the flat TrainConfig and FitConfig), so a run
or a fit made before still resumes and reuses its stages."""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from pathlib import Path

import pytest

from clipdistill.core.config import (
    Options,
    add_arguments,
    config_diff,
    from_namespace,
    preset,
    runtime_fields,
    runtime_names,
    to_dict,
)
from clipdistill.core.errors import ConfigError
from clipdistill.distill.config import StudentOptions, TrainConfig
from clipdistill.fit.config import FitConfig
from clipdistill.fit.pipeline import Stages, _stage_key

BEFORE = json.loads((Path(__file__).parent / "data" / "configs_before_groups.json").read_text())
# The one list there was before (core.config.RUNTIME_FIELDS), now read from the declarations.
RUNTIME_BEFORE = {"resume", "progress", "workers", "out", "device", "cache_dir", "embed_batch_size", "data_root"}
# Added since (issue 25), as a group of their own: runtime (a bundle never changes the model), so a fit
# made before still reuses its stages; the snapshots above predate them.
BUNDLE = {"bundle": "all", "bundle_batch": 8}


def _parse(cls, argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser, cls)
    return from_namespace(cls, parser.parse_args(argv))


def _fit_folder(root: Path) -> None:
    for d in ("pool", "pool2", "eval/test/cat"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("a photo of a cat\na photo of a dog\n")
    (root / "templates.txt").write_text("a photo of {}\na picture of {}\n")


def _in(root: Path, obj):
    return json.loads(json.dumps(obj).replace("{root}", str(root)))


@pytest.mark.parametrize("case", BEFORE["train"], ids=lambda c: f"{len(c['argv'])}-args")
def test_train_flags_give_the_config_json_written_before(case):
    now = to_dict(_parse(TrainConfig, case["argv"]))
    assert now == case["to_dict"]
    assert list(now) == list(case["to_dict"])  # the same key order in config.json, too
    assert config_diff(case["to_dict"], _parse(TrainConfig, case["argv"])) == []


@pytest.mark.parametrize("case", BEFORE["fit"], ids=lambda c: f"{len(c['argv'])}-args")
def test_fit_prompts_and_its_training_stage_are_as_before(case, tmp_path):
    _fit_folder(tmp_path)
    cfg = _parse(FitConfig, _in(tmp_path, case["argv"]))
    assert to_dict(cfg) == {**BUNDLE, **_in(tmp_path, case["to_dict"])}
    for call in case["train_config"]:
        size, rows, epochs = _in(tmp_path, call["args"])
        tcfg = to_dict(cfg.train_config(size, rows=rows, epochs=epochs))
        assert tcfg == _in(tmp_path, call["to_dict"])
        assert list(tcfg) == list(call["to_dict"])


def test_a_fit_stage_key_written_before_still_matches_and_a_changed_flag_does_not(tmp_path):
    case = BEFORE["fit"][1]
    _fit_folder(tmp_path)
    out = tmp_path / "fit-out"
    out.mkdir()
    done = {"assess": {"agreement": 90.0}}
    (out / "fit.json").write_text(json.dumps({"key": _in(tmp_path, case["stage_key"]), "done": done}))
    cfg = _parse(FitConfig, _in(tmp_path, case["argv"]))
    assert Stages(out, _stage_key(cfg), progress=False).done == done
    runtime_change = dataclasses.replace(cfg, device="auto", cache_dir="/elsewhere", workers=3, progress=True)
    assert Stages(out, _stage_key(runtime_change), progress=False).done == done
    assert Stages(out, _stage_key(dataclasses.replace(cfg, lr=0.5)), progress=False).done == {}
    assert Stages(out, _stage_key(dataclasses.replace(cfg, out=str(tmp_path / "moved"))), progress=False).done == {}


def test_runtime_fields_are_read_from_where_each_field_is_declared(tmp_path):
    assert runtime_fields(TrainConfig) == RUNTIME_BEFORE
    # fit-prompts' --out is its own field, and not runtime: its stages record paths under it.
    assert runtime_fields(FitConfig) == {"device", "cache_dir", "embed_batch_size", "workers", "progress", *BUNDLE}
    assert runtime_fields(TrainConfig) <= runtime_names()
    # Both comparisons read the marks: config_diff (runs, teacher evaluations, report rows) ...
    base = TrainConfig(cache_dir="/c")
    for k in RUNTIME_BEFORE:
        assert config_diff({**to_dict(base), k: "changed"}, base) == []
        assert config_diff({**to_dict(base), k: "changed"}, to_dict(base)) == []
    assert config_diff({**to_dict(base), "lr": 1.0}, base) == ["--lr: 1.0 in the run, 0.0003 now"]
    # ... and fit-prompts' stage key: every field that is not runtime, and what the named files hold.
    _fit_folder(tmp_path)
    cfg = FitConfig(prompts=str(tmp_path / "classes.txt"), pool=[str(tmp_path / "pool")])
    fields = {f.name for f in dataclasses.fields(FitConfig)}
    assert set(_stage_key(cfg)) == fields - runtime_fields(FitConfig) | {"prompt_lines", "template_lines"}


def test_every_train_flag_belongs_to_one_titled_group_in_flag_order():
    groups = [k for k in reversed(TrainConfig.__mro__) if issubclass(k, Options) and k.__dict__.get("title")]
    declared = [f.name for g in groups for f in dataclasses.fields(g)]
    assert declared == [f.name for f in dataclasses.fields(TrainConfig)]  # each field once, sections contiguous
    assert not TrainConfig.__dict__.get("__annotations__")  # TrainConfig itself declares nothing
    parser = argparse.ArgumentParser()
    add_arguments(parser, TrainConfig)
    titles = [g.title for g in parser._action_groups[2:]]
    assert titles == [g.title for g in groups]


def test_fit_prompts_options_are_trains_with_its_own_defaults():
    train = {f.name: f for f in dataclasses.fields(TrainConfig)}
    own = {"prompts", "pool", "eval", "out", "templates"}  # fit-prompts' own flags, with train's names
    shared = [f for f in dataclasses.fields(FitConfig) if f.name in train and f.name not in own]
    assert {f.name for f in shared} >= {"student", "student_size", "method", "epochs", "batch_size", "lr", "augment",
                                        "mixup", "teaching", "seed", "progress", "teacher", "workers"}
    fit_types, train_types = typing.get_type_hints(FitConfig), typing.get_type_hints(TrainConfig)
    for f in shared:
        t = train[f.name]
        assert (fit_types[f.name], f.metadata["choices"], f.metadata["runtime"]) == (
            train_types[f.name], t.metadata["choices"], t.metadata["runtime"]), f.name
    assert (FitConfig.__dataclass_fields__["lr"].default, TrainConfig.__dataclass_fields__["lr"].default) == (2e-3,
                                                                                                            3e-4)


def test_checks_travel_with_the_groups(tmp_path):
    for name, message in BEFORE["train_errors"].items():
        bad = {"epochs": 0, "batch_size": 1, "lr": 0, "weight_decay": -1, "temperature": 0, "logit_scale": "big",
               "mixup": -1, "views": 0, "warmup_epochs": -1, "val_fraction": 1.0, "student_size": 8,
               "student_std": 0, "probe_epochs": 0, "probe_lr": 0, "probe_batch_size": 0, "seed": -1, "data": [],
               "embed_batch_size": 0, "workers": -2, "max_images": -1, "image_size": 4, "method": "nope",
               "loss_weights": [1, 2, 3], "pool": ["x"], "data_test": None}[name]
        kw = {"data": ["test"]} if name == "data_test" else {name: bad}
        with pytest.raises(ConfigError) as e:
            TrainConfig(cache_dir="/c", **kw)
        assert str(e.value) == message
    _fit_folder(tmp_path)
    fit = {"cache_dir": "/c", "prompts": str(tmp_path / "classes.txt"), "pool": [str(tmp_path / "pool")]}
    for kw, message in (({"epochs": -1}, "--epochs: must be >= 0 (0 = from --steps)"),  # 0 means from --steps here
                        ({"epochs": 0}, None),
                        ({"student_size": 8}, "--student-size: must be 0 (auto) or >= 16"),
                        ({"batch_size": 1}, "--batch-size: must be >= 2"),  # train's rule, train's words
                        ({"mixup": -1}, "--mixup: must be >= 0"),
                        ({"steps": 0}, "--steps: must be >= 1"),
                        ({"workers": -2}, "--workers: must be -1 (auto) or >= 0")):
        if message is None:
            FitConfig(**fit, **kw)
            continue
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            FitConfig(**fit, **kw)


def test_a_preset_names_only_fields_of_its_group():
    with pytest.raises(TypeError, match="student_sise"):
        preset(StudentOptions, student_sise={"default": 8})
    with pytest.raises(TypeError, match="hlep"):
        preset(StudentOptions, student={"hlep": "typo"})


# ----------------------------------------------------------------------------- compress

# `clipdistill compress`'s fields as its flat CompressConfig declared them: (default, choices,
# metavar, help).
COMPRESS_BEFORE = {
    "run": ("", None, "DIR",
        "run folder written by `clipdistill train` (its best checkpoint is compressed)"),
    "mode": ("qat", ["qat", "ptq", "sparse24"], None,
        "qat: INT8 fake quantization then a fine-tune; ptq: the INT8 calibration alone; sparse24: 2:4 "
        "structured sparsity then a fine-tune"),
    "epochs": (4, None, None,
        "fine-tune epochs (qat, sparse24)"),
    "lr": (0.0, None, None,
        "fine-tune learning rate (Adam, cosine, no warm-up); 0 = a third of the run's own, the rate measured "
        "best in benchmarks/compress_students.md"),
    "calib_images": (512, None, None,
        "training images that calibrate the INT8 ranges"),
    "out": ("", None, "FILE",
        "ONNX file to write; default RUN/model.MODE.onnx"),
    "cache_dir": ("", None, "DIR",
        "override the run's cache folder"),
    "seed": (0, None, None,
        "fine-tune seed"),
    "max_images": (0, None, None,
        "quick trials: the first N images of each split (test included) instead of the run's"),
    "tolerance": (0.01, None, None,
        "parity: fail when max |onnxruntime - pytorch| > this x max(1, max |pytorch|) plus, for INT8, "
        "PyTorch's own spread when its layer outputs change by 1e-6 (an activation on a rounding boundary "
        "moves a whole step)"),
    "control": (False, None, None,
        "also fine-tune an uncompressed copy the same way (epochs, lr, seed) and report its accuracy: whether"
        " a change comes from the compression or from the extra epochs"),
    "progress": (True, None, None,
        "show progress bars"),
}


def _compress_run(root: Path) -> Path:
    """A run folder as compress reads it before any model: config.json and a best checkpoint."""
    run = root / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "best.safetensors").write_bytes(b"")
    cfg = TrainConfig(cache_dir=str(root / "cache"), out=str(run), lr=3e-3, warmup_epochs=2.0, amp="bf16",
                      schedule="constant", max_images=900, epochs=30)
    (run / "config.json").write_text(json.dumps(to_dict(cfg)))
    return run


def _fine_tune_before(cfg, fine_tune: Path) -> TrainConfig:
    """compress's fine-tune config as it was built before the preset (its `_trainer`)."""
    from clipdistill.deploy.compress import fine_tune_lr
    from clipdistill.distill.rundir import RunDir

    saved = RunDir(cfg.run).read_config()
    over = {"out": str(fine_tune), "epochs": cfg.epochs, "lr": fine_tune_lr(cfg, saved), "warmup_epochs": 0.0,
            "schedule": "cosine", "amp": "fp32", "channels_last": False, "resume": "auto", "progress": cfg.progress,
            "seed": cfg.seed}
    if cfg.cache_dir:
        over["cache_dir"] = cfg.cache_dir
    if cfg.max_images:
        over["max_images"] = cfg.max_images
    return TrainConfig(**{**saved, **over})


@pytest.mark.parametrize("argv", [[], ["--epochs", "2", "--lr", "1e-3", "--cache-dir", "/else", "--max-images", "100",
                                       "--seed", "3", "--no-progress", "--out", "m.onnx", "--mode", "sparse24"]])
def test_compress_is_a_preset_with_its_flags_and_fine_tune_as_before(argv, tmp_path):
    """compress over train's groups: the same flags, defaults and help, the same checks, and the
    fine-tune's TrainConfig is the one its flat config built."""
    from clipdistill.deploy.compress import CompressConfig, fine_tune_config

    fields = {f.name: f for f in dataclasses.fields(CompressConfig)}
    assert {k: (f.default, f.metadata["choices"], f.metadata["metavar"], f.metadata["help"])
            for k, f in fields.items() if k not in {*BUNDLE, "opset"}} == COMPRESS_BEFORE  # both added since
    run = _compress_run(tmp_path)
    cfg = _parse(CompressConfig, ["--run", str(run), *argv])
    folder = run / "compress-qat"
    assert to_dict(fine_tune_config(cfg, folder)) == to_dict(_fine_tune_before(cfg, folder))
    for kw, message in (({"epochs": 0}, "--epochs: must be >= 1"),
                        ({"lr": -1.0}, "--lr: must be > 0, or 0 for a third of the run's learning rate"),
                        ({"calib_images": 7}, "--calib-images: must be >= 8"),
                        ({"tolerance": 0.0}, "--tolerance: must be > 0"),
                        ({"max_images": -1}, "--max-images: must be >= 0 (0 = the run's)"),
                        ({"mode": "ptq", "control": True}, "--control: ptq does not fine-tune")):
        with pytest.raises(ConfigError) as e:
            CompressConfig(run=str(run), **kw)
        assert str(e.value).startswith(message), str(e.value)


def test_a_teacher_evaluation_compares_by_its_own_runtime_fields():
    """reproduce reuses a teacher-eval result by `config_diff` on the config itself: where it is
    written and how it reports are runtime, as every other verb's are."""
    from clipdistill.teacher.evaluate import TeacherEvalConfig

    assert {"out", "progress"} <= runtime_fields(TeacherEvalConfig)
    base = TeacherEvalConfig(cache_dir="/c")
    for k in ("out", "progress", "cache_dir", "device"):
        assert config_diff({**to_dict(base), k: "changed"}, base) == []
    assert config_diff({**to_dict(base), "probe_epochs": 3}, base) == ["--probe-epochs: 3 in the run, 15 now"]
