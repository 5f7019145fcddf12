"""Datasets by name. Each yields `(PIL image, label)` with label -1 when unknown and
carries what the rest of the pipeline needs to trust a cache: `classes`, `prompts`
(one text prompt per class for the zero-shot head) and `fingerprint()`.

Datasets that hold their pixels in memory also expose `data` (uint8, N x H x W x 3) so
students can train from the array without a PIL round trip per sample."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from PIL import Image

from ..errors import ConfigError, MissingResourceError
from ..network import reachable
from ..registry import Registry


@dataclass
class DatasetRequest:
    """Everything a factory may need; factories ignore what does not concern them."""

    name: str
    split: str
    root: str
    image_size: int = 32
    max_images: int = 0  # 0 = all; else the first N of the split


class FirstN:
    """The first `n` items of a dataset: quick trials on a slice of a big split."""

    def __init__(self, ds, n: int):
        self.ds, self.n = ds, min(n, len(ds))
        for attr in ("classes", "prompts", "templates", "split"):
            if hasattr(ds, attr):
                setattr(self, attr, getattr(ds, attr))
        if hasattr(ds, "data"):
            self.data = ds.data[: self.n]
        self.targets = np.asarray(ds.targets)[: self.n]

    def fingerprint(self) -> dict:
        return {**self.ds.fingerprint(), "first": self.n}

    def describe(self, i: int) -> str:
        return self.ds.describe(i) if hasattr(self.ds, "describe") else f"item {i}"

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.ds[i]


DATASETS: Registry[Callable[[DatasetRequest], Any]] = Registry("dataset", flag="--dataset")

# The study's prompts, in torchvision's STL10 class order (seed/NOTES.md).
STL10_PROMPTS = ["an airplane", "a bird", "a car", "a cat", "a deer", "a dog", "a horse", "a monkey",
                 "a ship", "a truck"]


def create_dataset(name: str, split: str, root: str, image_size: int = 32, max_images: int = 0):
    ds = DATASETS.get(name)(DatasetRequest(name=name, split=split, root=root, image_size=image_size,
                                           max_images=max_images))
    if max_images and len(ds) > max_images:
        ds = FirstN(ds, max_images)
    return ds


def dataset_splits(name: str) -> tuple[str, ...]:
    return {"stl10": ("train", "test", "unlabeled"), "shapes10": ("train", "unlabeled", "test")}.get(name, ())


# ----------------------------------------------------------------------------- shapes10

@DATASETS.register("shapes10")
def _shapes10(req: DatasetRequest):
    from .shapes10 import Shapes10

    from .shapes10 import SPLITS

    n = SPLITS[req.split].n if req.split in SPLITS else None
    # Generate only what is asked for: a slice of shapes10 is the same first images.
    ds = Shapes10(req.root, split=req.split, size=req.image_size,
                  n=min(n, req.max_images) if (n and req.max_images) else None)
    from ..teacher.tiny import TINY_PROMPT_TEMPLATES

    # Class names go into the templates, phrased as the tiny teacher's captions are.
    ds.prompts = list(ds.classes)
    ds.templates = list(TINY_PROMPT_TEMPLATES)
    return ds


# ----------------------------------------------------------------------------- STL10

class STL10Split:
    """torchvision's STL10 with HWC uint8 `data`, prompts and a fingerprint."""

    def __init__(self, root: str, split: str):
        from torchvision.datasets import STL10

        if split not in ("train", "test", "unlabeled"):
            raise ConfigError(f"--split {split!r}: STL10 has train, test, unlabeled")
        root_path = Path(root)
        folder = root_path / STL10.base_folder
        probe = STL10(str(root_path), split="test", download=False) if _stl10_present(root_path) else None
        if probe is None:
            if not reachable("cs.stanford.edu", 80) and not reachable("ai.stanford.edu", 80):
                raise MissingResourceError(
                    f"STL10 is not in {folder} and cannot be downloaded from here (no network). "
                    f"Download {STL10.url} (2.6 GB) elsewhere, extract it so that {folder}/train_X.bin, "
                    f"test_X.bin and unlabeled_X.bin exist, or pass --data-root to the folder that holds "
                    f"stl10_binary/.")
        ds = STL10(str(root_path), split=split, download=probe is None)
        self.split = split
        self.root = str(root_path)
        self.data = np.ascontiguousarray(ds.data.transpose(0, 2, 3, 1))  # N,3,H,W -> N,H,W,3
        self.targets = np.asarray(ds.labels, dtype=np.int64)
        self.classes = list(ds.classes)
        self.prompts = list(STL10_PROMPTS)

    def fingerprint(self) -> dict:
        return {"name": "stl10", "split": self.split, "n": len(self), "size": int(self.data.shape[1])}

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        return Image.fromarray(self.data[i]), int(self.targets[i])


def _stl10_present(root: Path) -> bool:
    folder = root / "stl10_binary"
    return all((folder / f).is_file() for f in ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin",
                                                 "unlabeled_X.bin", "class_names.txt"))


@DATASETS.register("stl10")
def _stl10(req: DatasetRequest):
    return STL10Split(req.root, req.split)


# ----------------------------------------------------------------------------- image folder

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


SPLIT_DIRS = ("train", "unlabeled", "test")


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


class ImageFolder:
    """A folder of images: sub-folders are classes; a flat folder is unlabeled (-1).

    With the common DIR/{train,unlabeled,test}/ layout each split reads its own folder, and
    every split labels classes by the train split's list, so a class missing from test/ can
    not shift the others. The test split is never the training images: without DIR/test/ it
    is refused instead of silently reading DIR. Every file is listed; unreadable ones are
    found when read and reported by the caller, never fatal."""

    def __init__(self, root: str, split: str):
        base = Path(root)
        if not base.is_dir():
            raise ConfigError(f"--data-root {root}: not a folder; give a folder of images "
                              f"(sub-folders as classes, or flat for unlabeled images)")
        by_split = [s for s in SPLIT_DIRS if (base / s).is_dir()]
        if (base / split).is_dir():
            folder = base / split
        elif split == "test":
            raise ConfigError(f"--data-root {root}: no test/ folder. Accuracy is measured on images kept apart from "
                              f"training: put them in {base / 'test'}/<class>/ (same class names as train)")
        elif by_split:
            raise ConfigError(f"--data-root {root}: no {split}/ folder beside {', '.join(d + '/' for d in by_split)}; "
                              f"add {base / split}/ or use the splits that exist")
        else:
            folder = base  # a single folder of images, for embed/predict-style use
        ref = base / "train" if (base / "train").is_dir() else folder
        self.classes = [d.name for d in _class_dirs(ref)]
        files: list[tuple[Path, int]] = []
        subdirs = _class_dirs(folder)
        if subdirs:
            unknown = [d.name for d in subdirs if d.name not in self.classes]
            if unknown:
                raise ConfigError(f"--data-root {folder}: class folders {', '.join(unknown)} are not classes of "
                                  f"{ref} ({', '.join(self.classes)}); every split must use the train split's "
                                  f"class names")
            for d in subdirs:
                label = self.classes.index(d.name)
                files += [(p, label) for p in sorted(d.rglob("*")) if _is_candidate(p)]
        else:
            files = [(p, -1) for p in sorted(folder.iterdir()) if _is_candidate(p)]
        if not files:
            raise ConfigError(f"--data-root {folder}: the folder is empty; put images in it (sub-folders as classes)")
        self.base = folder
        self.split = split
        self.files = [p for p, _ in files]
        self.targets = np.asarray([l for _, l in files], dtype=np.int64)
        self.prompts = [f"a photo of a {c.replace('_', ' ')}" for c in self.classes]

    def fingerprint(self) -> dict:
        h = hashlib.sha1()
        for p in self.files:
            st = p.stat()
            h.update(f"{p.relative_to(self.base)}|{st.st_size}|{int(st.st_mtime)}\n".encode())
        return {"name": "folder", "path": str(self.base.resolve()), "split": self.split, "n": len(self.files),
                "listing_sha1": h.hexdigest()}

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        """Raises OSError (PIL.UnidentifiedImageError is one) for an unreadable file."""
        with Image.open(self.files[i]) as im:
            return im.convert("RGB"), int(self.targets[i])

    def describe(self, i: int) -> str:
        return str(self.files[i])


def _is_candidate(p: Path) -> bool:
    """Every visible file is a candidate: one that is not an image is found out when read,
    then skipped and counted, rather than silently ignored."""
    return p.is_file() and not p.name.startswith(".")


@DATASETS.register("folder")
def _folder(req: DatasetRequest):
    return ImageFolder(req.root, req.split)


def read_prompts(path: Optional[str], classes: list[str], default: list[str]) -> list[str]:
    """Prompts from a file (one per line, class order) or the dataset's defaults."""
    if path is None:
        if not default:
            raise ConfigError("this dataset has no class names to build prompts from; pass --prompts FILE "
                              "with one prompt per class")
        return list(default)
    lines = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]
    if classes and len(lines) != len(classes):
        raise ConfigError(f"--prompts {path}: {len(lines)} prompts for {len(classes)} classes "
                          f"({', '.join(classes)}); give one line per class, in that order")
    if not lines:
        raise ConfigError(f"--prompts {path}: the file is empty; give one prompt per line")
    return lines


def dataset_slug(ds: Any) -> str:
    """A readable folder name for caches; the fingerprint in the manifest is the real key."""
    fp = ds.fingerprint()
    suffix = f"-first{fp['first']}" if "first" in fp else ""
    if fp["name"] == "shapes10":
        from .shapes10 import SPLITS

        default_n = SPLITS[fp["split"]].n if fp["split"] in SPLITS else fp["n"]
        return f"shapes10-{fp.get('size')}px" + (f"-first{fp['n']}" if fp["n"] != default_n else "")
    if fp["name"] == "folder":
        path = fp["path"]
        return f"folder-{Path(path).name}-{hashlib.sha1(path.encode()).hexdigest()[:8]}{suffix}"
    return fp["name"] + suffix


def default_data_root(cache_dir: str) -> str:
    return os.path.join(cache_dir, "data")
