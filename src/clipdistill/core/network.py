"""Is the network there? Asked once, in seconds, before anything starts a download.

Library downloaders (huggingface_hub, torchvision) retry for minutes when offline; a
user is better served by an immediate error that says which file to place where."""

from __future__ import annotations

import os
import socket
from functools import lru_cache


def offline_forced() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes")
               for v in ("CLIPDISTILL_OFFLINE", "HF_HUB_OFFLINE"))


@lru_cache(maxsize=None)
def reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    if offline_forced():
        return False
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False
