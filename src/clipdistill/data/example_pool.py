"""An example of the job users come with, generated offline: a pool of unlabeled photos kept
as people keep them, prompts for a few of the classes in it, a labelled test folder, and labelled
images of the classes no prompt names (the look-alikes a deployed model must turn away).

`clipdistill make-pool --out DIR` writes

    DIR/pool/2024-0M/[burst/]img_NNNNN.png   shapes10 scenes of *all ten* classes, nested folders
    DIR/pool/copies/...                      byte-identical copies of some of them (as phones sync twice)
    DIR/pool/...                             a few broken files: truncated, empty, not an image
    DIR/eval/test/<class>/*.png              labelled images of the prompted classes only
    DIR/eval/unprompted/<class>/*.png        labelled images of the other classes: what passes as a
                                             prompted one (fit/lookalikes.py); never a class or a split
    DIR/classes.txt                          one prompt per prompted class, in test/'s sorted order

so `fit-prompts --prompts DIR/classes.txt --pool DIR/pool --eval DIR/eval` is the whole road
on a machine with no network. Most of the pool matches no prompt, as in real photo folders.
With `--shards N` the same pool is written as WebDataset tar shards instead,
DIR/shards/pool-{000..N-1}.tar (each image a sample `KEY.png` + `KEY.json` with its month; the
copies and broken files are members too), the form web-scale pools come in.

One make-pool per folder at a time: it holds DIR/.lock (core/locks.py) while it writes, and a
second one on the same DIR is refused at once, naming the folder (two used to exit 0 with their
files mixed)."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import numpy as np

from ..core import atomic
from ..core.config import check, option
from ..core.locks import owned_folder
from . import shapes10

log = logging.getLogger(__name__)

POOL_SEED = 5005  # a seed no other split of shapes10 uses
EVAL_SEED = 6006
UNPROMPTED_SEED = 7007  # eval/unprompted/: other scenes than eval/test/'s (EVAL_SEED's scene i is test image i)


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
    unprompted_per_class: int = option(40, "labelled images per class no prompt names, in eval/unprompted/<class>/ "
                                           "(what passes as a prompted class); 0 = none")
    seed: int = option(0, "which pool: the images, folders, copies and broken files")
    shards: int = option(0, "write the pool as this many WebDataset tar shards (DIR/shards/pool-NNN.tar) instead "
                            "of folders; 0 = folders")

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
        check(self.unprompted_per_class >= 0, "unprompted_per_class", "must be >= 0 (0 = no eval/unprompted/)")
        check(self.seed >= 0, "seed", "must be >= 0")
        check(self.shards >= 0, "shards", "must be >= 0 (0 = folders)")


def _render(n: int, size: int, seed: int, labels: np.ndarray) -> np.ndarray:
    images = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        images[i] = shapes10._render(shapes10._scene_rng(seed, i), size, int(labels[i])).image
    return images


def _png_bytes(image: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _png(path: Path, image: np.ndarray) -> None:
    atomic.write_bytes(path, _png_bytes(image))


class _ShardSink:
    """Pool members into `shards` tar files, round-robin by sample, written with webdataset's
    TarWriter (each file becomes a temporary name until it is complete)."""

    def __init__(self, folder: Path, shards: int):
        import webdataset as wds

        folder.mkdir(parents=True, exist_ok=True)
        self.final = [folder / f"pool-{k:03d}.tar" for k in range(shards)]
        self.tmp = [p.with_name(p.name + ".part") for p in self.final]
        self.writers = [wds.TarWriter(str(t), encoder=False, mtime=0) for t in self.tmp]
        self.n = 0

    def write(self, key: str, members: dict[str, bytes]) -> None:
        self.writers[self.n % len(self.writers)].write({"__key__": key, **members})
        self.n += 1

    def close(self) -> str:
        import os

        for w, t, f in zip(self.writers, self.tmp, self.final):
            w.close()
            os.replace(t, f)
        return str(self.final[0].parent / f"pool-{{000..{len(self.final) - 1:03d}}}.tar")


def make_pool(cfg: PoolConfig) -> dict:
    """Write the example (replacing an earlier one in the same folder) and say what is where.
    The truth about every pool file (its class) goes to DIR/truth.json, for diagnostics only:
    nothing in fit-prompts reads it. Refused (LockedError) while another make-pool writes DIR."""
    with owned_folder(cfg.out, "make-pool") as out:
        return _make_pool(cfg, out)


def _make_pool(cfg: PoolConfig, out: Path) -> dict:
    from ..core.progress import bar

    for sub in ("pool", "eval", "shards"):
        shutil.rmtree(out / sub, ignore_errors=True)
    rng = np.random.default_rng([cfg.seed, POOL_SEED])
    n_cls = len(shapes10.CLASSES)
    labels = rng.permutation(np.arange(cfg.images) % n_cls)
    images = _render(cfg.images, cfg.size, POOL_SEED + 1000 * cfg.seed, labels)
    months = [f"2024-{m:02d}" for m in range(1, 7)]
    truth: dict[str, str] = {}
    rels = []
    sink = _ShardSink(out / "shards", cfg.shards) if cfg.shards else None

    def put(rel: str, data: bytes) -> None:
        if sink is None:
            atomic.write_bytes(out / "pool" / rel, data)
        else:  # one sample per file: the image under its suffix, where it was kept as metadata
            key, suffix = rel.rsplit(".", 1)
            sink.write(key.replace("/", "_").replace(" ", "_"),
                       {suffix: data, "json": json.dumps({"folder": rel.rsplit("/", 1)[0]}).encode()})

    for i in bar(range(cfg.images), desc="write pool", unit="img", leave=False):
        folder = months[rng.integers(len(months))]
        if rng.random() < 0.2:
            folder += "/burst"  # deeper nesting, as camera bursts are kept
        rel = f"{folder}/img_{i:05d}.png"
        put(rel, _png_bytes(images[i]))
        rels.append(rel)
        truth[rel] = shapes10.CLASSES[labels[i]]
    for j, i in enumerate(rng.choice(cfg.images, cfg.duplicates, replace=False)):
        rel = f"copies/{months[j % len(months)]}/IMG_{j:04d} (1).png"
        put(rel, _png_bytes(images[i]))
        truth[rel] = shapes10.CLASSES[labels[i]]
    broken = []
    for j in range(cfg.broken):
        kind = ("truncated", "empty", "text")[j % 3]
        rel = f"{months[j % len(months)]}/broken_{j}_{kind}{'.png' if kind != 'text' else '.txt'}"
        data = _png_bytes(images[j])[:60] if kind == "truncated" else b"" if kind == "empty" else \
            b"notes from the trip\n"
        put(rel, data)
        broken.append(rel)
    pool = sink.close() if sink is not None else str(out / "pool")
    prompted = [c for c in shapes10.CLASSES if c in cfg.classes]  # sorted as test/ is read: alphabetical
    prompted = sorted(prompted)
    test_labels = np.repeat([shapes10.CLASSES.index(c) for c in prompted], cfg.test_per_class)
    test = _render(len(test_labels), cfg.size, EVAL_SEED + 1000 * cfg.seed, test_labels)
    for i, (im, y) in enumerate(zip(test, test_labels)):
        _png(out / "eval" / "test" / shapes10.CLASSES[y] / f"{i:05d}.png", im)
    # The classes no prompt names, labelled the same way, beside test/ (never in it: not a class).
    others = [c for c in shapes10.CLASSES if c not in prompted] if cfg.unprompted_per_class else []
    other_labels = np.repeat([shapes10.CLASSES.index(c) for c in others], cfg.unprompted_per_class).astype(np.int64)
    for i, (im, y) in enumerate(zip(_render(len(other_labels), cfg.size, UNPROMPTED_SEED + 1000 * cfg.seed,
                                            other_labels), other_labels)):
        _png(out / "eval" / "unprompted" / shapes10.CLASSES[y] / f"{i:05d}.png", im)
    atomic.write_text(out / "classes.txt", "".join(f"a {c}\n" for c in prompted))
    atomic.write_json(out / "truth.json", {"pool": truth, "broken": broken, "prompted": prompted,
                                           "unprompted": others})
    matching = int(np.isin(labels, [shapes10.CLASSES.index(c) for c in prompted]).sum())
    return {"out": str(out), "pool": pool, "eval": str(out / "eval"), "prompts": str(out / "classes.txt"),
            "images": cfg.images, "duplicates": cfg.duplicates, "broken": cfg.broken, "matching_prompts": matching,
            "classes": prompted, "test_images": int(len(test_labels)), "unprompted_classes": others,
            "unprompted_images": int(len(other_labels))}
