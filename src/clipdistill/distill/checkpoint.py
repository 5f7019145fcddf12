"""Full-state checkpoints, written atomically and read without unpickling anything.

`last` holds everything a killed run needs to continue exactly where it was (model,
optimiser, scheduler, scaler, every RNG, counters, config); `best` the weights and metadata
of the epoch picked on validation. Both are one safetensors file each (tensors) with the
rest as JSON in its header (core/state.py): a checkpoint from someone else can be loaded
without running their code."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..core.state import read_state, write_state


def rng_state() -> dict:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": {"kind": kind, "keys": np.asarray(keys, dtype=np.int64), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # A checkpoint from a node with more GPUs than this one: restore the devices present.
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])


def save(path: str | Path, **state: Any) -> Path:
    state.setdefault("rng", rng_state())
    return write_state(path, state)


def load(path: str | Path) -> Optional[dict]:
    """The checkpoint at `path`, or None when there is none. A file that is not one of ours
    (a pickle, random bytes, a truncated copy) raises StateFileError naming it; nothing in
    it runs."""
    path = Path(path)
    if not path.exists():
        return None
    return read_state(path, "checkpoint")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model
