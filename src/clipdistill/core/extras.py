"""Which install extra provides what: the one home of the names the CLI says when a verb's
packages are missing (pyproject.toml declares the extras; tests/test_light_install.py holds the
two together).

The base install is the device's: `predict` on numpy and Pillow, with ONNX Runtime from the
`device` extra (on a Jetson, the onnxruntime-gpu wheel instead, which provides the same module).
Everything that trains, exports or compresses needs `train`. Checked with `find_spec`, so
nothing is imported to find out."""

from __future__ import annotations

import importlib.util
from typing import Iterable, Optional

# extra -> {module the code imports: distribution pip installs}, as pyproject.toml lists them
EXTRAS: dict[str, dict[str, str]] = {
    "device": {"onnxruntime": "onnxruntime"},
    "video": {"cv2": "opencv-python-headless"},
    "train": {"torch": "torch", "torchvision": "torchvision", "open_clip": "open_clip_torch", "timm": "timm",
              "tqdm": "tqdm", "tensorboard": "tensorboard", "onnx": "onnx", "onnxruntime": "onnxruntime",
              "onnxscript": "onnxscript", "matplotlib": "matplotlib", "webdataset": "webdataset"},
    "compress": {"modelopt": "nvidia-modelopt", "requests": "requests"},
    "download": {"img2dataset": "img2dataset", "pyarrow": "pyarrow"},
    "ann": {"usearch": "usearch"},
}
# said after the install command
HINTS = {"device": " (on a Jetson: the onnxruntime-gpu wheel for your JetPack, from the Jetson Zoo, instead)"}


def _present(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken install, or an import hook that refuses it
        return False


def missing(extras: Iterable[str]) -> dict[str, list[str]]:
    """{extra: [modules of it that cannot be imported here]}, only the extras with some missing."""
    out: dict[str, list[str]] = {}
    for extra in extras:
        gone = [m for m in EXTRAS[extra] if not _present(m)]
        if gone:
            out[extra] = gone
    return out


def extra_of(module: Optional[str], prefer: Iterable[str] = ()) -> Optional[str]:
    """The extra that installs `module` (a dotted name: its top package counts), the ones in
    `prefer` first; None when no extra does (a bug, or a package of the base install)."""
    top = (module or "").split(".")[0]
    for extra in [*prefer, *EXTRAS]:
        if top in EXTRAS.get(extra, {}):
            return extra
    return None


def message(verb: str, gone: dict[str, list[str]]) -> str:
    """One line: which verb, what is missing (`missing`'s answer), the one command that installs it."""
    mods = ", ".join(m for ms in gone.values() for m in ms)
    extras = ",".join(gone)
    what = "the training install" if extras == "train" else f"clipdistill[{extras}]"
    hint = "".join(HINTS.get(e, "") for e in gone)
    return f"clipdistill {verb}: error: needs {what} ({mods} not installed); pip install 'clipdistill[{extras}]'{hint}"
