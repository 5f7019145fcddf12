"""A run's own images, as deployment reads them: the test images parity runs on and INT8 is
measured on, the training images INT8 calibrates on, the cached images a re-prompted export
calibrates its reject threshold on.

Each split is opened as training opened it (the run's config.json: dataset, data root or pool,
image size), so the rows are the ones the run saw, and the pixels the deployed model gets are
inputs.py's, from the model's own input record."""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..core.config import default_cache_dir
from .inputs import prepare


def run_dataset(run_cfg: dict, split: str, cache_dir: str = "", max_images: int = 0):
    """One split of the run's dataset. `max_images`: the run's own limit, where the rows must be
    the ones its caches were made from (the teacher's embeddings)."""
    from ..data.datasets import create_dataset, default_data_root

    cache = cache_dir or run_cfg.get("cache_dir")
    root = run_cfg.get("data_root") or ("" if run_cfg.get("pool") else
                                        default_data_root(cache or default_cache_dir()))
    return create_dataset(run_cfg["dataset"], split, root, run_cfg.get("image_size", 32), max_images,
                          tuple(run_cfg.get("pool") or ()), cache)


def split_images(run_cfg: dict, split: str, cache_dir: str, size: Optional[int]) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images N,H,W,3 at `size`, the run's trained side; labels) of one split of the run's dataset."""
    ds = run_dataset(run_cfg, split, cache_dir)
    return ds.pixels(size), np.asarray(ds.targets, dtype=np.int64)


def shapes10_test(n: int, size: int) -> np.ndarray:
    """Real (rendered) images for a check when the run's own data is not on this machine."""
    from ..data.shapes10 import SPLITS, generate

    return generate("test", n, size, SPLITS["test"].seed)[0]


def subset(n_total: int, n: int, seed: int) -> np.ndarray:
    """`n` of `n_total` row indices drawn (seeded), in order; all of them for n <= 0 or n >= n_total."""
    if n <= 0 or n >= n_total:
        return np.arange(n_total)
    return np.sort(np.random.default_rng(seed).permutation(n_total)[:n])


def calibration_images(run_cfg: dict, info: dict, n: int, cache_dir: str, seed: int = 0) -> np.ndarray:
    """`n` images drawn (seeded) from the splits the student was trained on, prepared as the
    model's input record (`info["input"]`) says."""
    parts = []
    for split in run_cfg.get("data") or ["train"]:
        imgs, _ = split_images(run_cfg, split, cache_dir, info["trained_size"])
        parts.append(imgs)
    counts = np.array([len(p) for p in parts])
    pick = subset(int(counts.sum()), n, seed)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    chosen = [parts[k][pick[(pick >= offsets[k]) & (pick < offsets[k + 1])] - offsets[k]] for k in range(len(parts))]
    return prepare(np.concatenate(chosen), info["input"])
