"""One writer at a time: an exclusive `flock` on a file beside what is written.

Used for each embedding-cache folder (fillers take turns) and each run folder (a second
`train` on the same `--out` is refused at once, instead of mixing two runs' files).

The lock is the kernel's, so it ends with its holder: a killed process never leaves a folder
locked. Two things keep that true. A flock belongs to the open file, and a forked child
(a DataLoader worker) inherits the open file — so an orphaned worker used to keep its dead
parent's locks; every held lock's descriptor is now closed in each forked child
(`os.register_at_fork`), which drops the child's share without touching the parent's lock.
And the pid written into the lock file is only for messages: whether a folder is busy is
asked of the kernel, never read from the file."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from pathlib import Path
from typing import Iterator, Optional

from .errors import ClipDistillError

log = logging.getLogger(__name__)


class LockedError(ClipDistillError):
    """Another process holds the lock."""


_HELD: set[int] = set()  # descriptors of the locks this process holds


def _forget_in_child() -> None:
    for fd in list(_HELD):
        try:
            os.close(fd)  # the child's copy only: the parent's lock stays
        except OSError:
            pass
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


def _holder(fd: int) -> str:
    try:
        return os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""


@contextlib.contextmanager
def exclusive(lock_path: str | os.PathLike, wait: bool = True, busy_message: str = "") -> Iterator[Optional[int]]:
    """Hold an exclusive lock on `lock_path` (created if needed) for the block.

    wait=False: raise LockedError(busy_message) when another process holds it. wait=True: say
    (once, at INFO) whom it waits for, then wait. The lock file records the holder's pid so the
    messages can name it."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield None
        return
    lock_path = Path(lock_path)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = _holder(fd)
            who = f" (pid {holder})" if holder else ""
            if not wait:
                raise LockedError((busy_message or f"{lock_path} is locked by another process") + who) from None
            log.info("waiting for another process%s that is writing %s", who, lock_path.parent)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        _HELD.add(fd)
        try:
            yield fd
        finally:
            _HELD.discard(fd)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def owned_folder(folder: str | os.PathLike, verb: str, flag: str = "--out") -> Iterator[Path]:
    """`folder` made if needed and held for one writer (a verb's output folder): a second `verb`
    on it is refused at once, naming `flag`, instead of two writers mixing their files."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    with exclusive(out / ".lock", wait=False, busy_message=f"another {verb} is writing {out}; wait for it to "
                                                              f"finish, or give another {flag}"):
        yield out
