"""Errors a user can act on. The CLI prints their message (no traceback) and exits 2
for bad input, 1 for everything else; each message names the file or flag and the fix."""


class ClipDistillError(Exception):
    exit_code = 1


class ConfigError(ClipDistillError, ValueError):
    """A flag or config value is invalid."""

    exit_code = 2


class MissingSplitError(ConfigError):
    """A dataset has no such split (a folder without train/, say): callers that can do
    without it (zero-shot evaluation needs no training images) catch this one."""

    def __init__(self, message: str, split: str):
        super().__init__(message)
        self.split = split


class MissingResourceError(ClipDistillError, FileNotFoundError):
    """Weights or data are not on disk and cannot be downloaded from here."""


class CacheMismatchError(ClipDistillError):
    """A cache on disk was made by another teacher, preprocess or dataset."""


class NonFiniteLossError(ClipDistillError):
    """Training diverged."""
