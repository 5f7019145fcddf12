"""TensorRT (trtexec): the command that builds each file's engine, and what each file needs.

    tensorrt/build_engines.sh   one trtexec command per file meant for TensorRT, run from the bundle folder
    tensorrt/COMMANDS.md        the same commands, the TensorRT 10 variant, the oldest TensorRT/JetPack
                                each file parses on and why, its precision and the GPU it needs
    tensorrt/engines.json       what was offered to TensorRT (the check reads it)

Every command has an optimization profile for batches 1 to the bundle's batch (the files have a
dynamic batch axis; without one, trtexec builds a batch-1 engine), with the file's own input
name and size. The cpu-target INT8 file (uint8 Q/DQ, ONNX Runtime's CPU form) is never offered:
TensorRT's parser refuses it. The check runs TensorRT's Q/DQ rules (deploy/tensorrt.py
`qdq_problems`) on every Q/DQ file offered, against the oldest release the file needs."""

from __future__ import annotations

import json
from typing import Optional

import numpy as np

from ...core import atomic
from .. import tensorrt as trt
from . import TARGETS, BundleContext, BundleModel, Entry, Target

NAME = "tensorrt"
RUNTIME = "TensorRT (trtexec)"
SCRIPT = "build_engines.sh"
COMMANDS = "COMMANDS.md"
ENGINES = "engines.json"


def _engine(ctx: BundleContext, m: BundleModel) -> str:
    return f"{NAME}/{trt.engine_name(m.path, ctx.batch)}"


def plan(ctx: BundleContext, m: BundleModel) -> dict:
    """What the bundle says about one file: its form, and for a TensorRT form the commands and
    the oldest TensorRT/JetPack it needs."""
    form = trt.FORMS[trt.form_of(m.info) or trt.form_of_graph(m.path)]
    entry = {"file": ctx.rel(m.path), "form": form.name, "label": form.label, "runtime": form.runtime,
             "for_tensorrt": form.for_tensorrt}
    if form.for_tensorrt:
        kw = {"shown": ctx.rel(m.path), "engine": _engine(ctx, m)}
        entry.update(command=trt.trtexec_command(m.path, m.info, ctx.batch, **kw),
                     command_tensorrt10=trt.trtexec_command(m.path, m.info, ctx.batch, tensorrt="10", **kw),
                     requires=trt.requirements(m.path, m.info))
    return entry


def _markdown(ctx: BundleContext, plans: list[dict]) -> str:
    lines = [f"# TensorRT engines (batch 1 to {ctx.batch})", "",
             f"Run from the bundle folder (`bash {NAME}/{SCRIPT}` runs every command below). Each command builds one "
             f"engine with an optimization profile for batches 1 to {ctx.batch}; an engine belongs to the GPU and "
             f"TensorRT version it was built with. These commands have not been run where the bundle was made.", ""]
    for p in plans:
        lines += [f"## `{p['file']}`: {p['label']}", ""]
        if not p["for_tensorrt"]:
            lines += [f"Not for TensorRT: this is the form for {p['runtime']} (uint8 Q/DQ, non-zero zero points, "
                      f"INT32 bias), which TensorRT's ONNX parser refuses. For TensorRT INT8 use `clipdistill export "
                      f"--int8 --int8-target tensorrt` or `clipdistill compress`.", ""]
            continue
        r = p["requires"]
        lines += ["TensorRT 8.x:", "", "```", p["command"], "```", ""]
        if p["command_tensorrt10"] != p["command"]:
            lines += ["TensorRT 10 builds a Q/DQ network strongly typed (`--stronglyTyped` instead of the precision "
                      "flags):", "", "```", p["command_tensorrt10"], "```", ""]
        need = (f"TensorRT >= {r['tensorrt']} (JetPack >= {r['jetpack']}): {r['why']}" if r["tensorrt"] else
                f"no TensorRT release known here: {r['why']}")
        lines += [f"- needs: {need}", f"- precision: {p['form']} (for {p['runtime']})", f"- GPU: {r['device']}", ""]
    return "\n".join(lines)


def write(ctx: BundleContext) -> list[Entry]:
    plans = [plan(ctx, m) for m in ctx.models]
    folder = ctx.folder / NAME
    folder.mkdir(parents=True, exist_ok=True)
    commands = [p["command"] for p in plans if p["for_tensorrt"]]
    atomic.write_text(folder / SCRIPT, "#!/usr/bin/env bash\n# TensorRT 8.x; see COMMANDS.md for TensorRT 10.\n"
                                       "set -euo pipefail\ncd \"$(dirname \"$0\")/..\"\n" +
                      "".join(f"{c}\n" for c in commands))
    atomic.write_text(folder / COMMANDS, _markdown(ctx, plans))
    atomic.write_json(folder / ENGINES, {"batch": ctx.batch, "files": plans})
    entries = []
    for p in plans:
        if not p["for_tensorrt"]:
            entries.append(Entry(NAME, RUNTIME, p["file"], "-", f"not for TensorRT: {p['label']}, the form for "
                                                                f"{p['runtime']}; TensorRT's parser refuses it"))
            continue
        r = p["requires"]
        need = f"TensorRT >= {r['tensorrt']}, JetPack >= {r['jetpack']}" if r["tensorrt"] else r["why"]
        entries.append(Entry(NAME, RUNTIME, p["file"], p["command"],
                             f"{p['form']}; {need}: {r['why']}; TensorRT 10: see {NAME}/{COMMANDS}"))
    return entries


def check(ctx: BundleContext, images: Optional[np.ndarray]) -> list[str]:
    """The offered files pass TensorRT's Q/DQ rules, none is a cpu-target INT8 file, and every
    command is the one the file's input and the bundle's batch give."""
    path = ctx.folder / NAME / ENGINES
    if not path.is_file():
        return [f"{NAME}/{ENGINES} is missing"]
    offered = {p["file"]: p for p in json.loads(path.read_text(encoding="utf-8"))["files"] if p.get("for_tensorrt")}
    problems = []
    by_file = {ctx.rel(m.path): m for m in ctx.models}
    for rel, p in offered.items():
        m = by_file.get(rel)
        if m is None:
            problems.append(f"{rel}: offered to TensorRT but not a model of the bundle")
            continue
        form = trt.FORMS[trt.form_of(m.info) or trt.form_of_graph(m.path)]
        if not form.for_tensorrt:
            problems.append(f"{rel}: {form.label} is offered to TensorRT, but it is the form for {form.runtime} "
                            f"(uint8 Q/DQ); TensorRT's parser refuses it: use the tensorrt INT8 target's file")
            continue
        req = trt.requirements(m.path, m.info)
        if not req["tensorrt"]:
            problems.append(f"{rel}: {req['why']}")
            continue
        if form.name == "int8-qdq":
            problems += [f"{rel}: {q}" for q in trt.qdq_problems(m.path, req["tensorrt"])]
        want = trt.trtexec_command(m.path, m.info, ctx.batch, shown=rel, engine=_engine(ctx, m))
        if p.get("command") != want:
            problems.append(f"{rel}: the command written ({p.get('command')}) is not the one its file and batch "
                            f"{ctx.batch} give ({want})")
    script = (ctx.folder / NAME / SCRIPT)
    text = script.read_text(encoding="utf-8") if script.is_file() else ""
    problems += [f"{NAME}/{SCRIPT} lacks the command for {rel}" for rel, p in offered.items()
                 if p.get("command") and p["command"] not in text]
    return problems


TARGETS.add(NAME, Target(NAME, RUNTIME, write, check))
