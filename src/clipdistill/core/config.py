"""Typed job configs shared by the CLI and the Python API.

Each job (embed, teacher-eval, train, ...) has one dataclass. Its fields carry their help
text, and `add_arguments` turns them into `--flags`, so the CLI cannot drift from the API:
`clipdistill train --epochs 3` and `train(TrainConfig(epochs=3))` are the same thing.
Values are checked in `__post_init__` (raising ConfigError that names the flag), and the
resolved config is written next to every result.

A config composes option groups (`Options` mixins: the teacher, the dataset, the optimiser, ...),
so a verb built over another's options (fit-prompts over train's) takes the same fields, checks
and runtime marks instead of copying them, and shows only the flags it has (`preset`). Whether a
field changes a result is said where it is declared (`option(runtime=True)` when it does not), and
every comparison of configs reads that mark.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import typing
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional

from .errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Rule:
    """What a field's value must satisfy, and what the error says when it does not (after the flag
    name). It travels with the field, so a preset of the field keeps it (`check_fields`)."""

    test: Callable[[Any], bool]
    message: str


def at_least(n: float, note: str = "") -> Rule:
    return Rule(lambda v: v >= n, f"must be >= {n}" + (f" ({note})" if note else ""))


def above(n: float) -> Rule:
    return Rule(lambda v: v > n, f"must be > {n}")


def option(default: Any = dataclasses.MISSING, help: str = "", choices: Optional[list] = None,
           default_factory: Any = dataclasses.MISSING, metavar: Optional[str] = None, *, runtime: bool = False,
           valid: Optional[Rule] = None) -> Any:
    """A dataclass field that knows its CLI help and allowed values. `runtime`: the value never
    changes a result (where files are, how the machine runs the job, how it reports), so a run,
    a cached evaluation or a fit stage made with another value is still this config's (`config_diff`).
    `valid`: the rule its value must meet (`check_fields`)."""
    meta = {"help": help, "choices": choices, "metavar": metavar, "runtime": runtime, "valid": valid}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


class Options:
    """A group of options that configs compose as dataclass mixins (`class TrainConfig(...,
    TeacherOptions, DataOptions)`): one job's fields with their checks. `title` heads the group's
    flags in --help. Dataclasses place the fields of the *last* base first, so a config lists its
    groups last-flag-first."""

    title: ClassVar[str] = ""

    def __init_subclass__(cls, title: str = "", **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.title = title


def check_fields(cfg: Any, *groups: type) -> None:
    """Check each field of `groups` (default: all of `cfg`'s) against its `valid` rule, in flag order."""
    names = None if not groups else {f.name for g in groups for f in dataclasses.fields(g)}
    for f in dataclasses.fields(cfg):
        rule = f.metadata.get("valid")
        if rule is not None and (names is None or f.name in names):
            check(rule.test(getattr(cfg, f.name)), f.name, rule.message)


_PRESET_KEYS = {"default", "help", "valid", "metavar", "choices"}


def preset(group: type, **changes: dict) -> type:
    """A mixin of some of `group`'s fields, for a verb built over another verb's options (fit-prompts
    over train's): each field named keeps the group's type, choices, runtime mark and rule, and takes
    the changes given for it (`default`, `help`, `valid`, ...). The fields not named are not this
    verb's flags: it sets them itself, as an experiment sets its overrides."""
    hints = typing.get_type_hints(group)
    declared = {f.name: f for f in dataclasses.fields(group)}
    specs = []
    for name, change in changes.items():
        if name not in declared or not set(change) <= _PRESET_KEYS:
            raise TypeError(f"preset({group.__name__}): no field {name!r}, or a change other than "
                            f"{sorted(_PRESET_KEYS)}: {sorted(change)}")
        f = declared[name]
        meta = {**f.metadata, **{k: v for k, v in change.items() if k != "default"}}
        if "default" in change:
            value = change["default"]
            field = (dataclasses.field(default_factory=lambda v=value: list(v), metadata=meta)
                     if isinstance(value, list) else dataclasses.field(default=value, metadata=meta))
        elif f.default_factory is not dataclasses.MISSING:
            field = dataclasses.field(default_factory=f.default_factory, metadata=meta)
        else:
            field = dataclasses.field(default=f.default, metadata=meta)
        specs.append((name, hints[name], field))
    cls = dataclasses.make_dataclass(f"{group.__name__}Preset", specs, bases=(Options,),
                                     namespace={"__doc__": f"Some of {group.__name__}'s options, preset."})
    cls.title = group.title
    return cls


def common_options(cfg: Any, cls: type) -> dict:
    """The values of every field `cfg` shares by name with the config class `cls` (lists copied):
    how a verb built over another's options hands them on (fit-prompts' training stage)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {f.name: copy.copy(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.name in names}


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
    sections: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name.startswith("_"):
            continue
        title = _declared_by(cls, f.name).__dict__.get("title", "")
        if title and title not in sections:
            sections[title] = parser.add_argument_group(title)
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
        sections.get(title, parser).add_argument(flag_name(f.name), **kwargs)


def _declared_by(cls: type, name: str) -> type:
    """The class (an option group, or the config itself) whose body declares the field `name`."""
    return next(k for k in cls.__mro__ if name in k.__dict__.get("__annotations__", {}))


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


def runtime_fields(cls: Any) -> frozenset[str]:
    """The fields of a config (class or instance) declared `runtime=True`: those that may differ
    between a job and its resumption (or reuse) without changing its result. Everything else must
    be equal for a run, a cached teacher evaluation, a report row or a fit stage to be continued
    or reused."""
    return frozenset(f.name for f in dataclasses.fields(cls) if f.metadata.get("runtime"))


def runtime_names() -> frozenset[str]:
    """Every field name some option group (or a config composing them) declares runtime: how a plain
    dict of a config, written by `to_dict`, is compared when its class is not at hand. A name declared
    runtime anywhere is left out of every dict compared so (fit-prompts' --out, which is not runtime,
    is never compared as a dict); passing the config itself to `config_diff` is exact."""
    names, todo = set(), [Options]
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        if dataclasses.is_dataclass(cls):
            names |= runtime_fields(cls)
    return frozenset(names)


def config_diff(saved: dict, now: Any) -> list[str]:
    """`--flag: X in the run, Y now` for every result-changing field that differs. `now` is the
    config (its runtime fields are left out) or its `to_dict` (then every runtime name is)."""
    if dataclasses.is_dataclass(now):
        runtime, now = runtime_fields(now), to_dict(now)
    else:
        runtime = runtime_names()
    keys = sorted((set(saved) | set(now)) - runtime)
    return [f"{flag_name(k)}: {saved.get(k)!r} in the run, {now.get(k)!r} now" for k in keys
            if saved.get(k) != now.get(k)]


def check(condition: bool, field_name: str, message: str) -> None:
    """Raise a ConfigError that names the flag a user would type."""
    if not condition:
        raise ConfigError(f"{flag_name(field_name)}: {message}")
