"""One definition of percent accuracy and agreement (core/metrics.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from clipdistill.core.metrics import accuracy, agreement, per_class_accuracy, percent


def test_unknown_labels_are_left_out_and_nothing_to_measure_is_nan():
    pred = np.array([0, 1, 2, 2])
    assert accuracy(pred, np.array([0, 1, -1, 0])) == pytest.approx(100 * 2 / 3)
    assert math.isnan(accuracy(pred, np.full(4, -1)))
    assert math.isnan(percent(np.array([], bool)))


def test_tensors_and_arrays_give_the_same_figures():
    p, y = torch.tensor([1, 1, 0, 2]), torch.tensor([1, 0, 0, 2])
    assert accuracy(p, y) == accuracy(p.numpy(), y.numpy()) == 75.0
    assert agreement(p, y) == 75.0 and percent(p == y, y > 0) == 100.0
    assert per_class_accuracy(p, y, ["a", "b", "c", "d"]) == {"a": 50.0, "b": 100.0, "c": 100.0, "d": None}
