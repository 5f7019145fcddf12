"""The teacher flags shared by every job that runs or reads the teacher."""

from __future__ import annotations

import dataclasses
from typing import Optional

from ..core.config import Options, Rule, at_least, check_fields, default_cache_dir, option

# The largest input side a teacher may have. open_clip's own models read 224 to 512 px; one
# image at 12000 px is 1.7 GB of float32 before the model runs, --embed-batch-size of them at
# once, and the precision trial renders its scenes at that side too: refused from the model
# config, before anything is built.
MAX_IMAGE_SIZE = 1024


@dataclasses.dataclass
class TeacherOptions(Options, title="teacher"):
    """Which teacher, where it runs, how its outputs are cached."""

    teacher: str = option("tiny-shapes", "open_clip model name (ViT-B-32, ...) or tiny-shapes, the offline teacher",
                          metavar="NAME")
    pretrained: Optional[str] = option(None, "open_clip pretrained tag (laion2b_s34b_b79k) or a local checkpoint "
                                             "file; default: the model's usual weights", metavar="TAG|PATH")
    device: str = option("auto", "auto, cpu, cuda, cuda:N or mps", runtime=True)
    precision: str = option("auto", "teacher precision: auto (fp16 on CUDA; bf16 on CPUs with native bf16 when its "
                                    "embeddings stay within cosine 0.999 of fp32; else fp32), fp32, bf16, fp16",
                            choices=["auto", "fp32", "bf16", "fp16"])
    cache_dir: str = option(default_factory=default_cache_dir,
                            help="where datasets, teachers and embeddings are cached ($CLIPDISTILL_CACHE)",
                            metavar="DIR", runtime=True)
    embed_batch_size: int = option(256, "images per teacher batch when embedding", runtime=True, valid=at_least(1))
    workers: int = option(-1, "DataLoader worker processes; -1 picks from the core count", runtime=True,
                          valid=Rule(lambda v: v >= -1, "must be -1 (auto) or >= 0"))

    def _check_teacher(self) -> None:
        check_fields(self, TeacherOptions)
