"""Datasets by name: a registry of factories, each returning an `ImageDataset` (see
protocol.py) for one split. `create_dataset(name, split, root, ...)` is the one entry.

- `shapes10`: the offline synthetic world (shapes10.py), generated on first use.
- `stl10`: the study's dataset through torchvision; offline, it fails at once saying where
  to put the files.
- `folder`: your images, `DIR/{train,unlabeled,test}/` with class sub-folders (or a flat
  folder of unlabeled images)."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..core.errors import ConfigError, MissingResourceError, MissingSplitError
from ..core.network import reachable
from ..core.registry import Registry
from .images import display_path
from .protocol import FileDataset, ImageDataset, InMemoryDataset

log = logging.getLogger(__name__)


@dataclass
class DatasetRequest:
    """Everything a factory may need; factories ignore what does not concern them."""

    name: str
    split: str
    root: str
    image_size: int = 32
    max_images: int = 0  # 0 = all; else the first N of the split
    pools: tuple[str, ...] = ()  # folder: more unlabeled trees of images (--pool)
    cache_dir: Optional[str] = None  # where a pool's index is kept (none: indexed in memory only)


DATASETS: Registry[Callable[[DatasetRequest], ImageDataset]] = Registry("dataset", flag="--dataset")


def create_dataset(name: str, split: str, root: str, image_size: int = 32, max_images: int = 0,
                   pools: tuple[str, ...] = (), cache_dir: Optional[str] = None) -> ImageDataset:
    ds = DATASETS.get(name)(DatasetRequest(name=name, split=split, root=root, image_size=image_size,
                                           max_images=max_images, pools=tuple(pools), cache_dir=cache_dir))
    if max_images and len(ds) > max_images:
        ds = FirstN(ds, max_images)
    if cache_dir and ds.native_size is None:
        ds.store_dir = str(cache_dir)  # files: decoded once into the pixel store, shared by every run
    return ds


def default_data_root(cache_dir: str) -> str:
    return os.path.join(cache_dir, "data")


class FirstN(ImageDataset):
    """The first `n` items of a dataset: quick trials on a slice of a big split."""

    def __init__(self, ds: ImageDataset, n: int):
        self.ds, self.n = ds, min(n, len(ds))
        self.name, self.split = ds.name, ds.split
        self.classes, self.prompts, self.templates = ds.classes, ds.prompts, ds.templates
        self.targets = np.asarray(ds.targets)[: self.n]
        self.native_size = ds.native_size

    def __len__(self) -> int:
        return self.n

    def load(self, i: int):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.ds.load(i)

    def fingerprint(self) -> dict:
        return {**self.ds.fingerprint(), "first": self.n}

    def slug(self) -> str:
        return f"{self.ds.slug()}-first{self.n}"

    def describe(self, i: int) -> str:
        return self.ds.describe(i)

    def pixels(self, decode_size: Optional[int] = None, progress: bool = False):
        if self.native_size is not None:
            return self.ds.pixels(decode_size, progress)[: self.n]
        return super().pixels(decode_size, progress)


# ----------------------------------------------------------------------------- shapes10

@DATASETS.register("shapes10")
def _shapes10(req: DatasetRequest) -> ImageDataset:
    from .shapes10 import SPLITS, Shapes10, check_split

    check_split(req.split)
    n = SPLITS[req.split].n
    # Generate only what is asked for: a slice of shapes10 is the same first images.
    return Shapes10(req.root, split=req.split, size=req.image_size,
                    n=min(n, req.max_images) if req.max_images else None)


# ----------------------------------------------------------------------------- STL10

# The study's prompts, in torchvision's STL10 class order (seed/NOTES.md).
STL10_PROMPTS = ["an airplane", "a bird", "a car", "a cat", "a deer", "a dog", "a horse", "a monkey",
                 "a ship", "a truck"]


class STL10Split(InMemoryDataset):
    """torchvision's STL10 with HWC uint8 `data` and the study's prompts."""

    name = "stl10"

    def __init__(self, root: str, split: str):
        from torchvision.datasets import STL10

        if split not in ("train", "test", "unlabeled"):
            raise ConfigError(f"--split {split!r}: STL10 has train, test, unlabeled")
        root_path = Path(root)
        folder = root_path / STL10.base_folder
        present = _stl10_present(root_path)
        if not present and not reachable("cs.stanford.edu", 80) and not reachable("ai.stanford.edu", 80):
            raise MissingResourceError(
                f"STL10 is not in {folder} and cannot be downloaded from here (no network). "
                f"Download {STL10.url} (2.6 GB) elsewhere, extract it so that {folder}/train_X.bin, "
                f"test_X.bin and unlabeled_X.bin exist, or pass --data-root to the folder that holds "
                f"stl10_binary/.")
        ds = STL10(str(root_path), split=split, download=not present)
        self.split = split
        self.data = np.ascontiguousarray(ds.data.transpose(0, 2, 3, 1))  # N,3,H,W -> N,H,W,3
        self.targets = np.asarray(ds.labels, dtype=np.int64)
        self.classes = list(ds.classes)
        self.prompts = list(STL10_PROMPTS)

    def fingerprint(self) -> dict:
        return {"name": "stl10", "split": self.split, "n": len(self), "size": self.native_size}

    def slug(self) -> str:
        return "stl10"


def _stl10_present(root: Path) -> bool:
    folder = root / "stl10_binary"
    return all((folder / f).is_file() for f in ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin",
                                                 "unlabeled_X.bin", "class_names.txt"))


@DATASETS.register("stl10")
def _stl10(req: DatasetRequest) -> ImageDataset:
    return STL10Split(req.root, req.split)


# ----------------------------------------------------------------------------- image folder

SPLIT_DIRS = ("train", "unlabeled", "test")


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _is_candidate(p: Path) -> bool:
    """Every visible file is a candidate: one that is not an image is found out when read,
    then skipped and counted, rather than silently ignored."""
    return p.is_file() and not p.name.startswith(".")


class ImageFolder(FileDataset):
    """A labelled split of a folder of images: sub-folders are classes; a flat folder is
    unlabeled (-1). The unlabeled split is a pool (pool.py), whose sub-folders are never classes.

    With the common DIR/{train,unlabeled,test}/ layout each split reads its own folder, and
    every split labels classes by the train split's list, so a class missing from test/ can
    not shift the others. The test split is never the training images: without DIR/test/ it
    is refused instead of silently reading DIR. Every file is listed; unreadable ones are
    found when read and reported by the caller, never fatal."""

    name = "folder"

    def __init__(self, root: str, split: str):
        base = Path(root)
        if not root and split == "test":
            raise MissingSplitError("no labelled test images (give --data-root or --eval DIR with test/<class>/)",
                                    split)
        if not base.is_dir():
            raise ConfigError(f"--data-root {root}: not a folder; give a folder of images "
                              f"(sub-folders as classes, or flat for unlabeled images)")
        by_split = [s for s in SPLIT_DIRS if (base / s).is_dir()]
        if (base / split).is_dir():
            folder = base / split
        elif split == "test":
            raise MissingSplitError(f"--data-root {root}: no test/ folder. Accuracy is measured on images kept apart "
                              f"from training: put them in {base / 'test'}/<class>/ (same class names as train)", split)
        elif by_split:
            raise MissingSplitError(f"--data-root {root}: no {split}/ folder beside "
                              f"{', '.join(d + '/' for d in by_split)}; "
                              f"add {base / split}/ or use the splits that exist", split)
        else:
            folder = base  # a single folder of images, for embed/predict-style use
        ref = base / "train" if (base / "train").is_dir() else folder
        files: list[tuple[Path, int]] = []
        self.classes = [d.name for d in _class_dirs(ref)]
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
        self.targets = np.asarray([label for _, label in files], dtype=np.int64)
        self.prompts = self.default_prompts()

    def fingerprint(self) -> dict:
        h = hashlib.sha1()
        for p in self.files:
            st = p.stat()
            # bytes, not text: a file name that is not valid UTF-8 still hashes
            h.update(os.fsencode(p.relative_to(self.base)) + f"|{st.st_size}|{int(st.st_mtime)}\n".encode())
        return {"name": "folder", "path": display_path(self.base.resolve()), "split": self.split,
                "n": len(self.files), "listing_sha1": h.hexdigest()}

    def slug(self) -> str:
        path = os.fsencode(self.base.resolve().parent if self.base.name == self.split else self.base.resolve())
        return f"folder-{display_path(Path(os.fsdecode(path)).name)}-{hashlib.sha1(path).hexdigest()[:8]}"



@DATASETS.register("folder")
def _folder(req: DatasetRequest) -> ImageDataset:
    if req.split == "unlabeled":
        return _pool(req)
    return ImageFolder(req.root, req.split)


def _pool(req: DatasetRequest) -> ImageDataset:
    """The unlabeled split: DIR/unlabeled/** (or a DIR without split folders) plus every --pool,
    indexed and deduplicated (pool.py). Its classes are the labelled splits' (or the prompts')."""
    from .pool import PoolDataset, index_pool

    base = Path(req.root) if req.root else None
    dirs: list[Path] = []
    classes: list[str] = []
    if base is not None and base.is_dir():
        by_split = [s for s in SPLIT_DIRS if (base / s).is_dir()]
        ref = next((base / s for s in ("train", "test") if (base / s).is_dir()), None)
        classes = [d.name for d in _class_dirs(ref)] if ref else []
        if (base / "unlabeled").is_dir():
            dirs.append(base / "unlabeled")
        elif not by_split and not req.pools:
            dirs.append(base)  # a single folder of images
        elif not req.pools:
            raise MissingSplitError(f"--data-root {req.root}: no unlabeled/ folder beside "
                                    f"{', '.join(d + '/' for d in by_split)}; add {base / 'unlabeled'}/ (any tree "
                                    f"of images) or give --pool DIR", "unlabeled")
    elif base is not None and not req.pools:
        raise ConfigError(f"--data-root {req.root}: not a folder; give a folder of images (sub-folders as classes, "
                          f"or flat for unlabeled images)")
    dirs += [Path(p) for p in req.pools]
    return PoolDataset(index_pool(dirs, req.cache_dir), classes)
