"""Augmented views, batched on the tensor, that the student and the teacher both see.

Beyer et al. ("Knowledge distillation: a good teacher is patient and consistent", CVPR 2022):
the student matches its teacher when both are shown *the same* augmented view, so a view
here is a set of numbers per image (crop box and flip) applied by one `grid_sample` call to
the whole batch, once at the student's side and once at the teacher's, from the same source
pixels. The parameters follow torchvision/timm's RandomResizedCrop (area fraction and aspect
ratio drawn uniformly, log-uniform for the ratio), drawn from the trainer's seeded generator so
a resumed run draws the same views. timm's own transforms work one PIL image at a time, which
is the per-image Python loop this avoids; its Mixup mixes one-hot labels, which unlabeled images
do not have, so mixup is here too (one lambda per batch, the batch mixed with its reverse, as
timm's "batch" mode).

A view is (N, 5) float: half-width, half-height, centre x, centre y (in [-1, 1] image
coordinates) and flip (1 or 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..core.registry import Registry


@dataclass(frozen=True)
class Augmentation:
    name: str
    summary: str
    crop_scale: tuple[float, float] = (1.0, 1.0)  # area fraction of the crop
    crop_ratio: tuple[float, float] = (1.0, 1.0)  # aspect ratio w/h
    shift: float = 0.0  # translation only, as a fraction of the side (pad-and-crop)
    flip: bool = False


AUGMENTATIONS: Registry[Augmentation] = Registry("augmentation", flag="--augment")
AUGMENTATIONS.add("none", Augmentation("none", "the image as it is (the study)"))
AUGMENTATIONS.add("flip", Augmentation("flip", "random horizontal flip", flip=True))
AUGMENTATIONS.add("flip-crop", Augmentation("flip-crop", "flip + a random shift of up to 1/8 of the side "
                                                         "(reflect-padded)", shift=0.125, flip=True))
AUGMENTATIONS.add("rrc", Augmentation("rrc", "random resized crop (35-100% of the area, aspect 3/4-4/3) + flip, "
                                             "the consistent-teaching view", crop_scale=(0.35, 1.0),
                                      crop_ratio=(3 / 4, 4 / 3), flip=True))


def identity_views(n: int) -> torch.Tensor:
    v = torch.zeros(n, 5)
    v[:, 0:2] = 1.0
    return v


def sample_views(n: int, aug: Augmentation, generator: Optional[torch.Generator]) -> torch.Tensor:
    """(n, 5) view parameters for `aug`, drawn from `generator`."""
    v = identity_views(n)
    if aug.crop_scale != (1.0, 1.0) or aug.crop_ratio != (1.0, 1.0):
        u = torch.rand(n, 4, generator=generator)
        area = aug.crop_scale[0] + (aug.crop_scale[1] - aug.crop_scale[0]) * u[:, 0]
        lo, hi = math.log(aug.crop_ratio[0]), math.log(aug.crop_ratio[1])
        ratio = torch.exp(lo + (hi - lo) * u[:, 1])
        w = torch.sqrt(area * ratio).clamp(max=1.0)
        h = torch.sqrt(area / ratio).clamp(max=1.0)
        v[:, 0], v[:, 1] = w, h
        v[:, 2] = (1 - w) * (2 * u[:, 2] - 1)
        v[:, 3] = (1 - h) * (2 * u[:, 3] - 1)
    elif aug.shift:
        u = torch.rand(n, 2, generator=generator)
        v[:, 2:4] = 2 * aug.shift * (2 * u - 1)
    if aug.flip:
        v[:, 4] = (torch.rand(n, generator=generator) < 0.5).float()
    return v


def render(images: torch.Tensor, views: torch.Tensor, size: int) -> torch.Tensor:
    """float (N, 3, H, W) in [0, 1] -> the views at (N, 3, size, size), bilinear; out-of-image
    pixels (shifts) mirror the border. Identity views are a plain antialiased resize."""
    views = views.to(images.device, images.dtype)
    if bool((views[:, :2] == 1).all() and (views[:, 2:] == 0).all()):
        if images.shape[-1] == size and images.shape[-2] == size:
            return images
        return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    sx = views[:, 0] * (1 - 2 * views[:, 4])  # a flip is a negative x scale
    theta = torch.zeros(len(views), 2, 3, dtype=images.dtype, device=images.device)
    theta[:, 0, 0], theta[:, 0, 2] = sx, views[:, 2]
    theta[:, 1, 1], theta[:, 1, 2] = views[:, 1], views[:, 3]
    grid = F.affine_grid(theta, [len(views), images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


@dataclass
class Mix:
    """One mixup draw for a batch: x = lam * x + (1 - lam) * x[perm]."""

    lam: float
    perm: torch.Tensor

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self.lam * x + (1.0 - self.lam) * x[self.perm.to(x.device)]


def draw_mix(n: int, alpha: float, generator: Optional[torch.Generator]) -> Optional[Mix]:
    """A mixup draw (lambda ~ Beta(alpha, alpha), the batch mixed with its reverse), or None
    when alpha is 0. The Beta draw comes from the seeded generator, through numpy."""
    if alpha <= 0:
        return None
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    return Mix(lam, torch.arange(n - 1, -1, -1))
