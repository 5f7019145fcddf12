"""The device's light install: `pip install clipdistill` (numpy, Pillow) plus ONNX Runtime runs
`predict`, and nothing heavy comes with it or is imported by it.

The heavy packages are present in this venv, so their absence is emulated: a fresh interpreter
installs an import blocker (a `sys.meta_path` finder that refuses them, as a machine without
them would) before clipdistill is imported, then runs the real CLI."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from clipdistill.core.extras import EXTRAS

ROOT = Path(__file__).resolve().parents[1]
# what the training install brings and the device does without
HEAVY = ("torch", "torchvision", "open_clip", "timm", "matplotlib", "webdataset", "onnx", "onnxscript", "tensorboard",
         "modelopt")

# argv[1]: the modules refused (comma-separated); then `code` runs. Every name refused is recorded
# in TRIED, so a test sees an import attempted even where the code under test would catch it.
PRELUDE = """
import contextlib, importlib.abc, io, json, sys
BLOCKED = set(filter(None, sys.argv[1].split(",")))
TRIED = []
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            TRIED.append(name)
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: not in the light install)", name=name)
        return None
sys.meta_path.insert(0, Blocker())
from clipdistill.cli import main
"""


def _python(blocked, code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PRELUDE + code, ",".join(blocked), *args], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _dist(requirement: str) -> str:
    """A requirement's distribution name, normalised (PEP 503)."""
    return re.sub(r"[-_.]+", "-", re.split(r"[\s<>=!~;\[(]", requirement, maxsplit=1)[0]).lower()


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


# ----------------------------------------------------------------------------- what pip installs

def test_base_dependencies_hold_nothing_heavy():
    heavy = {_dist(d) for d in (*HEAVY, "open_clip_torch", "nvidia-modelopt", "onnxruntime", "opencv-python-headless")}
    heavy |= {_dist(d) for mods in EXTRAS.values() for d in mods.values()}
    base = {_dist(d) for d in _pyproject()["dependencies"]}
    assert not base & heavy, (
        f"{sorted(base & heavy)} in pyproject's base dependencies: `pip install clipdistill` is the device's "
        f"install (predict: numpy and Pillow); torch & co. belong to the `train` extra, onnxruntime to `device` "
        f"(a hard onnxruntime would shadow a Jetson's onnxruntime-gpu), OpenCV to `video`")


def test_extras_named_by_the_cli_are_the_ones_pyproject_declares():
    """core/extras.py (what the CLI tells a user to install) and pyproject.toml say the same."""
    declared = _pyproject()["optional-dependencies"]
    for extra, modules in EXTRAS.items():
        own = {_dist(d) for d in declared[extra] if _dist(d) != "clipdistill"}
        assert own == {_dist(d) for d in modules.values()}, extra
    test = " ".join(declared["test"])  # the suite runs every verb
    assert all(extra in test for extra in ("train", "device", "video", "compress", "download")), declared["test"]


# ----------------------------------------------------------------------------- predict, light

def _pngs(cache_dir: Path, folder: Path, n: int) -> list[str]:
    from PIL import Image

    from clipdistill.data.datasets import create_dataset

    ds = create_dataset("shapes10", "test", str(cache_dir / "data"))
    folder.mkdir()
    paths = []
    for i in range(n):
        Image.fromarray(ds.data[i]).save(folder / f"test{i}.png")
        paths.append(str(folder / f"test{i}.png"))
    return paths


def _bundle(exported: dict, folder: Path) -> Path:
    """A bundle folder in deploy/bundle.py's form (manifest.json {"models": [...], "files": {path: {"sha256",
    "bytes"}}}), written here by hand: an INT8 file listed before the fp32 one, which predict must take."""
    import hashlib

    (folder / "jetson").mkdir(parents=True)
    fp32, int8 = Path(exported["fp32"]), Path(exported["int8"])
    copies = {"jetson/student.onnx": int8, "student.int8.onnx": int8, "student.int8.json": int8.with_suffix(".json"),
              "student.onnx": fp32, "student.json": fp32.with_suffix(".json")}
    for rel, src in copies.items():
        shutil.copyfile(src, folder / rel)
    classes = json.loads(fp32.with_suffix(".json").read_text())["classes"]
    (folder / "labels.txt").write_text("\n".join(classes) + "\n")
    files = {rel: {"sha256": hashlib.sha256((folder / rel).read_bytes()).hexdigest(),
                   "bytes": (folder / rel).stat().st_size} for rel in [*copies, "labels.txt"]}
    (folder / "manifest.json").write_text(json.dumps({"models": ["student.int8.onnx", "student.onnx"],
                                                      "files": dict(sorted(files.items()))}))
    return folder


PREDICT = """
out = io.StringIO()
with contextlib.redirect_stdout(out):
    rc = main(sys.argv[2:])
print(json.dumps({"rc": rc, "stdout": out.getvalue(), "tried": TRIED,
                  "heavy": sorted({m.split(".")[0] for m in sys.modules} & BLOCKED)}))
"""


@pytest.mark.slow
def test_predict_imports_nothing_heavy_and_answers_as_the_full_install(exported, cache_dir, tmp_path):
    images = _pngs(cache_dir, tmp_path / "images", 6)
    bundle = _bundle(exported, tmp_path / "student.bundle")
    args = ["--threads", "1", "--json", *images]
    light = _python(HEAVY, PREDICT, "predict", "--model", str(bundle), *args)
    full = _python((), PREDICT, "predict", "--model", str(exported["fp32"]), *args)
    assert light.returncode == 0 and full.returncode == 0, light.stderr[-3000:] + full.stderr[-3000:]
    light, full = json.loads(light.stdout.splitlines()[-1]), json.loads(full.stdout.splitlines()[-1])
    assert light["rc"] == 0 and light["tried"] == [] and light["heavy"] == [], light
    got, want = (json.loads(r["stdout"].splitlines()[0]) for r in (light, full))
    assert got["model"] == str(bundle / "student.onnx")  # the fp32 file, not the INT8 ones listed first
    assert [r["path"] for r in got["results"]] == [r["path"] for r in want["results"]]
    assert [r["label"] for r in got["results"]] == [r["label"] for r in want["results"]]
    for a, b in zip(got["results"], want["results"]):
        assert [t["class"] for t in a["top"]] == [t["class"] for t in b["top"]]
        assert a["top"] and all(abs(s["prob"] - t["prob"]) < 1e-6 for s, t in zip(a["top"], b["top"]))


def test_bundle_folder_without_an_fp32_model_is_a_clear_error(tmp_path):
    from clipdistill.core.errors import ConfigError
    from clipdistill.deploy.predict import PredictConfig

    with pytest.raises(ConfigError, match="manifest.json"):
        PredictConfig(model=str(tmp_path))
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not a bundle manifest"):
        PredictConfig(model=str(tmp_path))
    (tmp_path / "m.int8.onnx").write_bytes(b"")
    (tmp_path / "m.int8.json").write_text(json.dumps({"precision": "int8"}))
    (tmp_path / "manifest.json").write_text(json.dumps({"files": {"m.int8.onnx": {}, "m.int8.json": {}}}))
    with pytest.raises(ConfigError, match="no full-precision ONNX file.*m.int8.onnx"):
        PredictConfig(model=str(tmp_path))
    (tmp_path / "model.onnx").write_bytes(b"")  # not in the manifest: the bundle's default name
    assert PredictConfig(model=str(tmp_path)).model == str(tmp_path / "model.onnx")


# ----------------------------------------------------------------------------- the other verbs, light

VERBS_WITHOUT = """
from clipdistill.cli import VERBS, Verb

def needs_torch(cfg):  # a verb that declares nothing and meets torch on its way: the fallback
    import torch  # noqa: F401

VERBS.add("x-needs-torch", Verb("s", "d", ".cli:NoConfig", "__main__:needs_torch"))
runs = [[v, "--help"] for v in VERBS if "train" in VERBS.get(v).needs]
runs += [["train", "--method", "labels", "--data", "train", "--epochs", "1", "--out", sys.argv[2]],
         ["x-needs-torch"], ["predict", "--model", sys.argv[3], sys.argv[3]], ["--help"]]
said = []
for argv in runs:
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
    said.append([argv, rc, err.getvalue(), out.getvalue()])
print(json.dumps(said))
"""


def test_verbs_that_need_the_training_install_say_so_in_one_line(tmp_path):
    """Without torch & co. (and onnxruntime), every training verb exits 2 with one line that names the
    verb, what is missing and the pip command; so does predict without onnxruntime; --help works."""
    model = tmp_path / "m.onnx"
    model.write_bytes(b"")
    proc = _python((*HEAVY, "onnxruntime"), VERBS_WITHOUT, str(tmp_path / "run"), str(model))
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = json.loads(proc.stdout.splitlines()[-1])
    assert len(said) >= 12, said  # train, embed, export, compress, fit-prompts, demo, ...
    for argv, rc, err, out in said:
        verb = argv[0]
        if verb == "--help":
            assert rc == 0 and "predict" in out and not err, (argv, rc, err)
            continue
        extra = "device" if verb == "predict" else "train,compress" if verb == "compress" else "train"
        assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, (argv, rc, err)
        assert err.startswith(f"clipdistill {verb}: error: needs ") and f"pip install 'clipdistill[{extra}]'" in err, \
            (argv, err)
        assert ("onnxruntime-gpu" in err) == (verb == "predict"), err  # the Jetson's own wheel
    assert "(torch not installed)" in said[-3][2]  # the fallback names the one module met
    assert not (tmp_path / "run").exists()  # train refused before anything ran


@pytest.mark.slow
def test_check_bundle_on_the_device_install_checks_what_it_can(exported, tmp_path):
    """On the device (numpy, Pillow, ONNX Runtime) check-bundle verifies the copy: every hash and
    mode, each runtime's check that needs only what is there, the others said as skipped; a file
    of the user's beside the bundle (photos/, the wheel) is listed, one slipped into a runtime's
    folder fails. It stopped at once with 'needs the training install (onnx)'."""
    from clipdistill.deploy.bundle import bundle_path

    bundle = tmp_path / "copied.bundle"
    shutil.copytree(bundle_path(exported["fp32"]), bundle)
    (bundle / "photos").mkdir(mode=0o755)
    (bundle / "photos" / "mine.png").write_bytes(b"a photo of the user's")
    device = (*HEAVY, "polygraphy", "onnx_graphsurgeon", "tritonclient", "cv2")
    first = _python(device, PREDICT, "check-bundle", str(bundle))
    assert first.returncode == 0, first.stderr[-3000:]
    r = json.loads(first.stdout.splitlines()[-1])
    assert r["rc"] == 0 and r["heavy"] == [], (r, first.stderr[-2000:])
    lines = r["stdout"].splitlines()
    assert lines[-1].startswith("PASSED") and "note  1 file(s) beside the bundle's own" in r["stdout"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    checked = {ln.split()[1]: ln.split()[0] for ln in lines if ln.startswith(("pass ", "skip ", "FAIL "))}
    assert set(checked) >= set(manifest["files"]) and "FAIL" not in checked.values()
    # hashed and passed where only the hash can be checked; the ONNX files' lint said as skipped
    assert {f for f in manifest["files"] if not f.endswith(".onnx")} <= {f for f, w in checked.items() if w == "pass"}
    assert "polygraphy is not installed" in r["stdout"] and "needs the onnx module" in r["stdout"]
    # every model run again here on the probe images, with the answers recorded at export
    assert r["stdout"].count("(CPU) here: top-1 as recorded on 16 of 16 probe images") == len(manifest["models"])
    bare = json.loads(_python((*device, "onnxruntime"), PREDICT, "check-bundle", str(bundle)).stdout.splitlines()[-1])
    assert bare["rc"] == 0 and "onnxruntime is not installed, so the answers recorded" in bare["stdout"], bare
    # a damaged copy and a file added where a runtime reads fail, each named
    model = bundle / manifest["models"][0]
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    (bundle / "triton" / "extra").mkdir(mode=0o755)
    (bundle / "triton" / "extra" / "model.onnx").write_bytes(b"not ours")
    second = json.loads(_python(device, PREDICT, "check-bundle", str(bundle)).stdout.splitlines()[-1])
    assert second["rc"] == 1
    fails = [ln for ln in second["stdout"].splitlines() if ln.startswith("FAIL ")]
    assert sorted(ln.split()[1] for ln in fails) == sorted([manifest["models"][0], "triton/extra/model.onnx"])
