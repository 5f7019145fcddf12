"""Prompt and template files: one entry per line, UTF-8 text.

Read and checked when the config is made, so a binary file, an empty one or a template
without `{}` is a one-line error naming the flag, before any model is loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..core.errors import ConfigError


def read_lines(path: str, flag: str) -> list[str]:
    """Non-blank lines of a UTF-8 text file (ConfigError naming `flag` otherwise)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{flag} {path}: not a file; give a text file with one entry per line")
    data = p.read_bytes()
    if b"\0" in data:
        raise ConfigError(f"{flag} {path}: a binary file, not text; give a UTF-8 text file with one entry per line")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{flag} {path}: not UTF-8 text (byte {e.start}); save it as UTF-8, one entry per "
                          f"line") from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise ConfigError(f"{flag} {path}: the file is empty; give one entry per line")
    return lines


def read_templates(path: Optional[str]) -> Optional[list[str]]:
    if path is None:
        return None
    lines = read_lines(path, "--templates")
    bad = [t for t in lines if "{}" not in t]
    if bad:
        raise ConfigError(f"--templates {path}: every line needs {{}} where the prompt goes; not: {bad[0]!r}")
    for t in lines:
        try:
            t.format("x")
        except (IndexError, KeyError, ValueError) as e:
            raise ConfigError(f"--templates {path}: {t!r} is not a template with one {{}} ({e})") from None
    return lines


def read_prompts(path: Optional[str], classes: list[str], default: list[str]) -> list[str]:
    """Prompts from a file (one per line, class order) or the dataset's defaults."""
    if path is None:
        if not default:
            raise ConfigError("this dataset has no class names to build prompts from; pass --prompts FILE "
                              "with one prompt per class")
        return list(default)
    lines = read_lines(path, "--prompts")
    if classes and len(lines) != len(classes):
        raise ConfigError(f"--prompts {path}: {len(lines)} prompts for {len(classes)} classes "
                          f"({', '.join(classes)}); give one line per class, in that order")
    return lines
