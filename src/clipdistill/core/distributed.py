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
