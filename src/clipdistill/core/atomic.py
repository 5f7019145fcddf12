"""Atomic file writes: write to a temporary file beside the target, fsync, then
`os.replace`. A kill at any moment leaves either the old file or the new one, never a
torn one, which is what makes every cache and checkpoint of clipdistill resumable.

Temporary names carry the writer's pid (`.NAME.PID.XXXX.tmp`, `.export-PID-XXXX/`), so the
next run can tell a leftover of a killed process from a file another live process is
writing right now, and removes only the former (`remove_stale_temporaries`)."""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from .errors import ClipDistillError


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
    return f".{name}.{os.getpid()}."


def _atomic(path: str | os.PathLike, write: Callable[[io.BufferedWriter], None]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
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
    return path


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

_TEMP = re.compile(r"^\.(?:.+\.(\d+)\..*\.tmp|(?:export|int8)-(\d+)-.*)$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files and folders that killed writers left in `folder`
    (those whose pid no longer runs); return what was removed."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = _TEMP.match(p.name)
        if not m or _alive(int(m.group(1) or m.group(2))):
            continue
        try:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed
