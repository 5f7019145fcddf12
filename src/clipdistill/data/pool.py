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

The walk trusts nothing about the tree: linked folders are followed, but each folder is
entered once (two links to `.` once grew memory by 1 GB a minute); only regular files are
read (a FIFO or a link to /dev/zero named `.png` is listed, never opened); a dangling link, a
file or a folder that cannot be read is listed as broken with the reason, never fatal and
never skipped silently. What failed because of the *reading* (no permission, an I/O error) is
read again by the next run even if the file looks unchanged; what failed because of the
*bytes* is remembered with the file's size and mtime.

Tar shards (`--pool 'shards/pool-{000..099}.tar'`, WebDataset's form, also gzip/bzip2/xz
compressed) enter the same index: each image member is an image like a file (hashed,
deduplicated against everything else, test-decoded; a shard that breaks off keeps the members
before the break and lists the break; a member over images.MAX_FILE_BYTES is listed unread),
read as a stream (data/shards.py); an unchanged shard (same size and mtime) is not read again.
A member is recorded by its offset in the shard, and read back by it: a member's name is only
shown (`SHARD::NAME`, `@OFFSET` added for a name repeated in its shard), never parsed.

The pool's fingerprint is the sorted list of content hashes, and its images are in that order:
renaming or moving photos keeps every cache made from it, row for row; adding, removing or
editing one makes new caches."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..core import atomic
from ..core.errors import ClipDistillError, ConfigError
from . import shards as tar_shards
from .images import UnreadableImage, display_path, not_regular, open_rgb, read_bytes
from .protocol import FileDataset

log = logging.getLogger(__name__)

INDEX_FORMAT = 3  # 3: rows carry a member's offset and whether a failure is tried again


def _entry_problem(path: Path, e: OSError) -> Optional[str]:
    """Why a directory entry that cannot be stat'ed is broken (None: it vanished meanwhile)."""
    if path.is_symlink():
        if isinstance(e, FileNotFoundError):
            try:
                target = os.readlink(path)
            except OSError:
                target = "?"
            return f"a dangling symbolic link (to {display_path(target)})"
        if e.errno == errno.ELOOP:
            return f"a symbolic link loop ({e.strerror})"
    if isinstance(e, FileNotFoundError):
        return None
    return f"cannot be read ({e.strerror or e})"


def _walk(root: Path) -> tuple[list[tuple[Path, os.stat_result]], list[tuple[str, str]]]:
    """Every visible regular file under `root` with its stat (folders in sorted order, each
    file list sorted; hidden files and folders such as .thumbnails or .git skipped), and the
    entries that are listed as broken instead: (display path, why). Linked folders are
    followed, each folder entered once (a link loop ends there)."""
    files: list[tuple[Path, os.stat_result]] = []
    problems: list[tuple[str, str]] = []
    entered: set[tuple[int, int]] = set()
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            st = folder.stat()
            if (st.st_dev, st.st_ino) in entered:
                log.info("not reading %s again: it leads to a folder already read (a link loop or a second link)",
                         display_path(folder))
                continue
            entered.add((st.st_dev, st.st_ino))
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            problems.append((display_path(folder) + os.sep, f"a folder that cannot be read ({e.strerror or e}); "
                                                            f"its files are not in the pool"))
            continue
        folders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            try:
                st = os.stat(path)  # through links: what the link points to
            except OSError as e:
                why = _entry_problem(path, e)
                if why:
                    problems.append((display_path(path), why))
                continue
            if stat.S_ISDIR(st.st_mode):
                folders.append(path)
            elif stat.S_ISREG(st.st_mode):
                files.append((path, st))
            else:
                problems.append((display_path(path), not_regular(st.st_mode)))
        stack.extend(reversed(folders))
    return files, problems


@dataclass
class PoolIndex:
    """What a pool holds: `images` (the name of each distinct readable image, a file's real path
    or a shard member's `SHARD::NAME`, in a fixed order), `members` (image position -> where a
    shard member's bytes are: what reads it), `duplicates` (path -> the image it repeats) and
    `broken` (path -> why it was left out)."""

    roots: list[str]
    images: list[str] = field(default_factory=list)
    hashes: list[str] = field(default_factory=list)
    members: dict[int, tar_shards.Member] = field(default_factory=dict)
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
        h = hashlib.sha1(("rows by content\n" + "\n".join(sorted(self.hashes))).encode()).hexdigest()
        return {"name": "pool", "n": len(self.images), "content_sha1": h}

    def order_by_content(self) -> None:
        """Put the images in the order of their content hashes, the order the fingerprint names.
        Caches are keyed by the fingerprint and read by row: in path order, renaming a photo kept
        the fingerprint but moved the rows, and cached embeddings were paired with other images."""
        order = sorted(range(len(self.hashes)), key=self.hashes.__getitem__)
        self.images = [self.images[i] for i in order]
        self.hashes = [self.hashes[i] for i in order]
        self.members = {new: self.members[old] for new, old in enumerate(order) if old in self.members}

    def add(self, row: list, first: dict[str, str], member: Optional[tar_shards.Member] = None) -> None:
        """Count one index row: broken, a duplicate of an earlier image, or a new image."""
        if row[ERROR]:
            self.broken[row[PATH]] = row[ERROR]
        elif row[SHA1] in first:
            self.duplicates[row[PATH]] = first[row[SHA1]]
        else:
            first[row[SHA1]] = row[PATH]
            if member is not None:
                self.members[len(self.images)] = member
            self.images.append(row[PATH] if member is not None else _real_name(row))
            self.hashes.append(row[SHA1])


def index_path(cache_dir: str | os.PathLike, roots: Sequence[str | os.PathLike]) -> Path:
    key = hashlib.sha1("\n".join(sorted(os.fsencode(Path(r).resolve()).hex() for r in roots)).encode()).hexdigest()
    return Path(cache_dir) / "pools" / f"{key[:16]}.json"


# An index row: [display path, size, mtime_ns, sha1, error or None, real name as hex or None,
# a member's data offset in its shard or None, whether a failure is the reader's (read again)].
# Rows are lists, not dicts, and the file is compact JSON: a pool of 200,000 images costs tens of
# MB to index and to reuse, not the ~3 KB an image that dicts and indented JSON took.
PATH, SIZE, MTIME, SHA1, ERROR, NAME, OFFSET, AGAIN = range(8)


def _row(path: str, size: int, mtime_ns: int, sha1: str, error: Optional[str], real: str | os.PathLike | None,
         offset: Optional[int] = None, again: bool = False) -> list:
    name = None if real is None else os.fsencode(real)
    hexname = None if name is None or name == path.encode("utf-8", "surrogateescape") else name.hex()
    return [path, size, mtime_ns, sha1, error, hexname, offset, again]


def _real_name(row: list) -> str:
    return row[PATH] if row[NAME] is None else os.fsdecode(bytes.fromhex(row[NAME]))


def _previous(path: Optional[Path]) -> tuple[dict, dict]:
    """The last index's file rows by path and shard groups by shard, if it can be read (only a
    cache: anything odd, or an index of another format, is ignored and the pool read again)."""
    if path is None or not path.is_file():
        return {}, {}
    try:
        old = atomic.read_json(path)
        if old.get("format") == INDEX_FORMAT:
            files = {r[PATH]: r for r in old["files"] if isinstance(r, list) and len(r) == 8}
            shards = {k: g for k, g in old["shards"].items() if isinstance(g, dict) and isinstance(g.get("rows"), list)
                      and all(isinstance(r, list) and len(r) == 8 for r in g["rows"])}
            return files, shards
    except (ClipDistillError, AttributeError, TypeError, KeyError, IndexError):
        pass
    log.debug("the pool index %s could not be reused; indexing again", path)
    return {}, {}


def _comma_hint(specs: list[str], spec: str) -> str:
    """When a missing --pool entry is half of an existing path that had a comma in it, say so."""
    i = specs.index(spec)
    for a, b in ((i - 1, i), (i, i + 1)):
        if a >= 0 and b < len(specs) and Path(f"{specs[a]},{specs[b]}").exists():
            return (f" ({specs[a]},{specs[b]} exists: a comma separates --pool entries; write the comma inside a "
                    f"path as \\, : --pool '{specs[a]}\\,{specs[b]}')")
    return ""


def _file_row(p: Path, st: os.stat_result, key: str, real: Path) -> list:
    """Read, hash and test-decode one regular file. A failure of the bytes (not an image, over
    the size limit) is final; a failure to read them is marked to be read again next time."""
    try:
        data = read_bytes(p)
    except UnreadableImage as e:
        return _row(key, st.st_size, st.st_mtime_ns, "", str(e)[:200], real)
    except OSError as e:
        return _row(key, st.st_size, st.st_mtime_ns, "", f"cannot be read ({e.strerror or e})", real, again=True)
    error = None
    try:
        open_rgb(io.BytesIO(data))
    except OSError as e:
        error = str(e)[:200] or type(e).__name__
    return _row(key, st.st_size, st.st_mtime_ns, hashlib.sha1(data).hexdigest(), error, real)


def index_pool(roots: Sequence[str | os.PathLike], cache_dir: Optional[str | os.PathLike] = None,
               progress: bool = False) -> PoolIndex:
    """Index the pool's folders and shards (reusing the cached index for unchanged files)."""
    from ..core.progress import bar

    specs = [os.fspath(r) for r in roots]
    dirs = [Path(r) for r in specs if not tar_shards.is_shard_spec(r)]
    for d in dirs:
        if not d.is_dir():
            raise ConfigError(f"--pool {d}: not a folder; give a folder of images (sub-folders of any depth) or "
                              f"tar shards (pool-{{000..099}}.tar){_comma_hint(specs, os.fspath(d))}")
    shards = [s for r in specs if tar_shards.is_shard_spec(r) for s in tar_shards.expand(r)]
    cache = index_path(cache_dir, specs) if cache_dir else None
    before_files, before_shards = _previous(cache)
    found, problems = [], []
    for d in dirs:
        f, why = _walk(d)
        found += f
        problems += why
    if not found and not problems and not shards:
        raise ConfigError(f"--pool {', '.join(map(str, dirs))}: no files in it; put your images there "
                          f"(sub-folders of any depth)")
    rows, groups, reused, seen = [], {}, 0, set()
    for p, st in bar(found, desc="index pool", unit="file", enabled=progress, leave=False):
        real = p.resolve()
        key = display_path(real)
        if key in seen:  # one file reached by two paths (a link to it): one file
            continue
        seen.add(key)
        old = before_files.get(key)
        if old and old[SIZE] == st.st_size and old[MTIME] == st.st_mtime_ns and not old[AGAIN]:
            rows.append(old)
            reused += 1
            continue
        rows.append(_file_row(p, st, key, real))
    for where, why in problems:
        row = _row(where, 0, 0, "", why, None, again=True)
        reused += before_files.get(where) == row
        rows.append(row)
    for shard in bar(shards, desc="index shards", unit="shard", enabled=progress and bool(shards), leave=False):
        name, group, again = _shard_group(shard, before_shards)
        groups[name] = group
        reused += again
    idx = PoolIndex(roots=[display_path(r) for r in specs],
                    files=len(rows) + sum(len(g["rows"]) for g in groups.values()))
    first: dict[str, str] = {}
    for r in rows:
        idx.add(r, first)
    for name, g in groups.items():
        shard = os.fsdecode(bytes.fromhex(g["real"])) if g.get("real") else name
        for r in g["rows"]:
            member = None
            if r[OFFSET] is not None:
                member = tar_shards.Member(shard, r[PATH][len(name) + len(tar_shards.SEP):], r[OFFSET], r[SIZE])
            idx.add(r, first, member)
    idx.order_by_content()
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
    """One tar shard's rows (reused when the shard is unchanged and was read without a reader's
    failure, else streamed), as (display name, {"size", "mtime_ns", "real", "again", "rows"},
    rows reused)."""
    real = shard.resolve()
    st = real.stat()
    name = display_path(real)
    old = before.get(name)
    if old and old.get("size") == st.st_size and old.get("mtime_ns") == st.st_mtime_ns and not old.get("again"):
        return name, old, len(old["rows"])
    rows, n, times, again = [], 0, {}, False
    for item in tar_shards.stream_members(real):
        if item.member is None:  # the shard ends here: what came before it is kept
            rows.append(_row(f"{name} (after member {n})", 0, 0, "", item.error, None, again=item.again))
            again = item.again
            break
        n += 1
        m = item.member
        times[m.name] = times.get(m.name, 0) + 1
        where = display_path(tar_shards.locator(real, m.name)) + (f"@{m.offset}" if times[m.name] > 1 else "")
        if item.data is None:  # over the size limit: never read
            rows.append(_row(where, m.size, 0, "", item.error, None, m.offset))
            continue
        error = None
        try:
            open_rgb(io.BytesIO(item.data))
        except OSError as e:
            error = str(e)[:200] or type(e).__name__
        rows.append(_row(where, m.size, 0, hashlib.sha1(item.data).hexdigest(), error, None, m.offset))
    raw = os.fsencode(real)
    return name, {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "again": again, "rows": rows,
                  "real": None if raw == name.encode("utf-8", "surrogateescape") else raw.hex()}, 0


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
        self.files = [n if i in index.members else Path(n) for i, n in enumerate(index.images)]  # members: text
        self.targets = np.full(len(self.files), -1, dtype=np.int64)
        self.classes = list(classes)
        self.prompts = self.default_prompts()

    def fingerprint(self) -> dict:
        return self.index.fingerprint()

    def load(self, i: int):
        """A file, or a member of a tar shard read at its offset (data/shards.py), checked
        against the hash the index took: a shard changed since is a failed read, not an image."""
        member = self.index.members.get(i)
        if member is None:
            return open_rgb(self.files[i])
        data = tar_shards.read_member(member)
        if hashlib.sha1(data).hexdigest() != self.index.hashes[i]:
            raise OSError(f"the bytes of {self.files[i]} differ from those indexed (the shard changed since); "
                          f"run again to index it again")
        return open_rgb(io.BytesIO(data))

    def slug(self) -> str:
        return f"pool-{self.index.fingerprint()['content_sha1'][:10]}"
