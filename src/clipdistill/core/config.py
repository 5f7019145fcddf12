"""Typed job configs shared by the CLI and the Python API.

Each job (embed, teacher-eval, train, ...) has one dataclass. Its fields carry their help
text, and `add_arguments` turns them into `--flags`, so the CLI cannot drift from the API:
`clipdistill train --epochs 3` and `train(TrainConfig(epochs=3))` are the same thing.
Values are checked in `__post_init__` (raising ConfigError that names the flag), and the
resolved config is written next to every result.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from pathlib import Path
from typing import Any, Optional

from .errors import ConfigError


def option(default: Any = dataclasses.MISSING, help: str = "", choices: Optional[list] = None,
           default_factory: Any = dataclasses.MISSING, metavar: Optional[str] = None) -> Any:
    """A dataclass field that knows its CLI help and allowed values."""
    meta = {"help": help, "choices": choices, "metavar": metavar}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def default_cache_dir() -> str:
    """Where teachers, datasets and embeddings live unless --cache-dir says otherwise."""
    return os.environ.get("CLIPDISTILL_CACHE") or str(Path.home() / ".cache" / "clipdistill")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One `--flag` per field of the dataclass `cls`, with its help, default and type.
    List fields take comma-separated values and may be repeated (`--model a --model b`); a comma
    inside one value is written `\\,` (`--pool 'trips\\, 2024'`), as every list flag's help says."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name.startswith("_"):
            continue
        tp, _ = _unwrap_optional(hints[f.name])
        meta = f.metadata
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
        help_text = meta.get("help", "")
        shown = default if not isinstance(default, (list, tuple)) else (",".join(map(str, default)) or "none")
        kwargs["help"] = f"{help_text} (default: {shown})" if help_text else f"(default: {shown})"
        if meta.get("metavar"):
            kwargs["metavar"] = meta["metavar"]
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) in (list, tuple):
            (item,) = typing.get_args(tp)[:1]
            kwargs["type"] = _list_parser(item)
            kwargs["action"] = "extend"
            kwargs.setdefault("metavar", "A,B,...")
            kwargs["help"] += LIST_HELP
        else:
            kwargs["type"] = _scalar_parser(tp)
            if meta.get("choices"):
                kwargs["choices"] = meta["choices"]
        parser.add_argument(flag_name(f.name), **kwargs)


def _scalar_parser(tp: Any):
    if tp in (int, float, str):
        def parse(text: str, tp=tp):
            try:
                return tp(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected {tp.__name__}, got {text!r}") from None
        parse.__name__ = tp.__name__
        return parse
    return str


LIST_HELP = "; several: repeat the flag or separate by commas; a comma inside one value: \\,"


def split_list(text: str) -> list[str]:
    """`a,b` -> [a, b]; `a\\,b` -> [`a,b`] (a path may hold a comma); items stripped, empty
    ones dropped."""
    parts, cur, i = [], [], 0
    while i < len(text):
        if text.startswith("\\,", i):
            cur.append(",")
            i += 2
            continue
        if text[i] == ",":
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(text[i])
        i += 1
    parts.append("".join(cur))
    return [t.strip() for t in parts if t.strip()]


def _list_parser(item: Any):
    scalar = _scalar_parser(item)

    def parse(text: str):
        return [scalar(t) for t in split_list(text)]
    parse.__name__ = "list"
    return parse


def from_namespace(cls: type, ns: argparse.Namespace, **overrides: Any):
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in vars(ns).items() if k in names}
    kwargs.update(overrides)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


# Fields that may differ between a job and its resumption (or reuse) without changing its
# result: where files are, how the machine runs it, how it reports. Everything else must be
# equal for a run, a cached teacher evaluation or a report row to be continued or reused.
RUNTIME_FIELDS = frozenset({"resume", "progress", "workers", "out", "device", "cache_dir", "embed_batch_size",
                            "data_root"})


def config_diff(saved: dict, now: dict) -> list[str]:
    """`--flag: X in the run, Y now` for every result-changing field that differs."""
    keys = sorted((set(saved) | set(now)) - RUNTIME_FIELDS)
    return [f"{flag_name(k)}: {saved.get(k)!r} in the run, {now.get(k)!r} now" for k in keys
            if saved.get(k) != now.get(k)]


def check(condition: bool, field_name: str, message: str) -> None:
    """Raise a ConfigError that names the flag a user would type."""
    if not condition:
        raise ConfigError(f"{flag_name(field_name)}: {message}")
