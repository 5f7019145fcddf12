"""Full-state checkpoints, written atomically: a run killed at any moment resumes from
`last.pt` exactly where it was (model, optimiser, scheduler, scaler, every RNG, counters,
config). `best.pt` is the one picked on the validation split."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from . import atomic


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # A checkpoint from a node with more GPUs than this one: restore the devices present.
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])


def save(path: str | Path, **state: Any) -> Path:
    state.setdefault("rng", rng_state())
    return atomic.torch_save(path, state)


def load(path: str | Path, map_location: Any = "cpu") -> Optional[dict]:
    path = Path(path)
    if not path.exists():
        return None
    # Our own files: full state includes numpy RNG tuples, hence weights_only=False.
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, OSError) as e:  # truncated or foreign: writes are atomic, so not ours
        from .errors import ClipDistillError

        raise ClipDistillError(f"{path} cannot be read ({type(e).__name__}: {str(e)[:120]}); it was not written "
                               f"whole (ours are replaced atomically, never half-written): it was damaged or copied in. "
                               f"Move it away, then train again (a run resumes from last.pt).") from None


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model
