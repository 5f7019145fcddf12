"""Nested state (checkpoints, probes) stored so that reading it back runs no code.

A pickle can execute anything when it is loaded, and run folders and caches are files
people share. So a state dict — tensors nested in dicts, lists and tuples with numbers and
strings around them, as `model.state_dict()`, `optimizer.state_dict()` and the RNG states
are — is split in two: every tensor (and numpy array) goes into a safetensors file, and
everything else into a JSON tree stored in that file's header, where each tensor is a
reference by key. Reading parses a header and copies bytes; nothing is unpickled.

    write_state(path, {"model": sd, "epoch": 3, "rng": {...}})
    state = read_state(path)      # the same structure back; StateFileError if not ours

A file from elsewhere is parsed within bounds, so that reading it costs neither a crash nor
gigabytes: its header may be at most MAX_HEADER_BYTES (safetensors itself allows 100 MB, and
json.loads of that holds a few GB of Python objects) and its tree at most MAX_DEPTH deep
(json.loads and `_decode` recurse, and a header nested 200,000 deep raised RecursionError).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import ClipDistillError

FORMAT = "clipdistill-state/1"
_META_KEY = "clipdistill"
# Ours: about 250 KB for a convnext_base student with its AdamW state, 8 levels deep at most
# (optimizer -> state -> __items__ -> [key, value] -> exp_avg -> tensor). Both bounds are far
# above that and far below what costs memory or the interpreter's recursion limit.
MAX_HEADER_BYTES = 16 << 20
MAX_DEPTH = 64


class StateFileError(ClipDistillError):
    """A state file that is not a clipdistill safetensors state (damaged, foreign or a pickle)."""


def _encode(obj: Any, tensors: dict, path: str) -> Any:
    import numpy as np
    import torch

    if isinstance(obj, torch.Tensor):
        key = path or "_"
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        key = path or "_"
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj).copy())
        return {"__ndarray__": key}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not any(k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, f"{path}.{k}" if path else k) for k, v in obj.items()}
        # non-string keys (an optimiser's per-parameter state is keyed by int): keep their type
        return {"__items__": [[_encode(k, tensors, f"{path}.k{i}"), _encode(v, tensors, f"{path}.{i}")]
                              for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"state value at {path or '(root)'} is a {type(obj).__name__}; only tensors, arrays, numbers, "
                    f"strings and dicts/lists/tuples of them are stored")


def _decode(obj: Any, tensors: dict) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return tensors[obj["__ndarray__"]].numpy()
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if "__items__" in obj:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj


def to_bytes(state: dict) -> bytes:
    from safetensors.torch import save

    tensors: dict = {}
    tree = _encode(state, tensors, "")
    return save(tensors, metadata={"format": FORMAT, _META_KEY: json.dumps(tree)})


def write_state(path: str | os.PathLike, state: dict) -> Path:
    """Atomically write `state` (see the module docstring) as one safetensors file."""
    from . import atomic

    return atomic.write_bytes(path, to_bytes(state))


def read_state(path: str | os.PathLike, what: str = "state file") -> dict:
    """The structure `write_state` wrote. Anything else — a pickle, random bytes, a
    truncated file, another program's safetensors — raises StateFileError naming the file."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        _check_header_size(path, what)
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT or _META_KEY not in meta:
                raise StateFileError(f"{path} is a safetensors file but not a clipdistill {what} (no "
                                     f"{FORMAT!r} header); it was not written by clipdistill")
            tree = _parse_tree(meta[_META_KEY], path, what)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except StateFileError:
        raise
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise StateFileError(f"{path} is not a readable clipdistill {what} ({type(e).__name__}: {str(e)[:120]}). "
                             f"Ours are written atomically, so it was damaged or copied in; nothing in it was run. "
                             f"Move it away.") from None
    try:
        return _decode(tree, tensors)
    except (KeyError, TypeError, AttributeError) as e:
        raise StateFileError(f"{path}: its header does not match its tensors ({type(e).__name__}: {e}); "
                             f"move it away") from None


def _check_header_size(path: Path, what: str) -> None:
    """Refuse a header over MAX_HEADER_BYTES from its 8-byte length prefix, before it is read.
    A prefix longer than the file is no safetensors file at all: safetensors says so itself."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        size = os.fstat(f.fileno()).st_size
    n = int.from_bytes(prefix, "little") if len(prefix) == 8 else 0
    if MAX_HEADER_BYTES < n <= size - 8:
        raise StateFileError(f"{path} is not a readable clipdistill {what}: its header is {n >> 20} MiB, where ours "
                             f"are under {MAX_HEADER_BYTES >> 20} MiB (a few hundred KB for the largest students); "
                             f"nothing in it was read or run. Move it away.")


def _parse_tree(text: str, path: Path, what: str) -> dict:
    """The JSON tree of a header, refused (StateFileError) when nested deeper than MAX_DEPTH or
    not a dict: json.loads and `_decode` recurse once per level."""
    deep = StateFileError(f"{path} is not a readable clipdistill {what}: its header is nested more than {MAX_DEPTH} "
                          f"levels deep, where ours are under 10; nothing in it was run. Move it away.")
    try:
        tree = json.loads(text)
    except RecursionError:
        raise deep from None
    stack = [(tree, 1)]
    while stack:
        obj, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise deep
        if isinstance(obj, dict):
            stack.extend((v, depth + 1) for v in obj.values())
        elif isinstance(obj, list):
            stack.extend((v, depth + 1) for v in obj)
    if not isinstance(tree, dict):
        raise StateFileError(f"{path} is not a readable clipdistill {what}: its header holds a "
                             f"{type(tree).__name__}, not the dict ours hold; nothing in it was run. Move it away.")
    return tree


def tensors_sha256(tensors: dict) -> str:
    """A hash of tensor contents (names, dtypes, shapes, bytes, in name order). Not the
    file's hash: safetensors writes its header's metadata in an arbitrary order, so the same
    weights can be saved as different bytes."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def weights_sha256(path: str | os.PathLike) -> str:
    """`tensors_sha256` of a safetensors file; the plain file hash of anything else."""
    import hashlib

    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            return tensors_sha256({k: f.get_tensor(k) for k in f.keys()})
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
