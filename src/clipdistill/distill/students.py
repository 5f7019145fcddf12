"""Students: any timm architecture, by name, with errors that say what to type instead.

What the student reads is made on the training device from uint8 batches
(`RunContext.student_pixels`: augment.py's views, then data/pixels.py's normalisation)."""

from __future__ import annotations

import os

import torch.nn as nn

from ..core.errors import ConfigError


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

