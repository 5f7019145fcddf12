"""Atomic file writes: write to a temporary file beside the target, fsync, then
`os.replace`. A kill at any moment leaves either the old file or the new one, never a
torn one, which is what makes every cache and checkpoint of clipdistill resumable.

A killed writer leaves its temporary behind, and the next run removes it
(`remove_stale_temporaries`). Removing only what is provably ours and provably dead takes two
proofs, and a pid in the name is neither: `.notes.2024.12.tmp` is a user's file whose `2024`
read as a dead pid, and a pid from another pid namespace (a container sharing the folder)
names a live writer as dead. So:
- ours: every temporary is named `.NAME.clipdistill-PID.XXXXXXXX.tmp` (a folder the same way);
  nothing else in a folder is touched. The pid is only for people reading the folder.
- dead: the writer holds an exclusive `flock` on its temporary (a folder: on the folder) from
  creation to `os.replace`. The kernel drops it when the writer dies, in any pid namespace on
  the same kernel, so a temporary whose lock can be taken is a leftover; one whose lock is held
  is being written, whoever writes it. On a filesystem without locks nothing is removed.

Creation and locking are two steps, so a cleaner may take the lock of a temporary created an
instant before and delete it; the writer, once it holds its lock, checks that its name still
leads to its file and otherwise takes another (`_locked_temporary`)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import ClipDistillError

MARKER = "clipdistill"


class DiskFullError(ClipDistillError):
    """No space left where a file had to be written."""


def disk_full(path: str | os.PathLike, e: OSError) -> DiskFullError:
    where = Path(path)
    try:
        free = shutil.disk_usage(where if where.is_dir() else where.parent).free / 2**20
        free_txt = f" ({free:.0f} MiB free there)"
    except OSError:
        free_txt = ""
    return DiskFullError(f"no space left on the device while writing {path}{free_txt}: {e.strerror}. The previous "
                         f"version of the file, if any, is intact; free some space (or point --out/--cache-dir "
                         f"elsewhere) and run the same command again to continue.")


def temp_prefix(name: str) -> str:
    """`.NAME.clipdistill-PID.`: what every temporary's name starts with (NAME shortened so the
    whole name stays under the usual 255-byte limit)."""
    return f".{name[:150]}.{MARKER}-{os.getpid()}."


# ------------------------------------------------------------------------------ locks

_LOCKED: set[int] = set()  # descriptors whose flock marks a temporary as being written


def _forget_in_child() -> None:
    """A forked child (a DataLoader worker) must not keep a dead parent's temporaries alive:
    it closes its copies of the descriptors, which leaves the parent's lock as it is."""
    for fd in list(_LOCKED):
        try:
            os.close(fd)
        except OSError:
            pass
    _LOCKED.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


def _lock(fd: int, wait: bool) -> bool:
    """Take the exclusive flock; False when another holds it (wait=False) or the filesystem has
    no locks."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        return True
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.EBADF):
            return False
        raise


def _same_file(path: str, fd: int) -> bool:
    try:
        a, b = os.stat(path, follow_symlinks=False), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _locked_temporary(make: Callable[[], tuple[int, str]]) -> tuple[int, str]:
    """(descriptor holding the lock, path) of a new temporary made by `make`."""
    while True:
        fd, path = make()
        _lock(fd, wait=True)  # waits only while a cleaner decides about it; no locks: unprotected
        if _same_file(path, fd):
            _LOCKED.add(fd)
            return fd, path
        os.close(fd)  # a cleaner took it for a leftover in the instant before the lock: take another


def _release(fd: int) -> None:
    _LOCKED.discard(fd)
    os.close(fd)


# ------------------------------------------------------------------------------ writing

@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[io.BufferedWriter]:
    """Write `path` through the block's binary file: it replaces `path` (fsync'd) only when the
    block ends without an exception; otherwise `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _locked_temporary(lambda: tempfile.mkstemp(prefix=temp_prefix(path.name), suffix=".tmp",
                                                         dir=path.parent))
    try:
        # The lock lives on this descriptor: it stays open until the temporary has its final name.
        with os.fdopen(os.dup(fd), "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a cache or model is not a secret
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise disk_full(path, e) from None
        raise
    finally:
        _release(fd)


def _atomic(path: str | os.PathLike, write: Callable[[io.BufferedWriter], None]) -> Path:
    with replacing(path) as f:
        write(f)
    return Path(path)


@contextlib.contextmanager
def temporary_folder(parent: str | os.PathLike, name: str) -> Iterator[Path]:
    """A scratch folder `.NAME.clipdistill-PID.XXXXXXXX.tmp` in `parent` (on the same filesystem
    as what will be moved out of it), locked as a temporary file is, removed after the block."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)

    def make() -> tuple[int, str]:
        folder = tempfile.mkdtemp(prefix=temp_prefix(name), suffix=".tmp", dir=parent)
        return os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), folder

    fd, folder = _locked_temporary(make)
    try:
        yield Path(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        _release(fd)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return _atomic(path, lambda f: f.write(data))


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    # ensure_ascii: a file name that is not UTF-8 (a surrogate escape) is written as \udcXX, not a crash
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def numpy_save(path: str | os.PathLike, **arrays: Any) -> Path:
    """Save arrays as one `.npz` (uncompressed: these are read back often)."""
    import numpy as np

    return _atomic(path, lambda f: np.savez(f, **arrays))


def read_json(path: str | os.PathLike) -> Any:
    with open(path, "r", encoding="utf-8") as f:
        try:
            return json.load(f)
        except ValueError as e:  # ours are written atomically: a broken one was edited or copied in
            raise ClipDistillError(f"{path} is not valid JSON ({e}); restore it or move it away") from None


# ------------------------------------------------------------------------------ leftovers

# what `temp_prefix` + mkstemp/mkdtemp make: NAME, our marker, the pid, 8 random [a-z0-9_], .tmp
_TEMP = re.compile(rf"^\..+\.{MARKER}-\d+\.[a-z0-9_]+\.tmp$")


def _remove_if_dead(p: Path) -> bool:
    """Remove the temporary `p` if no process holds its lock (taken here for the removal, so a
    writer cannot take it meanwhile); False when it is alive or cannot be told."""
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_DIRECTORY if p.is_dir() else 0))
    except OSError:  # a symlink (never ours), gone, or unreadable
        return False
    try:
        if not _lock(fd, wait=False) or not _same_file(str(p), fd):
            return False
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files and folders that killed writers left in `folder` (ours by
    name, dead by their lock: see the module's docstring); return what was removed."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for p in sorted(folder.iterdir()):
        if _TEMP.match(p.name) and _remove_if_dead(p):
            removed.append(p)
    return removed
