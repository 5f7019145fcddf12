"""Percent accuracy and agreement, one definition for every stage.

Labels below 0 mean "unknown" everywhere in clipdistill (pools, unlabeled splits): they are left
out of accuracy, never counted as wrong. A share of nothing is NaN (no labelled image: no
accuracy), not 0, so a table can tell "none right" from "nothing to measure". Takes numpy arrays
or torch tensors (on any device)."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor: no torch import needed to read one
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def percent(flags, where=None) -> float:
    """The share of true `flags` (among `where`, if given) in percent; NaN when there are none."""
    f = _np(flags).astype(bool)
    if where is not None:
        f = f[_np(where).astype(bool)]
    return float(f.mean() * 100) if f.size else float("nan")


def accuracy(pred, labels) -> float:
    """Percent of `pred` equal to `labels` over the labelled items (labels >= 0); NaN if none."""
    p, y = _np(pred), _np(labels)
    return percent(p == y, y >= 0)


def agreement(a, b) -> float:
    """Percent of items where two predictions (student and teacher, fp32 and int8) agree."""
    return percent(_np(a) == _np(b))


def per_class_accuracy(pred, labels, classes: Sequence[str]) -> dict[str, Optional[float]]:
    """Accuracy per class name (None for a class with no labelled item)."""
    p, y = _np(pred), _np(labels)
    out: dict[str, Optional[float]] = {}
    for c, name in enumerate(classes):
        m = y == c
        out[name] = float((p[m] == c).mean() * 100) if m.any() else None
    return out


def otsu(values: np.ndarray, bins: int = 256) -> float:
    """The cut that best splits `values` into two groups (max between-class variance)."""
    v = np.asarray(values, dtype=np.float64)
    hist, edges = np.histogram(v, bins=bins)
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = (w0 * w1 * (mu0 - mu1) ** 2)[:-1]
    # Every cut inside an empty gap between the groups splits them alike: take the gap's middle.
    best = np.flatnonzero(between >= between.max() * (1 - 1e-9))
    return float((edges[best[0] + 1] + edges[best[-1] + 1]) / 2)
