"""uint8 pixels -> the float tensors models take, batched on the tensor (no PIL round trip
per image). One home for it in torch: the tiny teacher's pre-training and the student's input
pipeline in training go through here, so they cannot drift apart. Deployment makes the same
pixels in numpy and Pillow (deploy/inputs.py: the device has no torch), and a test
(tests/test_inputs.py) holds the two together."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def to_float(images_u8: torch.Tensor, size: Optional[int] = None) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, size, size) in [0, 1]; resized (bilinear,
    antialiased: PIL's resize) only when the side differs."""
    x = images_u8.permute(0, 3, 1, 2).float().div_(255.0)
    if size is not None and (x.shape[-1] != size or x.shape[-2] != size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x


def normalize(x: torch.Tensor, mean: float | Sequence[float], std: float | Sequence[float]) -> torch.Tensor:
    """(x - mean) / std per channel (a scalar applies to all three)."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).reshape(-1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).reshape(-1, 1, 1)
    return (x - m) / s


def normalize_uint8(images_u8: torch.Tensor, mean: float | Sequence[float], std: float | Sequence[float],
                    size: Optional[int] = None) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> normalised float (N, 3, S, S). At the model's own side this is
    open_clip's eval preprocess (resize and crop are identities, ToTensor, Normalize)."""
    return normalize(to_float(images_u8, size), mean, std)
