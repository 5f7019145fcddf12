"""The runtimes a deployment bundle serves, as data: one `Target` per runtime, registered here.

A bundle (deploy/bundle.py) is one folder a user copies to the device: the ONNX files, their
sidecars, labels, and per runtime the files that runtime reads. Each runtime's conventions
(jetson-inference's fixed ImageNet preprocessing, DeepStream's scalar net-scale-factor, Triton's
repository layout, ...) live in one module of this package, so export never branches on a
runtime's name: `--bundle jetson,triton` picks entries of `TARGETS`, `all` takes every one
registered. Every target also checks what it wrote (`check`), with the runtime's own parser or an
emulation of its preprocessing where the runtime itself cannot run here.

A target module registers itself with `TARGETS.add(NAME, Target(...))`; every module of this
package is imported at the end of this file, so the registry is complete once the package is."""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ...core.registry import Registry


@dataclasses.dataclass(frozen=True)
class Target:
    """One runtime a bundle serves."""

    name: str  # the --bundle value: jetson, deepstream, triton, tensorrt, opencv, timm
    runtime: str  # words for the README table, e.g. "jetson-inference (imageNet / imagenet.py)"
    # writes its files under ctx.folder / name and returns what it wrote (one Entry per file a runtime loads)
    write: Callable[["BundleContext"], list["Entry"]]
    # problems found in what it wrote (empty = pass); images: uint8 NHWC RGB test images, or None
    check: Callable[["BundleContext", Optional[np.ndarray]], list[str]]


TARGETS: Registry[Target] = Registry("bundle target", flag="--bundle")


@dataclasses.dataclass
class BundleModel:
    """One ONNX file of the bundle and its sidecar's dict (deploy/writer.py `write`: `input`
    record, `classes`, `precision`, `output`, `quantization`, ...)."""

    path: Path  # the ONNX file inside the bundle
    info: dict

    @property
    def precision(self) -> str:
        return str(self.info.get("precision", "fp32"))

    @property
    def classifies(self) -> bool:
        """Whether the file outputs one score per class (an embedding output is not a classifier)."""
        return self.info.get("output") == "logits" and bool(self.info.get("classes"))


@dataclasses.dataclass
class BundleContext:
    """What every target's write and check see: the bundle folder and its models."""

    folder: Path  # the bundle folder (a target writes under folder / target.name)
    models: list[BundleModel]
    batch: int  # the largest batch the engines are built for

    @property
    def fp32(self) -> Optional[BundleModel]:
        """The first full-precision model of the bundle (fp32, or fp32 with 2:4 zeros), if any."""
        return next((m for m in self.models if m.precision.startswith("fp32")), None)

    @property
    def reference(self) -> BundleModel:
        """The model whose description (classes, input record) the bundle's shared files follow."""
        return self.fp32 or self.models[0]

    @property
    def classes(self) -> list[str]:
        return list(self.reference.info.get("classes") or [])

    @property
    def input(self) -> dict:
        """The preprocessing record every target's files are derived from (never typed twice)."""
        return dict(self.reference.info["input"])

    def rel(self, path: Path) -> str:
        """`path` relative to the bundle folder, as the README and manifest name it."""
        return Path(path).relative_to(self.folder).as_posix()


@dataclasses.dataclass
class Entry:
    """One file a runtime loads, for the bundle README's table."""

    target: str
    runtime: str
    file: str  # relative to the bundle folder
    command: str  # the exact command (or call) that loads it
    note: str = ""


def _import_all() -> None:
    """Import every target module of this package (each registers itself)."""
    for mod in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        importlib.import_module(f"{__name__}.{mod.name}")


_import_all()
