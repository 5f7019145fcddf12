"""An unlabeled pool: any trees of images, indexed once, each distinct image counted once.

Photos are kept in folders by date, camera or trip, synced twice, mixed with sidecar files
and the odd broken download. A pool is therefore read recursively (its sub-folders never
mean classes; hidden files and folders are skipped), and indexed: every file's path, size,
modification time and the SHA-1 of its bytes, and whether Pillow can decode it. Identical
bytes are one image (embedded once, trained on once: the first path in sorted order stands
for them); files that cannot be decoded are listed with the reason and left out. The index
is written atomically under the cache folder and reused for unchanged files (same path,
size and mtime), so a second run reads no image twice. Its counts are what `fit-prompts`
prints.

The pool's fingerprint is the sorted list of content hashes: renaming or moving photos
keeps every cache made from it; adding, removing or editing one makes new caches."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..core import atomic
from ..core.errors import ClipDistillError, ConfigError
from .images import display_path, open_rgb
from .protocol import FileDataset

log = logging.getLogger(__name__)

INDEX_FORMAT = 1


def _walk(root: Path) -> list[Path]:
    """Every visible file under `root`, sorted; hidden files and folders (.thumbnails, .git) skipped."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".")]
    return out


def _sha1(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class PoolIndex:
    """What a pool holds: `images` (one path per distinct readable image, in a fixed order),
    `duplicates` (path -> the image it repeats) and `broken` (path -> why it was left out)."""

    roots: list[str]
    images: list[str] = field(default_factory=list)
    hashes: list[str] = field(default_factory=list)
    duplicates: dict[str, str] = field(default_factory=dict)
    broken: dict[str, str] = field(default_factory=dict)
    files: int = 0

    def counts(self) -> dict:
        return {"files": self.files, "images": len(self.images), "duplicates": len(self.duplicates),
                "broken": len(self.broken)}

    def summary(self) -> str:
        c = self.counts()
        return (f"{c['files']} files in {', '.join(self.roots)}: {c['images']} distinct images, {c['duplicates']} "
                f"duplicates (embedded once), {c['broken']} broken or not images (skipped"
                + (f", e.g. {next(iter(self.broken))}: {next(iter(self.broken.values()))})" if self.broken else ")"))

    def fingerprint(self) -> dict:
        h = hashlib.sha1("\n".join(sorted(self.hashes)).encode()).hexdigest()
        return {"name": "pool", "n": len(self.images), "content_sha1": h}


def index_path(cache_dir: str | os.PathLike, roots: Sequence[str | os.PathLike]) -> Path:
    key = hashlib.sha1("\n".join(sorted(os.fsencode(Path(r).resolve()).hex() for r in roots)).encode()).hexdigest()
    return Path(cache_dir) / "pools" / f"{key[:16]}.json"


def _previous(path: Optional[Path]) -> dict:
    """The last index's entries by path, if it can be read (only a cache: anything odd is ignored)."""
    if path is None or not path.is_file():
        return {}
    try:
        old = atomic.read_json(path)
        if old.get("format") == INDEX_FORMAT:
            return {e["path"]: e for e in old.get("entries", []) if isinstance(e, dict) and "path" in e}
    except (ClipDistillError, AttributeError, TypeError):
        pass
    log.debug("the pool index %s could not be reused; indexing again", path)
    return {}


def index_pool(roots: Sequence[str | os.PathLike], cache_dir: Optional[str | os.PathLike] = None,
               progress: bool = False) -> PoolIndex:
    """Index the pool's folders (reusing the cached index for unchanged files)."""
    from tqdm import tqdm

    dirs = [Path(r) for r in roots]
    for d in dirs:
        if not d.is_dir():
            raise ConfigError(f"--pool {d}: not a folder; give a folder of images (sub-folders of any depth)")
    cache = index_path(cache_dir, dirs) if cache_dir else None
    before = _previous(cache)
    files = [p for d in dirs for p in _walk(d)]
    if not files:
        raise ConfigError(f"--pool {', '.join(map(str, dirs))}: no files in it; put your images there "
                          f"(sub-folders of any depth)")
    entries = []
    for p in tqdm(files, desc="index pool", unit="file", disable=not progress, leave=False):
        key = display_path(p.resolve())
        st = p.stat()
        old = before.get(key)
        if old and old.get("size") == st.st_size and old.get("mtime_ns") == st.st_mtime_ns:
            entries.append(old)
            continue
        entry = {"path": key, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha1": _sha1(p), "error": None}
        try:
            open_rgb(p)
        except OSError as e:
            entry["error"] = str(e)[:200] or type(e).__name__
        entry["file"] = os.fsencode(p.resolve()).hex()  # the real bytes of a non-UTF-8 name
        entries.append(entry)
    idx = PoolIndex(roots=[display_path(d) for d in dirs], files=len(entries))
    first: dict[str, str] = {}
    for e in entries:
        if e["error"]:
            idx.broken[e["path"]] = e["error"]
        elif e["sha1"] in first:
            idx.duplicates[e["path"]] = first[e["sha1"]]
        else:
            first[e["sha1"]] = e["path"]
            idx.images.append(e["file"])
            idx.hashes.append(e["sha1"])
    if cache is not None:
        try:
            atomic.write_json(cache, {"format": INDEX_FORMAT, "roots": idx.roots, "entries": entries})
        except OSError as e:  # a read-only cache folder: the index is only a speed-up
            log.warning("could not save the pool index %s (%s); it is rebuilt next time", cache, e.strerror)
    log.debug("pool: %s", idx.summary())
    return idx


class PoolDataset(FileDataset):
    """The distinct readable images of a pool, as the unlabeled split (labels -1). Its classes
    are the caller's (a labelled folder's, or the prompts)."""

    name = "pool"

    def __init__(self, index: PoolIndex, classes: Sequence[str] = (), split: str = "unlabeled"):
        if not index.images:
            raise ConfigError(f"--pool {', '.join(index.roots)}: none of its {index.files} files is an image that "
                              f"can be read ({len(index.broken)} broken); put readable images there")
        self.index = index
        self.split = split
        self.files = [Path(os.fsdecode(bytes.fromhex(f))) for f in index.images]
        self.targets = np.full(len(self.files), -1, dtype=np.int64)
        self.classes = list(classes)
        self.prompts = self.default_prompts()

    def fingerprint(self) -> dict:
        return self.index.fingerprint()

    def slug(self) -> str:
        return f"pool-{self.index.fingerprint()['content_sha1'][:10]}"
