"""The deployment bundle: one folder a user copies to the device, with per runtime the files it reads.

    MODEL.bundle/
      MODEL.onnx, MODEL.json, ...   the ONNX files and their sidecars, as exported
      labels.txt                    one class per line
      jetson/ deepstream/ triton/ tensorrt/ opencv/ timm/   one folder per target (deploy/targets/)
      README.md                     which file goes to which runtime, with the exact command
      manifest.json                 sha256 and size of every file, the tool version, the targets

`write_bundle` is called by export, compress and fit-prompts (their `--bundle` option group,
`BundleOptions`) for the files they wrote; every runtime's files are derived from the sidecar's
input record. The folder is written whole in a temporary folder beside it and renamed into place
(a re-run replaces it; a killed one leaves the old bundle), with modes 0644/0755, so a container
or another user can serve it. `check_bundle` (`clipdistill check-bundle DIR`) re-verifies the
manifest and runs every target's own check."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

from ..core import atomic
from ..core.config import Options, check, option
from ..core.errors import ClipDistillError, ConfigError
from . import bundle_answers as answers
from .model_file import sidecar_path

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
README = "README.md"
LABELS = "labels.txt"
FORMAT = "clipdistill-bundle/1"


class BundleCheckError(ClipDistillError):
    """A bundle's files do not pass their checks."""


def bundle_path(onnx_file: str | Path) -> Path:
    """`<stem>.bundle/` next to `<stem>.onnx`."""
    p = Path(onnx_file)
    return p.with_name(p.stem + ".bundle")


def target_names(spec: str) -> list[str]:
    """`all`, `none`, or a comma list of registered targets -> the names (ConfigError naming
    --bundle and the valid ones otherwise)."""
    from .targets import TARGETS

    spec = spec.strip()
    if spec == "all":
        return TARGETS.names()
    if spec in ("none", ""):
        return []
    names = [s.strip() for s in spec.split(",") if s.strip()]
    for n in names:
        TARGETS.get(n)  # raises, listing the valid names
    return list(dict.fromkeys(names))


@dataclasses.dataclass
class BundleOptions(Options, title="deployment bundle"):
    """Which runtimes the bundle written beside the ONNX file serves."""

    bundle: str = option("all", "runtimes to write a deployment bundle for, in OUT.bundle/ beside the ONNX file: "
                                "all, none, or a comma list of jetson, deepstream, triton, tensorrt, opencv, timm",
                         metavar="all|none|T1,T2", runtime=True)
    bundle_batch: int = option(8, "bundle: the largest batch its engines and configs are made for (DeepStream "
                                  "batch-size, Triton max_batch_size, trtexec --maxShapes)", runtime=True)

    def _check_bundle(self) -> None:
        check(self.bundle_batch >= 1, "bundle_batch", "must be >= 1")
        try:
            target_names(self.bundle)
        except ConfigError as e:
            raise ConfigError(f"{e}; or all / none") from None


# ------------------------------------------------------------------------------ writing

def write_for(cfg: BundleOptions, files: list[Path]) -> Optional[str]:
    """The bundle a verb's `--bundle` asks for, of `files` (the first names it: FIRST.bundle/);
    None with --bundle none."""
    names = target_names(cfg.bundle)
    return write_bundle(files, bundle_path(files[0]), names, cfg.bundle_batch)["path"] if names else None


def _context(folder: Path, onnx_names: list[str], batch: int):
    from .targets import BundleContext, BundleModel

    models = [BundleModel(folder / n, atomic.read_json(sidecar_path(folder / n))) for n in onnx_names]
    return BundleContext(folder, models, batch)


def write_bundle(onnx_files: list[Path], folder: Path, targets: list[str], batch: int) -> dict:
    """Write the bundle of `onnx_files` (each with its sidecar) into `folder`, replacing it whole."""
    from .targets import TARGETS

    onnx_files = [Path(p) for p in onnx_files]
    if not onnx_files:
        raise ConfigError("write_bundle: no ONNX file given")
    for p in onnx_files:
        if not p.is_file() or not sidecar_path(p).is_file():
            raise ClipDistillError(f"{p} (or its sidecar {sidecar_path(p).name}) does not exist; export it first")
    folder = Path(folder)
    t0 = time.time()
    folder.parent.mkdir(parents=True, exist_ok=True)
    atomic.remove_stale_temporaries(folder.parent)
    with atomic.temporary_folder(folder.parent, folder.name) as tmp:
        new = tmp / "new"
        new.mkdir()
        for p in onnx_files:
            shutil.copyfile(p, new / p.name)
            shutil.copyfile(sidecar_path(p), new / sidecar_path(p).name)
        ctx = _context(new, [p.name for p in onnx_files], batch)
        if ctx.classes:
            atomic.write_text(new / LABELS, "".join(f"{c}\n" for c in ctx.classes))
        images, where = run_test_images(ctx.models[0].info, answers.PROBE_IMAGES)
        recorded = answers.record(new, {m.path.name: m.info for m in ctx.models}, answers.probe_pixels(
            images, ctx.input), where if images is not None else f"seeded noise ({where})")
        entries = []
        for name in targets:
            entries += TARGETS.get(name).write(ctx)
        atomic.write_text(new / README, readme(ctx, entries, targets, recorded))
        set_modes(new)
        manifest = {"format": FORMAT, "clipdistill": _version(), "targets": list(targets), "batch": batch,
                    "models": [p.name for p in onnx_files], "files": hashes(new),
                    "entries": [dataclasses.asdict(e) for e in entries]}
        atomic.write_json(new / MANIFEST, manifest)
        set_modes(new)
        if folder.exists():
            os.replace(folder, tmp / "old")  # removed with the scratch folder
        os.replace(new, folder)
    os.chmod(folder, 0o755)
    log.info("wrote the deployment bundle %s (%s; %d files) [%.1f s]; check it with `clipdistill check-bundle %s`",
             folder, ", ".join(targets) or "no runtime", len(manifest["files"]), time.time() - t0, folder)
    return {"path": str(folder), "targets": list(targets), "files": len(manifest["files"])}


def _version() -> str:
    from .. import __version__

    return __version__


def set_modes(folder: Path) -> None:
    """Folders 0755, files 0644: the bundle is served by other users and containers."""
    os.chmod(folder, 0o755)
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(Path(root) / d, 0o755)
        for f in files:
            os.chmod(Path(root) / f, 0o644)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def hashes(folder: Path) -> dict:
    """{relative path: {sha256, bytes}} of every file but the manifest."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and rel != MANIFEST:
            out[rel] = {"sha256": sha256(p), "bytes": p.stat().st_size}
    return out


def readme(ctx, entries: list, targets: list[str], recorded: bool = False) -> str:
    """Which file goes to which runtime, with the command; the preprocessing in words; what was
    not run here."""
    rec = ctx.input
    def code(s: str) -> str:
        return f"`{s}`" if s and s != "-" else "—"

    rows = [f"| {e.runtime} | {code(e.file)} | {code(e.command)} | {e.note} |" for e in entries]
    models = "\n".join(f"- `{ctx.rel(m.path)}` ({m.precision}, {m.info.get('output')} out; sidecar "
                       f"`{sidecar_path(m.path).name}`)" for m in ctx.models)
    probe = (f"- `{answers.PROBE}`, `{answers.ANSWERS}`: {answers.PROBE_IMAGES} probe images at the network's side and "
             f"each model's outputs on them where this bundle was written; `clipdistill check-bundle .` asks this "
             f"machine's ONNX Runtime again\n") if recorded else ""
    return f"""# Deployment bundle: {ctx.reference.info.get('name')} ({ctx.reference.info.get('role')})

Written by clipdistill {_version()} for: {', '.join(targets) or 'no runtime'}. Commands run from this folder.

## Files

{models}
- `{LABELS}`: one class per line ({len(ctx.classes)} classes)
- `{MANIFEST}`: sha256 and size of every file; `clipdistill check-bundle .` checks them and every runtime's files
{probe}
## Preprocessing (every runtime's files are derived from this record)

RGB, stretched to {rec['size']}x{rec['size']} ({rec['interpolation']}, no crop, aspect ratio not kept), pixels / 255,
then (x - mean) / std with mean {rec['mean']} and std {rec['std']}, {rec['layout']} float32.

## Which file for which runtime

| runtime | file | command | note |
|---|---|---|---|
{chr(10).join(rows)}

The TensorRT, DeepStream, Triton and jetson-inference loads themselves have not been run on the machines this
bundle was made on: their files follow each runtime's documented conventions and are checked here by their own
parsers and by emulating their preprocessing (`clipdistill check-bundle`), not by the runtimes.
"""


# ------------------------------------------------------------------------------ checking

# one interpreter lints every file: polygraphy's own CLI entry, called once per file (its import
# is most of a lint's cost)
_LINT_ALL = """import json, sys
from polygraphy.tools import main
pairs = json.loads(sys.argv[1])
codes = []
for model, report in pairs:
    try:
        codes.append(main(["check", "lint", model, "-o", report]))
    except SystemExit as e:
        codes.append(e.code if isinstance(e.code, int) else 1)
print(json.dumps(codes))
"""


def polygraphy_lint(path: Path, folder: Path) -> Optional[str]:
    """None when `polygraphy check lint` passes on the file; the problem otherwise; raises
    FileNotFoundError when polygraphy is not installed."""
    return polygraphy_lint_all([path])[str(path)]


def polygraphy_lint_all(paths: list[Path]) -> dict[str, Optional[str]]:
    """`polygraphy check lint` of each file, in one process ({path: None when it passes, else the
    problem}); raises FileNotFoundError when polygraphy is not installed."""
    import importlib.util

    try:
        found = importlib.util.find_spec("polygraphy") is not None
    except ImportError:  # a finder that refuses it (an import blocker, a broken install)
        found = False
    if not found:
        raise FileNotFoundError("polygraphy")
    out: dict[str, Optional[str]] = {}
    with atomic.temporary_folder(Path(os.environ.get("TMPDIR", "/tmp")), "lint") as tmp:
        pairs = [(str(p), str(tmp / f"report-{i}.json")) for i, p in enumerate(paths)]
        proc = subprocess.run([sys.executable, "-c", _LINT_ALL, json.dumps(pairs)], capture_output=True, text=True,
                              timeout=600 + 120 * len(paths))
        try:
            codes = json.loads(proc.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            return {m: f"polygraphy check lint exited {proc.returncode}: {tail[0][:300]}" for m, _ in pairs}
        for (model, report), code in zip(pairs, codes):
            out[model] = _lint_problem(Path(report), code)
    return out


def _lint_problem(report: Path, code: int) -> Optional[str]:
    if not report.is_file():
        return f"polygraphy check lint exited {code} without a report"
    rep = json.loads(report.read_text())
    failing = rep.get("summary", {}).get("failing") or []
    errors = [e for e in rep.get("lint_entries", []) if e.get("level") in ("exception", "error")]
    if code != 0 or failing or errors:
        msg = "; ".join(f"{e.get('source')}: {e.get('message', '').strip()} ({', '.join(e.get('nodes') or [])})"
                        for e in errors[:3])
        return f"polygraphy check lint: {len(failing)} failing nodes{': ' + msg if msg else ''}"
    return None


def check_bundle(folder: str | Path, images: Optional[np.ndarray] = None) -> dict:
    """{"files": {name: [problems]}, "targets": {name: [problems]}, "passed": bool}: the manifest's
    hashes and modes, a polygraphy lint of every ONNX file, and every target's own check. A line
    starting with `skipped:` is a check that could not run here (not a pass, not a failure)."""
    from .targets import TARGETS

    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        raise ConfigError(f"{folder}: no {MANIFEST}; give a folder written by `clipdistill export` (OUT.bundle/)")
    man = atomic.read_json(folder / MANIFEST)
    files: dict[str, list[str]] = {}
    now = hashes(folder)
    for rel, want in man["files"].items():
        got = now.get(rel)
        files[rel] = ([f"missing (listed in {MANIFEST})"] if got is None else
                      [f"sha256 {got['sha256'][:12]}... differs from the manifest's {want['sha256'][:12]}..."]
                      if got["sha256"] != want["sha256"] else [])
        mode = (folder / rel).stat().st_mode & 0o777 if got else 0o644
        if mode != 0o644:
            files[rel].append(f"mode {mode:o}, not 644")
    # A runtime reads whole folders (Triton loads every version under triton/MODEL/): a file added
    # inside one of the bundle's folders fails. Files beside them (the wheel, photos/ to try
    # `predict` on, as the bundle's README suggests) are the user's, listed and not checked.
    ours = {a.as_posix() for rel in man["files"] for a in Path(rel).parents} - {"."}
    extra = []
    for rel in sorted(set(now) - set(man["files"])):
        inside = [a.as_posix() for a in Path(rel).parents if a.as_posix() in ours]
        if inside:
            files[rel] = [f"not in {MANIFEST}, inside {inside[-1]}/, which a runtime reads"]
        else:
            extra.append(rel)
    for d in [folder, *(folder / rel for rel in sorted(ours))]:
        if d.stat().st_mode & 0o777 != 0o755:
            files.setdefault(d.relative_to(folder).as_posix() + "/", []).append(
                f"folder mode {d.stat().st_mode & 0o777:o}, not 755")
    onnx = sorted(r for r in man["files"] if r.endswith(".onnx") and r in now)
    first: dict[str, str] = {}  # a file copied for several runtimes is linted once
    for rel in onnx:
        first.setdefault(now[rel]["sha256"], rel)
    try:
        linted = polygraphy_lint_all([folder / rel for rel in first.values()])
    except FileNotFoundError:
        linted = None
    for rel in onnx:
        if linted is None:
            files[rel].append("skipped: polygraphy is not installed (pip install polygraphy onnx_graphsurgeon), so "
                              "the file was not linted")
        elif linted[str(folder / first[now[rel]["sha256"]])]:
            files[rel].append(linted[str(folder / first[now[rel]["sha256"]])])
    ran: dict[str, str] = {}
    present = {m: atomic.read_json(sidecar_path(folder / m)) for m in man["models"]
               if (folder / m).is_file() and sidecar_path(folder / m).is_file()}
    try:
        for rel, (problems, said) in answers.replay(folder, present).items():
            files.setdefault(rel, []).extend(problems)
            ran[rel] = said
    except ModuleNotFoundError:
        for rel in present:
            files.setdefault(rel, []).append(f"skipped: onnxruntime is not installed, so the answers recorded in "
                                             f"{answers.ANSWERS} were not asked again (pip install "
                                             f"'clipdistill[device]')")
    ctx = _context(folder, man["models"], int(man["batch"]))
    targets = {}
    for name in man["targets"]:
        try:
            t = TARGETS.get(name)
        except ConfigError:
            targets[name] = [f"skipped: this clipdistill has no {name!r} target"]
            continue
        try:
            targets[name] = t.check(ctx, images)
        except ModuleNotFoundError as e:  # the device's light install: what it has is checked, the rest said
            targets[name] = [f"skipped: needs the {e.name or 'a missing'} module, not installed here (the training "
                             f"install has it: pip install 'clipdistill[train]')"]
    failed = [p for ps in [*files.values(), *targets.values()] for p in ps if not p.startswith("skipped:")]
    return {"path": str(folder), "files": files, "targets": targets, "ran": ran, "extra": extra, "passed": not failed}


# ------------------------------------------------------------------------------ the verb

@dataclasses.dataclass
class CheckBundleConfig:
    images: int = option(256, "real test images for the checks that run the models (the source run's test split, "
                              "when it is on this machine); 0 = only the checks that need none")

    def __post_init__(self) -> None:
        check(self.images >= 0, "images", "must be >= 0")


def _test_images(folder: Path, n: int) -> tuple[Optional[np.ndarray], str]:
    """Up to n test images of the run the bundle's model was exported from, or (None, why)."""
    if n == 0:
        return None, "--images 0"
    man = atomic.read_json(folder / MANIFEST)
    return run_test_images(atomic.read_json(sidecar_path(folder / man["models"][0])), n)


def run_test_images(info: dict, n: int) -> tuple[Optional[np.ndarray], str]:
    """Up to n test images of the run a model (its sidecar `info`) was exported from, or (None, why)."""
    run = (info.get("source") or {}).get("run")
    if not run or not (Path(run) / "config.json").is_file():
        return None, "the source run is not on this machine"
    from .run_images import split_images, subset

    try:
        imgs, _ = split_images(atomic.read_json(Path(run) / "config.json"), "test", "", info["trained_size"])
    except (ClipDistillError, OSError) as e:
        return None, f"the source run's test split cannot be read ({e})"
    except ModuleNotFoundError as e:
        return None, f"reading the source run's test split needs {e.name or 'the training install'} (not installed)"
    return np.asarray(imgs[subset(len(imgs), n, seed=0)]), f"{min(n, len(imgs))} test images of {run}"


def run(cfg: CheckBundleConfig, inputs: str) -> dict:
    folder = Path(inputs)
    if not folder.is_dir():
        raise ConfigError(f"{inputs} is not a folder; give a bundle folder (OUT.bundle/ beside the ONNX file)")
    images, where = _test_images(folder, cfg.images)
    log.info("checking %s with %s", folder, where if images is not None else f"no test images ({where})")
    return {**check_bundle(folder, images), "images": where}


def text(res: dict, cfg=None) -> str:
    lines = []
    for kind in ("files", "targets"):
        for name, problems in res[kind].items():
            fails = [p for p in problems if not p.startswith("skipped:")]
            word = "FAIL" if fails else "skip" if problems else "pass"
            said = (res.get("ran") or {}).get(name) if kind == "files" else None
            lines.append(f"{word}  {name}" + "".join(f"\n      {p}" for p in [*problems, *([said] if said else [])]))
    extra = res.get("extra") or []
    if extra:
        lines.append(f"note  {len(extra)} file(s) beside the bundle's own, not in {MANIFEST} and not checked: "
                     f"{', '.join(extra[:3])}{f' and {len(extra) - 3} more' if len(extra) > 3 else ''}")
    lines.append(f"{'PASSED' if res['passed'] else 'FAILED'}: {res['path']} ({res['images']})")
    return "\n".join(lines)


def failures(res: dict) -> list[str]:
    return [] if res["passed"] else [f"check-bundle: {res['path']} failed its checks (the FAIL lines above)"]
