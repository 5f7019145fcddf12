"""Heads turn a teacher (or student) embedding into class logits.

- text head: cosine similarity to the class prompts' text embeddings, times a logit
  scale. CLIP trains with scale 100; the study's KL used the raw cosines (scale 1),
  which makes nearly uniform targets (see `methods.py`).
- linear probe: `nn.Linear(dim, classes)` trained on the labelled split's cached
  embeddings. The epoch is chosen on a held-out part of train, never on test (the
  study kept the lowest *train* loss; its students were picked on test)."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core import metrics
from ..core.errors import ConfigError
from ..core.state import StateFileError, read_state, write_state

log = logging.getLogger(__name__)


class TextHead(nn.Module):
    """logits = scale * cos(embedding, prompt embeddings)."""

    def __init__(self, text_embeddings: torch.Tensor, logit_scale: float = 100.0):
        super().__init__()
        self.register_buffer("text", F.normalize(text_embeddings.float(), dim=-1))
        self.logit_scale = float(logit_scale)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * F.normalize(emb.float(), dim=-1) @ self.text.t()


@dataclasses.dataclass
class ProbeConfig:
    """The study's probe settings (Adam 3e-4, batch 64, 15 epochs, seed 0)."""

    lr: float = 3e-4
    batch_size: int = 64
    epochs: int = 15
    holdout: float = 0.1
    seed: int = 0

    def key(self) -> str:
        return hashlib.sha1(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:10]


def split_holdout(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded (train, held-out) split of range(n); shared by the probe and the trainer."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    k = int(round(n * fraction)) if fraction > 0 else 0
    k = min(max(k, 1 if fraction > 0 and n > 1 else 0), n - 1) if n > 1 else 0
    return np.sort(perm[k:]), np.sort(perm[:k])


def train_linear_probe(emb: np.ndarray, labels: np.ndarray, num_classes: int, cfg: Optional[ProbeConfig] = None):
    """Returns (probe, info). Only rows with label >= 0 are used."""
    cfg = cfg or ProbeConfig()
    keep = labels >= 0
    x_all = torch.from_numpy(np.asarray(emb[keep], dtype=np.float32))
    y_all = torch.from_numpy(np.asarray(labels[keep], dtype=np.int64))
    tr, ho = split_holdout(len(y_all), cfg.holdout, cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    probe = nn.Linear(x_all.shape[1], num_classes)
    opt = torch.optim.Adam(probe.parameters(), lr=cfg.lr)
    xt, yt = x_all[tr], y_all[tr]
    xh, yh = x_all[ho], y_all[ho]
    best = (-1.0, float("inf"))
    best_state, history = None, []
    for epoch in range(cfg.epochs):
        perm = torch.randperm(len(yt), generator=g)
        probe.train()
        for i in range(0, len(perm), cfg.batch_size):
            b = perm[i:i + cfg.batch_size]
            loss = F.cross_entropy(probe(xt[b]), yt[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        probe.eval()
        with torch.no_grad():
            xs, ys = (xh, yh) if len(yh) else (xt, yt)
            out = probe(xs)
            acc = metrics.accuracy(out.argmax(1), ys)
            val_loss = F.cross_entropy(out, ys).item()
        history.append({"epoch": epoch + 1, "holdout_accuracy": acc, "holdout_loss": val_loss})
        if (acc, -val_loss) > (best[0], -best[1]):
            best, best_state = (acc, val_loss), copy.deepcopy(probe.state_dict())
    probe.load_state_dict(best_state)
    best_epoch = max(history, key=lambda h: (h["holdout_accuracy"], -h["holdout_loss"]))["epoch"]
    info = {"best_epoch": best_epoch, "holdout_accuracy": best[0], "n_train": int(len(tr)),
            "n_holdout": int(len(ho)), "history": history, "config": dataclasses.asdict(cfg)}
    return probe.eval(), info


def probe_path(cache_dir: str | Path, teacher_slug: str, dataset_slug: str, cfg: ProbeConfig) -> Path:
    return Path(cache_dir) / "probes" / teacher_slug / dataset_slug / f"probe-{cfg.key()}.safetensors"


def load_or_train_probe(path: Path, emb: np.ndarray, labels: np.ndarray, num_classes: int, cfg: ProbeConfig,
                        teacher_fingerprint: dict) -> tuple[nn.Linear, dict]:
    """A probe is as cheap to keep as it is to retrain, but keeping it makes every
    student distilled from the linear head see the very same teacher."""
    # The rows it learnt from: a changed train folder must retrain it, or its holdout would
    # no longer be the trainer's validation rows.
    data_key = hashlib.sha1(np.ascontiguousarray(labels, dtype=np.int64).tobytes() +
                            np.ascontiguousarray(emb[:, :4], dtype=np.float32).tobytes()).hexdigest()
    if path.exists():
        try:
            saved = read_state(path, "linear probe")
            if saved.get("teacher") == teacher_fingerprint and saved.get("num_classes") == num_classes and \
                    saved.get("data") == data_key:
                probe = nn.Linear(saved["dim"], num_classes)
                probe.load_state_dict(saved["state_dict"])
                return probe.eval(), saved["info"]
        except (StateFileError, KeyError, RuntimeError) as e:  # only a cache: trained again
            log.warning("the cached probe %s is not usable (%s); training it again", path, str(e)[:200])
    probe, info = train_linear_probe(emb, labels, num_classes, cfg)
    write_state(path, {"state_dict": probe.state_dict(), "info": info, "teacher": teacher_fingerprint,
                       "dim": int(emb.shape[1]), "num_classes": num_classes, "data": data_key})
    return probe, info


def text_embeddings_path(cache_dir: str | Path, teacher_slug: str, prompts: list[str],
                         templates: Optional[list[str]]) -> Path:
    key = hashlib.sha1(json.dumps([prompts, templates]).encode()).hexdigest()[:10]
    return Path(cache_dir) / "embeddings" / teacher_slug / "text" / f"text-{key}.npz"


def accuracy(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[float, list[float]]:
    """Top-1 accuracy in percent (core.metrics: unknown labels left out), overall and per class
    (NaN for absent classes)."""
    pred = logits.argmax(1)
    per_class = metrics.per_class_accuracy(pred, labels, [str(c) for c in range(num_classes)])
    return metrics.accuracy(pred, labels), [float("nan") if v is None else v for v in per_class.values()]


# ----------------------------------------------------------------------------- heads as data

def head_spec(kind: str, num_classes: int, dim: int, logit_scale: Optional[float] = None) -> dict:
    """What a head is, without its weights: enough to rebuild it (`build_head`)."""
    spec = {"kind": kind, "classes": int(num_classes), "dim": int(dim)}
    if kind == "text":
        spec["logit_scale"] = float(logit_scale)
    return spec


def build_head(spec: Optional[dict], state_dict: Optional[dict] = None) -> Optional[nn.Module]:
    """A teacher head from its spec and weights; random weights when none are given (a
    speed twin for benchmarks). None for no head."""
    if not spec:
        return None
    if spec["kind"] == "text":
        text = state_dict["text"] if state_dict is not None else torch.randn(spec["classes"], spec["dim"])
        return TextHead(text, spec["logit_scale"]).eval()
    if spec["kind"] == "linear":
        head = nn.Linear(spec["dim"], spec["classes"])
        if state_dict is not None:
            head.load_state_dict(state_dict)
        return head.eval()
    raise ConfigError(f"unknown head kind {spec['kind']!r}; expected text or linear")
