"""A killed process leaves nothing behind: no live DataLoader worker, no held lock.

Each case runs the real thing in a child interpreter (a DataLoader with forked workers inside a
held lock), SIGKILLs it, and asks the kernel what is left."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl and flock: Linux")

# A parent that takes a lock, then iterates a DataLoader whose worker blocks inside __getitem__
# (as a worker decoding a huge image, or waiting on a full queue, does).
_PARENT = textwrap.dedent("""
    import os, sys, time
    import torch
    from torch.utils.data import DataLoader, Dataset
    from clipdistill.core.locks import exclusive
    from clipdistill.core.workers import WorkerInit

    lock, pids, init = sys.argv[1], sys.argv[2], sys.argv[3] == "1"

    class Slow(Dataset):
        def __len__(self):
            return 4
        def __getitem__(self, i):
            with open(pids, "a") as f:
                f.write(f"{os.getpid()}\\n")
            time.sleep(600)
            return torch.zeros(1)

    with exclusive(lock, wait=False):
        loader = DataLoader(Slow(), batch_size=1, num_workers=1, worker_init_fn=WorkerInit() if init else None)
        for _ in loader:
            pass
""")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"
    except FileNotFoundError:
        return False


def _lock_is_free(path: Path) -> bool:
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _kill_parent_with_a_blocked_worker(tmp_path: Path, worker_init: bool) -> tuple[int, Path]:
    lock, pids = tmp_path / ".lock", tmp_path / "pids"
    proc = subprocess.Popen([sys.executable, "-c", _PARENT, str(lock), str(pids), "1" if worker_init else "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (pids.exists() and pids.read_text().strip()) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read()
    worker = int(pids.read_text().split()[0])
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return worker, lock


def test_a_killed_process_leaves_no_worker_and_no_lock(tmp_path):
    worker, lock = _kill_parent_with_a_blocked_worker(tmp_path, worker_init=True)
    deadline = time.time() + 10
    while _alive(worker) and time.time() < deadline:
        time.sleep(0.05)
    assert not _alive(worker), "the DataLoader worker outlived its killed parent"
    assert _lock_is_free(lock)


def test_an_orphaned_worker_does_not_hold_its_parents_lock(tmp_path):
    """Without the death signal (a worker started by other code), the orphan lives on, but the
    folder is not locked by it: locks are closed in forked children."""
    worker, lock = _kill_parent_with_a_blocked_worker(tmp_path, worker_init=False)
    try:
        time.sleep(0.5)
        if not _alive(worker):
            pytest.skip("PyTorch's own watchdog ended the worker first; nothing left to check")
        assert _lock_is_free(lock), "an orphaned worker kept its dead parent's lock"
    finally:
        try:
            os.kill(worker, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_waiting_for_a_lock_says_whom_it_waits_for(tmp_path, caplog):
    """A second filler of one cache waits (the fillers take turns) and says so, instead of hanging
    without a word; the pid in the message is the holder's."""
    import logging
    import threading

    from clipdistill.core.locks import exclusive

    lock = tmp_path / ".lock"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom clipdistill.core.locks import "
                               "exclusive\nwith exclusive(sys.argv[1]):\n    print('held', flush=True)\n"
                               "    time.sleep(1.5)", str(lock)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    got = threading.Event()
    with caplog.at_level(logging.INFO, logger="clipdistill"):
        t0 = time.time()
        with exclusive(lock):
            got.set()
        waited = time.time() - t0
    holder.wait()
    assert got.is_set() and waited > 0.5
    assert f"waiting for another process (pid {holder.pid})" in caplog.text
