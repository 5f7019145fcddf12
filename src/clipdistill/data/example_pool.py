"""An example of the job users come with, generated offline: a pool of unlabeled photos kept
as people keep them, prompts for a few of the classes in it, and a labelled test folder.

`clipdistill make-pool --out DIR` writes

    DIR/pool/2024-0M/[burst/]img_NNNNN.png   shapes10 scenes of *all ten* classes, nested folders
    DIR/pool/copies/...                      byte-identical copies of some of them (as phones sync twice)
    DIR/pool/...                             a few broken files: truncated, empty, not an image
    DIR/eval/test/<class>/*.png              labelled images of the prompted classes only
    DIR/classes.txt                          one prompt per prompted class, in test/'s sorted order

so `fit-prompts --prompts DIR/classes.txt --pool DIR/pool --eval DIR/eval` is the whole road
on a machine with no network. Most of the pool matches no prompt, as in real photo folders."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import numpy as np

from ..core import atomic
from ..core.config import check, option
from . import shapes10

log = logging.getLogger(__name__)

POOL_SEED = 5005  # a seed no other split of shapes10 uses
EVAL_SEED = 6006


@dataclasses.dataclass
class PoolConfig:
    out: str = option("", "folder to write pool/, eval/ and classes.txt into", metavar="DIR")
    images: int = option(3000, "distinct images in the pool (all ten shapes10 classes, balanced)")
    size: int = option(64, "side of the images in pixels")
    classes: list[str] = option(default_factory=lambda: ["circle", "star", "heart", "crescent"],
                                help="the classes to prompt for (and to label in eval/test/), comma-separated; "
                                     f"any of {', '.join(shapes10.CLASSES)}")
    duplicates: int = option(150, "byte-identical copies of pool images, under other names and folders")
    broken: int = option(6, "broken files in the pool (truncated, empty, not an image)")
    test_per_class: int = option(200, "labelled eval images per prompted class")
    seed: int = option(0, "which pool: the images, folders, copies and broken files")

    def __post_init__(self) -> None:
        check(bool(self.out), "out", "give the folder to write, e.g. --out my-pool")
        check(self.images >= 10, "images", "must be >= 10")
        check(self.size >= 16, "size", "must be >= 16 pixels")
        unknown = [c for c in self.classes if c not in shapes10.CLASSES]
        check(not unknown, "classes", f"{', '.join(unknown)}: not shapes10 classes ({', '.join(shapes10.CLASSES)})")
        check(len(set(self.classes)) >= 2, "classes", "give at least two distinct classes")
        check(0 <= self.duplicates <= self.images, "duplicates", "must be between 0 and --images")
        check(self.broken >= 0, "broken", "must be >= 0")
        check(self.test_per_class >= 1, "test_per_class", "must be >= 1")
        check(self.seed >= 0, "seed", "must be >= 0")


def _render(n: int, size: int, seed: int, labels: np.ndarray) -> np.ndarray:
    images = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        images[i] = shapes10._render(shapes10._scene_rng(seed, i), size, int(labels[i])).image
    return images


def _png(path: Path, image: np.ndarray) -> None:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    atomic.write_bytes(path, buf.getvalue())


def make_pool(cfg: PoolConfig) -> dict:
    """Write the example (replacing an earlier one in the same folder) and say what is where.
    The truth about every pool file (its class) goes to DIR/truth.json, for diagnostics only:
    nothing in fit-prompts reads it."""
    from tqdm import tqdm

    out = Path(cfg.out)
    for sub in ("pool", "eval"):
        shutil.rmtree(out / sub, ignore_errors=True)
    rng = np.random.default_rng([cfg.seed, POOL_SEED])
    n_cls = len(shapes10.CLASSES)
    labels = rng.permutation(np.arange(cfg.images) % n_cls)
    images = _render(cfg.images, cfg.size, POOL_SEED + 1000 * cfg.seed, labels)
    months = [f"2024-{m:02d}" for m in range(1, 7)]
    truth: dict[str, str] = {}
    paths = []
    for i in tqdm(range(cfg.images), desc="write pool", unit="img", leave=False):
        folder = out / "pool" / months[rng.integers(len(months))]
        if rng.random() < 0.2:
            folder = folder / "burst"  # deeper nesting, as camera bursts are kept
        p = folder / f"img_{i:05d}.png"
        _png(p, images[i])
        paths.append(p)
        truth[str(p.relative_to(out / "pool"))] = shapes10.CLASSES[labels[i]]
    for j, i in enumerate(rng.choice(cfg.images, cfg.duplicates, replace=False)):
        q = out / "pool" / "copies" / months[j % len(months)] / f"IMG_{j:04d} (1).png"
        q.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(paths[i], q)
        truth[str(q.relative_to(out / "pool"))] = shapes10.CLASSES[labels[i]]
    broken = []
    for j in range(cfg.broken):
        kind = ("truncated", "empty", "text")[j % 3]
        q = out / "pool" / months[j % len(months)] / f"broken_{j}_{kind}" \
            f"{'.png' if kind != 'text' else '.txt'}"
        data = paths[j].read_bytes()[:60] if kind == "truncated" else b"" if kind == "empty" else \
            b"notes from the trip\n"
        atomic.write_bytes(q, data)
        broken.append(str(q.relative_to(out / "pool")))
    prompted = [c for c in shapes10.CLASSES if c in cfg.classes]  # sorted as test/ is read: alphabetical
    prompted = sorted(prompted)
    test_labels = np.repeat([shapes10.CLASSES.index(c) for c in prompted], cfg.test_per_class)
    test = _render(len(test_labels), cfg.size, EVAL_SEED + 1000 * cfg.seed, test_labels)
    for i, (im, y) in enumerate(zip(test, test_labels)):
        _png(out / "eval" / "test" / shapes10.CLASSES[y] / f"{i:05d}.png", im)
    atomic.write_text(out / "classes.txt", "".join(f"a {c}\n" for c in prompted))
    atomic.write_json(out / "truth.json", {"pool": truth, "broken": broken, "prompted": prompted})
    matching = int(np.isin(labels, [shapes10.CLASSES.index(c) for c in prompted]).sum())
    return {"out": str(out), "pool": str(out / "pool"), "eval": str(out / "eval"), "prompts": str(out / "classes.txt"),
            "images": cfg.images, "duplicates": cfg.duplicates, "broken": cfg.broken, "matching_prompts": matching,
            "classes": prompted, "test_images": int(len(test_labels))}
