"""Students: any timm architecture, and the input pipeline it sees.

Images travel as uint8 (N, H, W, 3) batches and are turned into normalised float tensors
on the training device in one vectorised step, instead of a PIL transform per sample:
the study's `ToTensor()` + `Normalize(0.5, 0.25)` at the dataset's native 96 px."""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn as nn

from ..core.errors import ConfigError
from ..data.pixels import normalize, to_float


def create_student(arch: str, out_dim: int, pretrained: bool = False) -> nn.Module:
    import timm

    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch.split('_')[0]}*")[:8]
        raise ConfigError(f"--student {arch!r} is not a timm model" + (f"; did you mean one of: {', '.join(close)}"
                                                                       if close else "") +
                          " (all: python -c \"import timm; print(timm.list_models())\")")
    if pretrained:
        from ..core.network import reachable

        if not reachable("huggingface.co"):
            # Offline, hub downloads retry for about a minute; the local HF cache still answers.
            os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        return timm.create_model(arch, pretrained=pretrained, num_classes=out_dim)
    except Exception as e:  # timm raises several types when weights cannot be fetched
        if pretrained:
            raise ConfigError(f"--student-pretrained: weights for {arch} could not be loaded ({type(e).__name__}: "
                              f"{e}); put them in the Hugging Face cache or drop --student-pretrained") from None
        raise


def prepare_images(images_u8: torch.Tensor, size: int, mean: float | tuple, std: float | tuple,
                   augment: str = "none", generator: Optional[torch.Generator] = None,
                   channels_last: bool = False) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> normalised float (N, 3, size, size), augmented (augment.py).

    Augmentations are drawn from `generator` so a resumed run draws the same ones."""
    from .augment import AUGMENTATIONS, render, sample_views

    x = to_float(images_u8)
    x = render(x, sample_views(len(x), AUGMENTATIONS.get(augment), generator), size)
    x = normalize(x, mean, std)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
