"""Distillation methods: a registry of small loss terms, combined with `+`.

Each term documents its formula. A method such as `kl+mse` is the weighted sum of its
terms (`--loss-weights 1,0.5`). The student's output kind follows from the terms: class
logits when every term works on logits (`labels`, `kl`), the teacher's embedding when any
term needs it (`mse`, `cosine`); an embedding student gets its logits through the same
frozen head as the teacher (text head or linear probe), which is how the study evaluates
its MSE students.

How the study's settings map onto the flags. The study computed targets as
`softmax(T * logits)` with T = 1 on the text head's *raw cosines* (range -1..1), which
gives nearly uniform targets, and called CLIP's logit scale (100) a temperature. Here the
text head's logits are `--logit-scale S` times the cosines, and KL uses
`softmax(logits / T)` with `--temperature T`:
- the study's reported text-head rows (T=1 on raw cosines): `--logit-scale 1 --temperature 1`
- its "T=100" trial, i.e. CLIP's own probabilities:           `--logit-scale 100 --temperature 1`
- its linear-head rows (probe logits, T=1):                   `--head linear --temperature 1`
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.errors import ConfigError
from ..core.registry import Registry
from .augment import Mix

# ----------------------------------------------------------------------------- loss functions

def label_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CE(logits, y) summed over the labelled samples (y >= 0) and divided by the whole
    batch: every image weighs the same in `kl+labels`, labelled or not. (Averaged over the
    labelled rows only, the few labelled images of shapes10's train+unlabeled each weighed as
    much as many unlabeled ones, and kl+labels collapsed far below kl alone, which this
    normalisation does not: README.md, "Beyond the study", has the figures.) Equal to the
    plain mean when every row is labelled."""
    mask = labels >= 0
    if not mask.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[mask].float(), labels[mask], reduction="sum") / len(labels)


def kl_distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al. (2015): T^2 * KL(softmax(t/T) || softmax(s/T)), averaged over the batch
    (`batchmean`, the true KL; the study's default `mean` also divided by the class count).
    The T^2 keeps gradient magnitudes comparable across temperatures."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits.float() / t, dim=-1),
                    F.log_softmax(teacher_logits.float() / t, dim=-1),
                    reduction="batchmean", log_target=True) * (t * t)


def embedding_mse(student_emb: torch.Tensor, teacher_emb: torch.Tensor) -> torch.Tensor:
    """mean((s - t)^2) over batch and dimensions: the study's feature distillation."""
    return F.mse_loss(student_emb.float(), teacher_emb.float())


def embedding_cosine(student_emb: torch.Tensor, teacher_emb: torch.Tensor) -> torch.Tensor:
    """mean(1 - cos(s, t)): matches the direction only, which is all the text head and a
    normalised probe look at."""
    return (1.0 - F.cosine_similarity(student_emb.float(), teacher_emb.float(), dim=-1)).mean()


# ----------------------------------------------------------------------------- terms

@dataclass(frozen=True)
class Term:
    name: str
    needs: str  # "logits" or "embedding": what the student's output must be for this term
    uses_teacher: bool
    uses_unlabeled: bool
    fn: Callable[["Batch", "MethodContext"], torch.Tensor]
    summary: str


@dataclass
class Batch:
    student_out: torch.Tensor
    student_logits: torch.Tensor
    labels: torch.Tensor
    teacher_emb: torch.Tensor  # of the very view the student saw (online teaching), or of the plain image
    mix: Optional["Mix"] = None  # the mixup draw the inputs went through, if any


@dataclass
class MethodContext:
    teacher_head: Optional[nn.Module]  # teacher embedding -> class logits (text head or probe)
    temperature: float = 1.0


TERMS: Registry[Term] = Registry("distillation method", flag="--method")


def _term(name: str, needs: str, uses_teacher: bool, summary: str):
    def deco(fn):
        TERMS.add(name, Term(name, needs, uses_teacher, uses_teacher, fn, summary))
        return fn
    return deco


@_term("labels", "logits", False, "cross-entropy on ground-truth labels (training from scratch); unlabeled ignored")
def _labels(b: Batch, ctx: MethodContext) -> torch.Tensor:
    if b.mix is None:
        return label_cross_entropy(b.student_logits, b.labels)
    # mixed inputs: each label weighs as much as its image does in the mix
    return (b.mix.lam * label_cross_entropy(b.student_logits, b.labels) +
            (1 - b.mix.lam) * label_cross_entropy(b.student_logits, b.labels[b.mix.perm.to(b.labels.device)]))


@_term("kl", "logits", True, "KL to the teacher's class probabilities from --head, temperature --temperature")
def _kl(b: Batch, ctx: MethodContext) -> torch.Tensor:
    with torch.no_grad():
        t_logits = ctx.teacher_head(b.teacher_emb.float())
    return kl_distillation(b.student_logits, t_logits, ctx.temperature)


@_term("mse", "embedding", True, "MSE to the teacher's image embedding (feature distillation)")
def _mse(b: Batch, ctx: MethodContext) -> torch.Tensor:
    return embedding_mse(b.student_out, b.teacher_emb)


@_term("cosine", "embedding", True, "1 - cosine similarity to the teacher's image embedding")
def _cosine(b: Batch, ctx: MethodContext) -> torch.Tensor:
    return embedding_cosine(b.student_out, b.teacher_emb)


class Method:
    """A parsed `--method` such as `kl` or `kl+mse` with its weights."""

    def __init__(self, spec: str, weights: Optional[list[float]] = None):
        names = [n.strip() for n in spec.split("+") if n.strip()]
        if not names:
            raise ConfigError(f"--method {spec!r}: give a method, e.g. {', '.join(TERMS)} or kl+mse")
        self.terms = [TERMS.get(n) for n in names]
        if len(set(names)) != len(names):
            raise ConfigError(f"--method {spec!r}: a term appears twice")
        weights = list(weights) if weights else [1.0] * len(names)
        if len(weights) != len(names):
            raise ConfigError(f"--loss-weights: {len(weights)} weights for {len(names)} terms of {spec!r}; "
                              f"give one per term, e.g. --loss-weights {','.join(['1'] * len(names))}")
        if any(not (w >= 0) for w in weights) or not any(w > 0 for w in weights):
            raise ConfigError(f"--loss-weights {','.join(map(str, weights))}: every weight must be >= 0 (a negative "
                              f"weight maximises its term) and at least one > 0")
        self.weights = weights
        self.spec = "+".join(names)

    @property
    def output(self) -> str:
        return "embedding" if any(t.needs == "embedding" for t in self.terms) else "logits"

    @property
    def uses_teacher(self) -> bool:
        return any(t.uses_teacher for t in self.terms)

    @property
    def uses_unlabeled(self) -> bool:
        return any(t.uses_unlabeled for t in self.terms)

    def out_dim(self, num_classes: int, embed_dim: int) -> int:
        return embed_dim if self.output == "embedding" else num_classes

    def losses(self, b: Batch, ctx: MethodContext) -> dict[str, torch.Tensor]:
        """Named, weighted terms; the trainer minimises their sum."""
        return {t.name: w * t.fn(b, ctx) for t, w in zip(self.terms, self.weights)}


def describe_methods() -> str:
    return "\n".join(f"  {name:<8} {TERMS.get(name).summary}" for name in TERMS)
