"""What an exported model file holds, and whether to trust it.

`clipdistill export` writes its description of the model (input record, classes, prompts,
teacher, accuracy, ...) as JSON under one ONNX metadata key (`METADATA_KEY`); `predict` and
`bench` read it back with ONNX Runtime alone. A model file is input like any other, so both ends
are checked here.

Before ONNX Runtime reads a file, its size and its top-level protobuf fields are checked
(`check_onnx_file`: a few bytes read, whatever the file's size), so a multi-gigabyte file that
is not ONNX is refused at once instead of being read into memory whole. The metadata read back
is checked too (`check_metadata`): a tampered `reject_threshold` (NaN, -1, 1e9) would silently
never or always reject, and `classes` given as a string or shorter than the logits would print
letters or wrong names."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional

from ..core.errors import ConfigError

METADATA_KEY = "clipdistill"


def sidecar_path(onnx_path: str | os.PathLike) -> Path:
    """The JSON sidecar beside an ONNX file (`model.onnx` -> `model.json`)."""
    return Path(onnx_path).with_suffix(".json")

# ModelProto's fields (onnx.proto) and their protobuf wire types (0 varint, 2 length-delimited);
# a field number not listed (a newer ONNX) may have any valid wire type.
_MODEL_FIELDS = {1: 0, 2: 2, 3: 2, 4: 2, 5: 0, 6: 2, 7: 2, 8: 2, 14: 2, 20: 2, 25: 2, 26: 2}
_PROTOBUF_LIMIT = 2**31 - 1  # protobuf parses no larger message: bigger models keep their weights outside


def _varint(f) -> Optional[int]:
    value = 0
    for shift in range(0, 64, 7):
        b = f.read(1)
        if not b:
            return None
        value |= (b[0] & 0x7F) << shift
        if b[0] < 0x80:
            return value
    return None


def _onnx_problem(path: Path, size: int) -> Optional[str]:
    """Why `path` cannot be an ONNX model, from its size and its top-level fields alone (each
    field's tag and length are read, its content skipped), or None."""
    if size == 0:
        return "the file is empty"
    if size > _PROTOBUF_LIMIT:
        return (f"{size / 2**30:.1f} GiB, over protobuf's 2 GiB limit for one ONNX file; a larger model keeps its "
                f"weights in external data files beside a small .onnx")
    seen = set()
    with open(path, "rb") as f:
        for _ in range(100_000):
            at = f.tell()
            if at == size:
                break
            tag = _varint(f)
            number, wire = (tag >> 3, tag & 7) if tag is not None else (0, -1)
            if number == 0 or wire not in (0, 1, 2, 5) or _MODEL_FIELDS.get(number, wire) != wire:
                return f"byte {at} starts no ONNX model field (protobuf tag {tag})"
            if wire == 0:
                if _varint(f) is None:
                    return f"the field at byte {at} is cut short"
            else:
                length = {1: 8, 5: 4}.get(wire) or _varint(f)
                if length is None or f.tell() + length > size:
                    return f"the field at byte {at} runs past the end of the file"
                f.seek(length, 1)
            seen.add(number)
        else:
            return "more than 100000 top-level fields"
    missing = [name for n, name in ((1, "ir_version"), (7, "graph")) if n not in seen]
    return f"it has no {' and no '.join(missing)}" if missing else None


def check_onnx_file(path: str | os.PathLike, flag: str = "--model") -> None:
    """Refuse, cheaply and before any runtime reads it, a file that cannot be an ONNX model
    (ConfigError naming it): see the module's docstring."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{flag} {path}: no such file; give an ONNX file written by `clipdistill export`")
    try:
        problem = _onnx_problem(p, p.stat().st_size)
    except OSError as e:
        problem = f"it cannot be read: {e.strerror}"
    if problem:
        raise ConfigError(f"{flag} {path}: not an ONNX model ({problem}); give an ONNX file written by "
                          f"`clipdistill export`")


def read_metadata(sess, where: str = "--model") -> dict:
    """The export's description of the model (input spec, classes, ...), or {} for a
    foreign ONNX file."""
    meta = sess.get_modelmeta().custom_metadata_map
    if METADATA_KEY not in meta:
        return {}
    try:
        got = json.loads(meta[METADATA_KEY])
    except ValueError as e:
        raise ConfigError(f"{where}: metadata field `{METADATA_KEY}` is not JSON ({e}); valid: the JSON object "
                          f"`clipdistill export` writes. Export the model again") from None
    if not isinstance(got, dict):
        raise ConfigError(f"{where}: metadata field `{METADATA_KEY}` is a {type(got).__name__}; valid: the JSON "
                          f"object `clipdistill export` writes. Export the model again")
    return got


_RESIZE = ("stretch", "shortest-center-crop")
_INTERPOLATION = ("bilinear", "bicubic", "nearest")


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def metadata_problem(meta: dict, n_logits: Optional[int]) -> Optional[tuple[str, str, str]]:
    """(field, what it holds, what is valid) of the first field `predict` cannot trust, or None."""
    classes = meta.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes):
        return "classes", repr(classes)[:60], "a non-empty list of class names (strings)"
    if n_logits is not None and len(classes) != n_logits:
        return "classes", f"{len(classes)} names", f"one name per logit of the model's output ({n_logits})"
    if "reject_threshold" in meta:
        r = meta["reject_threshold"]
        if not (_finite(r) and 0 <= r < 1):
            return "reject_threshold", repr(r), "a number in [0, 1) (0 = never reject)"
    spec = meta.get("input")
    if not isinstance(spec, dict):
        return "input", repr(spec)[:60], "the preprocessing record (size, mean, std, resize, interpolation)"
    size = spec.get("size")
    if not (isinstance(size, int) and not isinstance(size, bool) and 1 <= size <= 8192):
        return "input.size", repr(size), "a whole number of pixels, 1 to 8192"
    for key, positive in (("mean", False), ("std", True)):
        v = spec.get(key)
        if not (isinstance(v, list) and len(v) == 3 and all(_finite(x) and (x > 0 or not positive) for x in v)):
            return f"input.{key}", repr(v)[:60], "3 finite numbers (R, G, B)" + (", each > 0" if positive else "")
    if spec.get("resize", "stretch") not in _RESIZE:
        return "input.resize", repr(spec.get("resize")), " or ".join(_RESIZE)
    if spec.get("interpolation", "bilinear") not in _INTERPOLATION:
        return "input.interpolation", repr(spec.get("interpolation")), ", ".join(_INTERPOLATION)
    return None


def check_metadata(meta: dict, model: str, sess=None) -> dict:
    """`meta` when every field `predict` uses is one export could have written (ConfigError
    naming the file, the field and what is valid otherwise): see the module's docstring."""
    n_logits = None
    if sess is not None:
        shape = sess.get_outputs()[0].shape
        n_logits = shape[-1] if shape and isinstance(shape[-1], int) else None
    problem = metadata_problem(meta, n_logits)
    if problem:
        field, got, valid = problem
        raise ConfigError(f"--model {model}: metadata field `{field}` is {got}; valid: {valid}. The file was edited "
                          f"or damaged: export the model again (`clipdistill export`)")
    return meta
