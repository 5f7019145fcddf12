"""One writer at a time: an exclusive `flock` on a file beside what is written.

Used for each embedding-cache folder (fillers take turns) and each run folder (a second
`train` on the same `--out` is refused at once, instead of mixing two runs' files)."""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Iterator, Optional

from .errors import ClipDistillError


class LockedError(ClipDistillError):
    """Another process holds the lock."""


@contextlib.contextmanager
def exclusive(lock_path: str | os.PathLike, wait: bool = True, busy_message: str = "") -> Iterator[Optional[int]]:
    """Hold an exclusive lock on `lock_path` (created if needed) for the block.

    wait=False: raise LockedError(busy_message) when another process holds it. The lock
    file records the holder's pid so the message can name it; the kernel drops the lock
    when the holder dies, so a killed process never leaves a folder locked."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield None
        return
    lock_path = Path(lock_path)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            try:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            except OSError:
                holder = ""
            raise LockedError((busy_message or f"{lock_path} is locked by another process") +
                              (f" (pid {holder})" if holder else "")) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        try:
            yield fd
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
