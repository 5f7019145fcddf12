"""torchrun/DDP support without a home-made launcher: the same `clipdistill train`
command runs under `torchrun --nproc_per_node N`. NCCL on GPU, gloo on CPU; rank 0 writes."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    """Joins the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(info.local_rank)
        # Rank 0 fills the embedding caches (and may pre-train the tiny teacher) while the others
        # wait in a barrier: NCCL's 10-minute default would kill a job embedding STL10's 100k images.
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(hours=6))
    return info


def local_device(device: torch.device, info: DistInfo) -> torch.device:
    if device.type == "cuda" and info.enabled:
        return torch.device("cuda", info.local_rank)
    return device


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()




def _store():
    """The process group's key-value store (torchrun's rendezvous store): ranks tell each
    other that a step is done or failed without a collective that could wait for hours."""
    return dist.distributed_c10d._get_default_store()


def failure_text(e: BaseException) -> str:
    from .errors import ClipDistillError

    return str(e) if isinstance(e, ClipDistillError) else f"{type(e).__name__}: {e}"


class RankFailed(Exception):
    """Another rank failed; its message is this one's."""


def wait_for(keys: list[str], failed_key: str, poll: float = 0.5, store=None) -> None:
    """Wait until every key is set in the store; raise RankFailed with the failing rank's
    message as soon as `failed_key` is set (seconds, not the process group's hours)."""
    import time

    store = store or _store()
    while not store.check(keys):
        if store.check([failed_key]):
            raise RankFailed(store.get(failed_key).decode("utf-8", "replace"))
        time.sleep(poll)


_steps = {"n": 0}


def main_first(info: DistInfo, fn, what: str):
    """`fn()` on rank 0 first, then on the other ranks (which find its files complete): cache
    preparation. A failure on rank 0 stops every other rank at once with rank 0's message,
    instead of leaving them in a barrier until the process group's timeout."""
    if not info.enabled:
        return fn()
    from .errors import ClipDistillError

    _steps["n"] += 1
    key = f"clipdistill/{_steps['n']}/{what}"
    store = _store()
    if info.is_main:
        try:
            out = fn()
        except BaseException as e:
            store.set(key + "/failed", f"rank 0 failed while {what}: {failure_text(e)}")
            raise
        store.set(key + "/done", "1")
        return out
    try:
        wait_for([key + "/done"], key + "/failed", store=store)
    except RankFailed as e:
        raise ClipDistillError(str(e)) from None
    return fn()


def broadcast_choice(choice, options: tuple, info: DistInfo, device: torch.device):
    """Rank 0's `choice` (one of `options`) on every rank: a decision one rank measured, such
    as the teaching mode. Sent as an index tensor on the rank's own device (NCCL needs it
    there; nothing is pickled)."""
    if not info.enabled:
        return choice
    t = torch.tensor([options.index(choice) if info.is_main else -1], dtype=torch.int64, device=device)
    dist.broadcast(t, src=0)
    return options[int(t.item())]


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
