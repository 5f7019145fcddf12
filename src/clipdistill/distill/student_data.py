"""What the student trains on: rows of one or more splits, each row an image (uint8), a
label (-1 when unknown) and the teacher's cached embedding, read through the memmap.

Everything is gathered in whole batches from in-memory arrays, so an epoch costs one
fancy-index per batch instead of a file open per sample (the study `torch.load`ed one
`.pt` per image)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..teacher.heads import split_holdout


@dataclass
class Rows:
    """A set of rows over several splits: parallel arrays (split id, row index)."""

    split: np.ndarray
    row: np.ndarray

    def __len__(self) -> int:
        return len(self.row)

    def take(self, idx: np.ndarray) -> "Rows":
        return Rows(self.split[idx], self.row[idx])

    def groups(self):
        """(split id, positions in these rows, row indices in that split) for each split
        present: whatever is read per split is read once per batch, in one fancy index."""
        for k in np.unique(self.split):
            pos = np.flatnonzero(self.split == k)
            yield int(k), pos, self.row[pos]


class StudentData:
    def __init__(self, outs, splits: list[str], student_size: Optional[int], progress: bool = True):
        self.names = list(splits)
        # Datasets with pixels in memory hand them over as they are (batches are resized on the
        # fly); folders decode their files once at the student's side.
        self.images = [outs.datasets[s].pixels(student_size, progress) for s in self.names]
        self.labels = [np.asarray(outs.datasets[s].targets, dtype=np.int64) for s in self.names]
        self.emb = [outs.caches[s].embeddings for s in self.names]
        self.valid = [outs.caches[s].valid_indices() for s in self.names]

    def native_size(self) -> int:
        return int(self.images[0].shape[1])

    def rows(self, split: str, labelled_only: bool = False) -> Rows:
        k = self.names.index(split)
        r = self.valid[k]
        if labelled_only:
            r = r[self.labels[k][r] >= 0]
        return Rows(np.full(len(r), k, dtype=np.int64), r)

    def has_labels(self, split: str) -> bool:
        return split in self.names and bool(len(self.rows(split, labelled_only=True)))

    def gather(self, rows: Rows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(uint8 images N,H,W,3; labels; teacher embeddings float32) in the order of `rows`."""
        n = len(rows)
        imgs = labels = emb = None
        for k, pos, r in rows.groups():
            im = self.images[k][r]
            if imgs is None:
                imgs = np.empty((n,) + im.shape[1:], dtype=np.uint8)
                labels = np.empty(n, dtype=np.int64)
                emb = np.empty((n, self.emb[k].shape[1]), dtype=np.float32)
            imgs[pos], labels[pos], emb[pos] = im, self.labels[k][r], self.emb[k][r]
        return torch.from_numpy(imgs), torch.from_numpy(labels), torch.from_numpy(emb)


def prefetched(batches, data: "StudentData", pin: bool = False, depth: int = 3):
    """(rows, gathered tensors) for each `Rows` of `batches`, gathered `depth` batches ahead in a
    background thread (reading the pixel store, pinned for an asynchronous copy to the GPU)
    while the current batch trains: the step never waits for the disk. Same order, same
    tensors as gathering in the loop; an error in the thread is raised in the loop."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def work() -> None:
        try:
            for rows in batches:
                if stop.is_set():
                    return
                got = data.gather(rows)
                if pin:
                    got = tuple(t.pin_memory() for t in got)
                q.put((rows, got))
            q.put(done)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put(e)

    thread = threading.Thread(target=work, name="clipdistill-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)


def concat(parts: list[Rows]) -> Rows:
    return Rows(np.concatenate([p.split for p in parts]), np.concatenate([p.row for p in parts]))


def train_val_rows(data: StudentData, train_splits: list[str], labelled_only: bool, val_fraction: float,
                   seed: int) -> tuple[Rows, Rows, str]:
    """Training rows, validation rows and what validation measures.

    The held-out part comes from the labelled train split, with the same seeded split
    as the linear probe's, so the probe never saw the rows that pick the student."""
    val_source = "train" if data.has_labels("train") else train_splits[0]
    parts, val = [], None
    for s in train_splits:
        rows = data.rows(s, labelled_only=labelled_only or (s == val_source and val_source == "train"))
        if s == val_source:
            tr, ho = split_holdout(len(rows), val_fraction, seed)
            val, rows = rows.take(ho), rows.take(tr)
            if s == "train" and not labelled_only:
                # unlabelled rows of a partly-labelled train split still train teacher-based methods
                k = data.names.index(s)
                extra = data.valid[k][data.labels[k][data.valid[k]] < 0]
                rows = concat([rows, Rows(np.full(len(extra), k, dtype=np.int64), extra)])
        parts.append(rows)
    if val is None:  # validation split not among the training splits
        rows = data.rows(val_source, labelled_only=val_source == "train")
        _, ho = split_holdout(len(rows), val_fraction, seed)
        val = rows.take(ho)
    metric = "accuracy" if val_source == "train" else "teacher_agreement"
    return concat(parts), val, metric
