"""The distilled student in the form people take elsewhere: timm's own folder format.

    RUN/student/model.safetensors   the weights (timm state dict)
    RUN/student/config.json         architecture, num_classes, class names, input size, mean/std
    RUN/student/head.safetensors    embedding students only: the teacher head (text or linear)

Either of these loads it, with timm alone:

    timm.create_model("local-dir:RUN/student", pretrained=True)
    timm.create_model(ARCH, pretrained=True, num_classes=N,
                      pretrained_cfg_overlay=dict(file="RUN/student/model.safetensors", num_classes=N))

(`num_classes` goes in the overlay too: without it timm takes the architecture's ImageNet
config, sees 1000 classes there and drops the trained classifier as a mismatch.)

A student trained on the teacher's embedding (`mse`, `cosine`) outputs that embedding; its
head (logits = head(embedding)) is kept beside it and described in config.json, as the
ONNX export folds it in."""

from __future__ import annotations

import os
from pathlib import Path

from ..core import atomic
from .checkpoint import load_model
from .record import StudentRecord
from .rundir import RunDir
from .students import create_student


def write_timm_student(run: RunDir, state: StudentRecord | dict) -> Path:
    """Write RUN/student/ from the best checkpoint (its record, or the dict `checkpoint.load`
    read); CheckpointMismatchError naming RUN's best checkpoint when its weights do not fit the
    student its config describes."""
    from safetensors.torch import save_file
    from timm.models import save_for_hf

    record = StudentRecord.from_state(state, run.best)
    # A fresh copy: the trained one may be channels-last (safetensors wants contiguous tensors)
    model = create_student(record.arch, record.out_dim)
    load_model(model, record, run.best)
    spec = record.input
    info = {"method": record.method, "output": record.output, "teacher": record.teacher, "dataset": record.dataset,
            "classes": list(record.classes), "prompts": list(record.prompts), "trained_size": spec.size,
            "resize": "stretch to size x size (bilinear), pixels / 255, (x - mean) / std"}
    model_config = {"clipdistill": info}
    if record.output == "logits":
        model_config["label_names"] = list(record.classes)
    else:
        info["head"] = record.head_spec()
        info["head_file"] = "head.safetensors"
    run.path.mkdir(parents=True, exist_ok=True)
    with atomic.temporary_folder(run.path, "student") as tmp:
        new = tmp / "new"
        save_for_hf(model, str(new), model_config=model_config, safe_serialization=True,
                    data_config={"input_size": (3, spec.size, spec.size), "mean": (spec.mean,) * 3,
                                 "std": (spec.std,) * 3, "interpolation": "bilinear", "crop_pct": 1.0,
                                 "crop_mode": "squash"})
        if record.output != "logits":
            save_file({k: v.contiguous() for k, v in record.head.state_dict.items()}, str(new / "head.safetensors"))
        # the old folder moves into the scratch folder, which is removed with it
        _readable(new)
        if run.student.exists():
            os.replace(run.student, tmp / "old")
        os.replace(new, run.student)
    return run.student


def _readable(folder: Path) -> None:
    """Files 0644 and folders 0755 (less the umask), as every other file of a run: safetensors
    writes 0600, and a folder served from a container or by another user must be readable."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for p in folder.rglob("*"):
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)
