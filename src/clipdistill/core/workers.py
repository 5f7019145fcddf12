"""Worker processes that die with the process that started them.

DataLoader workers are forked children. When their parent is killed (SIGKILL gives it no
chance to stop them) PyTorch's own watchdog notices only while a worker waits for work; a
worker blocked elsewhere (on a full result queue, in a futex) was seen living on for minutes
as an orphan. Each worker therefore asks the kernel to kill it the moment its parent dies
(Linux `prctl(PR_SET_PDEATHSIG)`), and checks once that the parent did not die before it asked.
What a forked worker must not keep — the parent's locks — is handled by core/locks.py."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def auto_workers(requested: int = -1) -> int:
    """DataLoader workers for decoding: as asked, or (-1) one per spare CPU, at most 4."""
    if requested >= 0:
        return requested
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def die_with_parent(parent: int) -> None:
    """In a freshly started child: be SIGKILLed when `parent` (the pid that forked us) dies.
    Linux only; elsewhere a no-op (PyTorch's watchdog remains)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request: nobody will signal us
        os._exit(1)


class WorkerInit:
    """A DataLoader `worker_init_fn` (picklable, for spawn-started workers too) that makes each
    worker die with the process that made the loader."""

    def __init__(self) -> None:
        self.parent = os.getpid()

    def __call__(self, worker_id: int) -> None:
        die_with_parent(self.parent)
