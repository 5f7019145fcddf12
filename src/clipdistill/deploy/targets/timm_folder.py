"""timm / Hugging Face: the run's `student/` folder, described as what it is.

`clipdistill train` writes RUN/student/ with timm's `save_for_hf` (distill/portable.py), whose
`pretrained_cfg` inherits the architecture's ImageNet entry: its tag (`c3_in1k`), licence, hub id
and URLs, which do not describe these weights. The bundle's copy `timm/` has its config.json fixed
(those fields dropped, our input record as timm's data config: crop_mode 'squash' with crop_pct
1.0 is our stretch, our mean/std/interpolation; label_names for a classifier) and a model card
(README.md with `library_name: timm`). An embedding student (mse/cosine) outputs the teacher's
embedding; its classes come from `head.safetensors`, which timm never applies: the card shows the
code that does, and the check runs that very code against the ONNX file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import numpy as np

from ...core import atomic
from ..inputs import prepare
from . import TARGETS, BundleContext, BundleModel, Entry, Target
from ._common import network_images, run_onnx

NAME = "timm"
RUNTIME = "timm / Hugging Face (timm.create_model('local-dir:...'))"
# pretrained_cfg fields that describe timm's ImageNet weights of the architecture, not ours
INHERITED = ("tag", "license", "hf_hub_id", "hf_hub_filename", "url", "origin_url", "paper_ids", "paper_name",
             "notes", "description", "source", "file", "custom_load", "test_input_size", "test_crop_pct",
             "test_pool_size", "label_offset")
OURS = ("license", "description")  # of INHERITED, the ones the bundle sets itself
TOLERANCE = 1e-3  # timm in PyTorch against the ONNX file, on logits

_HEAD_CODE = {
    "linear": "    return emb @ head['weight'].T + head['bias']\n",
    "text": ("    text = torch.nn.functional.normalize(head['text'].float(), dim=-1)\n"
             "    return {scale!r} * torch.nn.functional.normalize(emb, dim=-1) @ text.T\n"),
}


def student_folder(m: BundleModel) -> Optional[Path]:
    """RUN/student/ of the run the file was exported from, when it is there."""
    src = m.info.get("source") or {}
    if src.get("kind") != "run" or not src.get("run") or (src.get("prompts")):
        return None  # a re-prompted file has other classes than the run's folder
    folder = Path(src["run"]) / "student"
    return folder if (folder / "config.json").is_file() else None


def usage_code(folder: str, head: Optional[dict]) -> str:
    """The Python a user runs to get class scores from the folder (timm alone, plus the head)."""
    code = ["import timm", "import torch", "",
            f'model = timm.create_model("local-dir:{folder}", pretrained=True).eval()',
            "cfg = timm.data.resolve_data_config({}, model=model)  # our stretch, mean/std, interpolation",
            "transform = timm.data.create_transform(**cfg)"]
    if head is None:
        code += ["", "def logits(x):  # x: transform(pil_image).unsqueeze(0)", "    return model(x)"]
        return "\n".join(code) + "\n"
    code[1:1] = ["from safetensors.torch import load_file"]
    code += [f'head = load_file("{folder}/head.safetensors")  # the teacher head timm does not apply', "",
             "def logits(x):  # x: transform(pil_image).unsqueeze(0)", "    emb = model(x)  # the teacher's embedding"]
    return "\n".join(code) + "\n" + _HEAD_CODE[head["kind"]].format(scale=float(head.get("logit_scale", 100.0)))


def fixed_config(cfg: dict, m: BundleModel) -> dict:
    rec = m.info["input"]
    pc = {k: v for k, v in (cfg.get("pretrained_cfg") or {}).items() if k not in INHERITED}
    pc.update({"input_size": [3, int(rec["size"]), int(rec["size"])], "fixed_input_size": False,
               "interpolation": rec["interpolation"], "mean": list(rec["mean"]), "std": list(rec["std"]),
               "crop_pct": 1.0, "crop_mode": "squash", "num_classes": cfg.get("num_classes"),
               "license": "other", "description": _description(m)})
    out = {**cfg, "pretrained_cfg": pc}
    if m.info.get("student_output") == "logits":
        out["label_names"] = list(m.info["classes"])
        pc["label_names"] = list(m.info["classes"])
    else:
        pc.pop("label_names", None)
        out.pop("label_names", None)
    return out


def _description(m: BundleModel) -> str:
    i = m.info
    return (f"{i['name']} distilled by clipdistill from {i.get('teacher', {}).get('name', 'a CLIP teacher')} "
            f"({i.get('method')}, {i.get('dataset')}); not timm's ImageNet weights")


def card(m: BundleModel, head: Optional[dict]) -> str:
    i = m.info
    teacher = i.get("teacher") or {}
    acc = i.get("accuracy") or {}
    acc_lines = "\n".join(f"| {k} | {v:.2f} |" if isinstance(v, float) else f"| {k} | {v} |"
                          for k, v in acc.items()) or "| (not measured) | |"
    rec = i["input"]
    what = ("class logits" if head is None else
            f"the teacher's {i.get('embed_dim')}-d image embedding; class scores come from `head.safetensors` "
            f"({head['kind']} head), applied as below")
    return f"""---
library_name: timm
license: other
tags:
- image-classification
- timm
pipeline_tag: image-classification
---
# {i['name']} distilled from {teacher.get('name', 'CLIP')} by clipdistill

A `{i['name']}` student distilled by [clipdistill](https://github.com) from the CLIP teacher
`{teacher.get('name')}` (`{teacher.get('pretrained')}`), method `{i.get('method')}`, on `{i.get('dataset')}`.
These are not timm's ImageNet weights: the licence follows from the teacher's and the training
data's, and is for you to state (`license: other` until you do).

- output: {what}
- classes ({len(i.get('classes') or [])}): {', '.join(i.get('classes') or [])}
- input: {rec['size']}x{rec['size']} RGB, stretched (no crop; timm `crop_mode='squash'`, `crop_pct=1.0`),
  {rec['interpolation']}, pixels / 255 then (x - {rec['mean']}) / {rec['std']}

| accuracy | value |
|---|---|
{acc_lines}

## Use

```python
{usage_code('.', head)}```
"""


def write(ctx: BundleContext) -> list[Entry]:
    m = ctx.fp32
    src = student_folder(m) if m is not None else None
    if src is None:
        return [Entry(NAME, RUNTIME, "", "", "skipped: the ONNX file does not come from a run folder with a "
                                             "student/ folder (timm's format) beside it")]
    dst = ctx.folder / NAME
    shutil.copytree(src, dst, dirs_exist_ok=True)
    cfg = json.loads((dst / "config.json").read_text(encoding="utf-8"))
    atomic.write_json(dst / "config.json", fixed_config(cfg, m))
    head = ((cfg.get("clipdistill") or {}).get("head") if (dst / "head.safetensors").is_file() else None)
    atomic.write_text(dst / "README.md", card(m, head))
    return [Entry(NAME, RUNTIME, f"{NAME}/config.json",
                  f"timm.create_model('local-dir:{NAME}', pretrained=True)",
                  "model card in timm/README.md" + ("; class scores need head.safetensors (code in the card)"
                                                    if head else ""))]


def timm_logits(folder: Path, x: np.ndarray) -> np.ndarray:
    """Run the card's own code on `x` (prepared NCHW float32): the class scores a timm user gets."""
    import torch

    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    head = (cfg.get("clipdistill") or {}).get("head") if (folder / "head.safetensors").is_file() else None
    scope: dict = {}
    exec(compile(usage_code(str(folder), head), str(folder / "README.md"), "exec"), scope)  # noqa: S102
    with torch.no_grad():
        return scope["logits"](torch.from_numpy(x)).numpy()


def check(ctx: BundleContext, images: Optional[np.ndarray]) -> list[str]:
    folder = ctx.folder / NAME
    if not (folder / "config.json").is_file():
        return []
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    pc = cfg.get("pretrained_cfg") or {}
    problems = [f"{NAME}/config.json: pretrained_cfg.{k}={pc[k]!r} is timm's ImageNet entry's, not these weights'"
                for k in INHERITED if k in pc and k not in OURS]
    rec = ctx.input
    if (pc.get("crop_mode"), pc.get("crop_pct"), pc.get("mean"), pc.get("std")) != (
            "squash", 1.0, list(rec["mean"]), list(rec["std"])):
        problems.append(f"{NAME}/config.json: data config {pc.get('crop_mode')}/{pc.get('crop_pct')}/{pc.get('mean')}/"
                        f"{pc.get('std')} is not the record's stretch and mean/std")
    text = (folder / "README.md").read_text(encoding="utf-8") if (folder / "README.md").is_file() else ""
    if not text.startswith("---\nlibrary_name: timm\n"):
        problems.append(f"{NAME}/README.md: no model card front matter (library_name: timm)")
    try:
        import timm  # noqa: F401
        import torch  # noqa: F401
    except ImportError as e:
        return problems + [f"skipped: timm/torch not installed here ({e}), so the folder was not loaded"]
    imgs = network_images(images, int(rec["size"]), n=8)[:32]
    x = prepare(imgs, rec)
    d = float(np.abs(timm_logits(folder, x) - run_onnx(ctx.fp32.path, x)).max())
    if not d <= TOLERANCE:
        problems.append(f"{NAME}/: timm (the card's code) and {ctx.rel(ctx.fp32.path)} differ by {d:.3g} on logits")
    return problems


TARGETS.add(NAME, Target(NAME, RUNTIME, write, check))
