"""Deployment's input pipeline (deploy/inputs.py: numpy and Pillow, what export, compress and
predict feed the ONNX file) makes the pixels the trainer's (`student_pixels`, torch) made of the
same images: the same numbers at the trained side, within a uint8 step and a half where
the side changes (Pillow's antialiased bilinear against torch's)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from clipdistill.data.pixels import to_float
from clipdistill.data.shapes10 import SPLITS, generate
from clipdistill.deploy.inputs import prepare, preprocess, student_input
from clipdistill.distill.augment import identity_views
from clipdistill.distill.context import RunContext


def _trainer_pixels(images: np.ndarray, size: int, mean: float, std: float) -> np.ndarray:
    """The trainer's own code path for plain (validation) views: uint8 -> to_float -> student_pixels,
    on a stand-in holding only what that method reads."""
    stand_in = SimpleNamespace(size=size, cfg=SimpleNamespace(student_mean=mean, student_std=std,
                                                              channels_last=False))
    x = to_float(torch.from_numpy(images))
    with torch.no_grad():
        return RunContext.student_pixels(stand_in, x, identity_views(len(x)), None).numpy()


@pytest.mark.parametrize("size", [32, 24, 48])
def test_deployment_pixels_are_the_trainers(size):
    images = generate("test", 6, 32, SPLITS["test"].seed)[0]
    spec = student_input(size, 0.5, 0.25)
    got = prepare(images, spec)
    ref = _trainer_pixels(images, size, 0.5, 0.25)
    assert got.shape == ref.shape == (6, 3, size, size) and got.dtype == np.float32
    allowed = 1e-6 if size == 32 else 1.5 * (1 / 255) / 0.25
    assert np.abs(got - ref).max() <= allowed
    # a batch is what predict makes of each image on the device
    one_by_one = np.stack([preprocess(Image.fromarray(im), spec) for im in images])
    assert np.array_equal(got, one_by_one)
