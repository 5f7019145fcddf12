"""Logging setup for the command line. Library modules only do
`log = logging.getLogger(__name__)`; the CLI decides what is shown (`-v`, `-q`).

At the default level (INFO) a command prints what it does and where it wrote things, on
stderr, message only; `-q` keeps warnings and errors; `-v` adds debug details with the
module's name."""

from __future__ import annotations

import logging
import sys

ROOT = "clipdistill"


class _Stderr(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time of each record (a test's capture, a
    redirect), not to the stream that was current when logging was set up."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup(verbosity: int = 0) -> None:
    """verbosity: -1 quiet (warnings), 0 normal (info), 1 verbose (debug)."""
    level = logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO
    logger = logging.getLogger(ROOT)
    for h in list(logger.handlers):
        if getattr(h, "_clipdistill", False):
            logger.removeHandler(h)
    handler = _Stderr()
    handler._clipdistill = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s" if verbosity > 0 else "%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    # The command owns its output: libraries that log through the root logger (open_clip calls
    # logging.info, which installs a root handler) must not print our records a second time.
    logger.propagate = False
