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

Tar shards (`--pool 'shards/pool-{000..099}.tar'`, WebDataset's form) enter the same index:
each image member is an image like a file (hashed, deduplicated against everything else,
test-decoded; a shard that breaks off is listed as broken after its last good member), read as
a stream with the `webdataset` library (data/shards.py); an unchanged shard (same size and
mtime) is not read again.

The pool's fingerprint is the sorted list of content hashes: renaming or moving photos
keeps every cache made from it; adding, removing or editing one makes new caches."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..core import atomic
from ..core.errors import ClipDistillError, ConfigError
from . import shards as tar_shards
from .images import display_path, open_rgb
from .protocol import FileDataset

log = logging.getLogger(__name__)

INDEX_FORMAT = 2


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
    """What a pool holds: `images` (the real name of each distinct readable image, a file path
    or a shard member's locator, in a fixed order),
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


# An index row: [display path, size, mtime_ns, sha1, error or None, real name as hex or None].
# Rows are lists, not dicts, and the file is compact JSON: a pool of 200,000 images costs tens of
# MB to index and to reuse, not the ~3 KB an image that dicts and indented JSON took.
PATH, SIZE, MTIME, SHA1, ERROR, NAME = range(6)


def _row(path: str, size: int, mtime_ns: int, sha1: str, error: Optional[str], real: str | os.PathLike) -> list:
    name = os.fsencode(real)
    return [path, size, mtime_ns, sha1, error, None if name == path.encode("utf-8", "surrogateescape") else name.hex()]


def _real_name(row: list) -> str:
    return row[PATH] if row[NAME] is None else os.fsdecode(bytes.fromhex(row[NAME]))


def _previous(path: Optional[Path]) -> tuple[dict, dict]:
    """The last index's file rows by path and shard groups by shard, if it can be read (only a
    cache: anything odd is ignored)."""
    if path is None or not path.is_file():
        return {}, {}
    try:
        old = atomic.read_json(path)
        if old.get("format") == INDEX_FORMAT:
            files = {r[PATH]: r for r in old["files"] if isinstance(r, list) and len(r) == 6}
            shards = {k: g for k, g in old["shards"].items() if isinstance(g, dict) and isinstance(g.get("rows"), list)}
            return files, shards
    except (ClipDistillError, AttributeError, TypeError, KeyError, IndexError):
        pass
    log.debug("the pool index %s could not be reused; indexing again", path)
    return {}, {}


def index_pool(roots: Sequence[str | os.PathLike], cache_dir: Optional[str | os.PathLike] = None,
               progress: bool = False) -> PoolIndex:
    """Index the pool's folders and shards (reusing the cached index for unchanged files)."""
    from tqdm import tqdm

    specs = [os.fspath(r) for r in roots]
    dirs = [Path(r) for r in specs if not tar_shards.is_shard_spec(r)]
    for d in dirs:
        if not d.is_dir():
            raise ConfigError(f"--pool {d}: not a folder; give a folder of images (sub-folders of any depth) or "
                              f"tar shards (pool-{{000..099}}.tar)")
    shards = [s for r in specs if tar_shards.is_shard_spec(r) for s in tar_shards.expand(r)]
    cache = index_path(cache_dir, specs) if cache_dir else None
    before_files, before_shards = _previous(cache)
    files = [p for d in dirs for p in _walk(d)]
    if not files and not shards:
        raise ConfigError(f"--pool {', '.join(map(str, dirs))}: no files in it; put your images there "
                          f"(sub-folders of any depth)")
    rows, groups, reused = [], {}, 0
    for p in tqdm(files, desc="index pool", unit="file", disable=not progress, leave=False):
        real = p.resolve()
        key = display_path(real)
        st = p.stat()
        old = before_files.get(key)
        if old and old[SIZE] == st.st_size and old[MTIME] == st.st_mtime_ns:
            rows.append(old)
            reused += 1
            continue
        error = None
        try:
            open_rgb(p)
        except OSError as e:
            error = str(e)[:200] or type(e).__name__
        rows.append(_row(key, st.st_size, st.st_mtime_ns, _sha1(p), error, real))
    for shard in tqdm(shards, desc="index shards", unit="shard", disable=not progress or not shards, leave=False):
        name, group, again = _shard_group(shard, before_shards)
        groups[name] = group
        reused += again
    idx = PoolIndex(roots=[display_path(r) for r in specs],
                    files=len(rows) + sum(len(g["rows"]) for g in groups.values()))
    first: dict[str, str] = {}
    for r in (r for part in (rows, *(g["rows"] for g in groups.values())) for r in part):
        if r[ERROR]:
            idx.broken[r[PATH]] = r[ERROR]
        elif r[SHA1] in first:
            idx.duplicates[r[PATH]] = first[r[SHA1]]
        else:
            first[r[SHA1]] = r[PATH]
            idx.images.append(_real_name(r))
            idx.hashes.append(r[SHA1])
    unchanged = reused == idx.files == len(before_files) + sum(len(g["rows"]) for g in before_shards.values())
    if cache is not None and not unchanged:
        try:
            atomic.write_text(cache, json.dumps({"format": INDEX_FORMAT, "roots": idx.roots, "files": rows,
                                                 "shards": groups}, separators=(",", ":")))
        except OSError as e:  # a read-only cache folder: the index is only a speed-up
            log.warning("could not save the pool index %s (%s); it is rebuilt next time", cache, e.strerror)
    log.debug("pool: %s", idx.summary())
    return idx


def _shard_group(shard: Path, before: dict) -> tuple[str, dict, int]:
    """One tar shard's rows (reused when the shard is unchanged, else streamed), as
    (display name, {"size", "mtime_ns", "rows"}, rows reused)."""
    import io

    shard = shard.resolve()
    st = shard.stat()
    name = display_path(shard)
    old = before.get(name)
    if old and old.get("size") == st.st_size and old.get("mtime_ns") == st.st_mtime_ns:
        return name, old, len(old["rows"])
    rows, n = [], 0
    for member, data, broke in tar_shards.stream_members(shard):
        if broke is not None:  # the shard ends here: what came before it is kept
            rows.append([f"{name} (after member {n})", 0, 0, "", broke, None])
            break
        n += 1
        loc = tar_shards.locator(shard, member)
        error = None
        try:
            open_rgb(io.BytesIO(data))
        except OSError as e:
            error = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "it", str(e))[:200] or type(e).__name__
        rows.append(_row(display_path(loc), len(data), 0, hashlib.sha1(data).hexdigest(), error, loc))
    return name, {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "rows": rows}, 0


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
        self.files = [n if tar_shards.split_locator(n) else Path(n) for n in index.images]  # members stay text
        self.targets = np.full(len(self.files), -1, dtype=np.int64)
        self.classes = list(classes)
        self.prompts = self.default_prompts()

    def fingerprint(self) -> dict:
        return self.index.fingerprint()

    def load(self, i: int):
        """A file, or a member of a tar shard (read by its offset: data/shards.py)."""
        loc = tar_shards.split_locator(os.fspath(self.files[i]))
        if loc is None:
            return open_rgb(self.files[i])
        import io

        return open_rgb(io.BytesIO(tar_shards.read_member(os.fspath(self.files[i]))))

    def slug(self) -> str:
        return f"pool-{self.index.fingerprint()['content_sha1'][:10]}"
