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


def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or f.name.startswith("_"):
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
            kwargs["type"] = _list_parser(item, f.name)
            kwargs.setdefault("metavar", "A,B,...")
        else:
            kwargs["type"] = _scalar_parser(tp, f.name)
            if meta.get("choices"):
                kwargs["choices"] = meta["choices"]
        parser.add_argument(flag_name(f.name), **kwargs)


def _scalar_parser(tp: Any, name: str):
    if tp in (int, float, str):
        def parse(text: str, tp=tp):
            try:
                return tp(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected {tp.__name__}, got {text!r}") from None
        parse.__name__ = tp.__name__
        return parse
    return str


def _list_parser(item: Any, name: str):
    scalar = _scalar_parser(item, name)

    def parse(text: str):
        return [scalar(t.strip()) for t in text.split(",") if t.strip()]
    parse.__name__ = "list"
    return parse


def from_namespace(cls: type, ns: argparse.Namespace, **overrides: Any):
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in vars(ns).items() if k in names}
    kwargs.update(overrides)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def check(condition: bool, field_name: str, message: str) -> None:
    """Raise a ConfigError that names the flag a user would type."""
    if not condition:
        raise ConfigError(f"{flag_name(field_name)}: {message}")


# --------------------------------------------------------------------------- shared groups

@dataclasses.dataclass
class TeacherOptions:
    """Which teacher, where it runs, how its outputs are cached."""

    teacher: str = option("tiny-shapes", "open_clip model name (ViT-B-32, ...) or tiny-shapes, the offline teacher",
                          metavar="NAME")
    pretrained: Optional[str] = option(None, "open_clip pretrained tag (laion2b_s34b_b79k) or a local checkpoint "
                                             "file; default: the model's usual weights", metavar="TAG|PATH")
    device: str = option("auto", "auto, cpu, cuda, cuda:N or mps")
    precision: str = option("auto", "teacher precision: auto (fp16 on CUDA, fp32 on CPU), fp32, bf16, fp16",
                            choices=["auto", "fp32", "bf16", "fp16"])
    cache_dir: str = option(default_factory=default_cache_dir,
                            help="where datasets, teachers and embeddings are cached ($CLIPDISTILL_CACHE)",
                            metavar="DIR")
    embed_batch_size: int = option(256, "images per teacher batch when embedding")
    workers: int = option(-1, "DataLoader worker processes; -1 picks from the core count")

    def _check_teacher(self) -> None:
        check(self.embed_batch_size >= 1, "embed_batch_size", "must be >= 1")
        check(self.workers >= -1, "workers", "must be -1 (auto) or >= 0")


@dataclasses.dataclass
class DataOptions:
    """Which dataset and where its files are."""

    dataset: str = option("shapes10", "stl10, shapes10 (offline synthetic) or folder", metavar="NAME")
    data_root: Optional[str] = option(None, "dataset files (stl10: the folder holding stl10_binary/; folder: the "
                                            "image folder); default: CACHE_DIR/data", metavar="DIR")
    image_size: int = option(32, "shapes10 only: side of the generated images in pixels (STL10 is 96)")
    max_images: int = option(0, "use only the first N images of each split (0 = all): quick trials")
    prompts: Optional[str] = option(None, "text file with one prompt per class, in class order; default: the "
                                          "dataset's own prompts", metavar="FILE")

    templates: Optional[str] = option(None, "text file of prompt templates, one per line with {} where the prompt "
                                            "goes (averaged as in open_clip's zero-shot classifier); default: the "
                                            "dataset's own, or none", metavar="FILE")

    def _check_data(self) -> None:
        from .data.datasets import DATASETS

        DATASETS.get(self.dataset)  # unknown names fail before any teacher is loaded
        check(self.image_size >= 8, "image_size", "must be >= 8 pixels")
        check(self.max_images >= 0, "max_images", "must be >= 0 (0 = all)")
        for name in ("prompts", "templates"):
            value = getattr(self, name)
            if value is not None:
                check(Path(value).is_file(), name, f"{value} is not a file; give a text file with one entry per line")
