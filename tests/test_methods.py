"""Loss values pinned against hand-computed numbers (torchdistill style)."""

from __future__ import annotations

import math

import pytest
import torch

from clipdistill.core.errors import ConfigError
from clipdistill.distill.methods import (
    TERMS,
    Batch,
    Method,
    MethodContext,
    embedding_cosine,
    embedding_mse,
    kl_distillation,
    label_cross_entropy,
)
from clipdistill.teacher.heads import TextHead


def test_kl_of_identical_distributions_is_zero():
    logits = torch.randn(5, 10)
    assert kl_distillation(logits, logits.clone(), 1.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kl_distillation(logits, logits + 3.0, 2.0).item() == pytest.approx(0.0, abs=1e-6)  # shift-invariant


def test_kl_matches_hand_computation_and_batchmean():
    s = torch.tensor([[0.0, math.log(3.0)]])  # softmax = [0.25, 0.75]
    t = torch.tensor([[0.0, 0.0]])  # softmax = [0.5, 0.5]
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert kl_distillation(s, t, 1.0).item() == pytest.approx(expected, rel=1e-6)
    # batchmean: two identical rows give the same value, not half of it
    assert kl_distillation(s.repeat(2, 1), t.repeat(2, 1), 1.0).item() == pytest.approx(expected, rel=1e-6)


def test_kl_temperature_scaling_is_t_squared():
    s = torch.tensor([[0.0, 2 * math.log(3.0)]])  # at T=2: softmax(s/2) = [0.25, 0.75]
    t = torch.tensor([[0.0, 0.0]])
    kl_at_t = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert kl_distillation(s, t, 2.0).item() == pytest.approx(4.0 * kl_at_t, rel=1e-6)


def test_mse_and_cosine_values():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[0.0, 1.0], [0.0, 4.0]])
    assert embedding_mse(a, b).item() == pytest.approx((1 + 1 + 0 + 4) / 4)
    # rows: orthogonal (1 - 0) and parallel (1 - 1)
    assert embedding_cosine(a, b).item() == pytest.approx(0.5)


def test_label_cross_entropy_ignores_unlabeled():
    # the unlabeled row adds no loss but counts in the batch: each image weighs 1/N
    logits = torch.tensor([[2.0, 0.0], [0.0, 5.0]])
    labels = torch.tensor([0, -1])
    expected = -math.log(math.exp(2) / (math.exp(2) + 1)) / 2
    assert label_cross_entropy(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    none = label_cross_entropy(logits.requires_grad_(), torch.tensor([-1, -1]))
    assert none.item() == 0.0
    none.backward()  # still differentiable


def test_text_head_scales_cosines():
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    head = TextHead(text, logit_scale=100.0)
    out = head(torch.tensor([[3.0, 3.0]]))
    assert out[0, 0].item() == pytest.approx(100 / math.sqrt(2), rel=1e-6)


def test_method_parsing_output_kind_and_weights():
    assert Method("kl").output == "logits"
    assert Method("labels").uses_teacher is False and Method("labels").uses_unlabeled is False
    m = Method("kl+mse", [1.0, 0.5])
    assert m.output == "embedding" and m.out_dim(10, 64) == 64
    emb_s, emb_t = torch.randn(4, 8), torch.randn(4, 8)
    head = TextHead(torch.randn(3, 8), 100.0)
    b = Batch(emb_s, head(emb_s), torch.tensor([0, 1, -1, 2]), emb_t)
    terms = m.losses(b, MethodContext(head, 2.0))
    assert set(terms) == {"kl", "mse"}
    assert terms["mse"].item() == pytest.approx(0.5 * embedding_mse(emb_s, emb_t).item(), rel=1e-6)
    assert terms["kl"].item() == pytest.approx(kl_distillation(head(emb_s), head(emb_t), 2.0).item(), rel=1e-5)


@pytest.mark.parametrize("name", list(TERMS))
def test_every_registered_term_gives_a_finite_differentiable_loss(name):
    m = Method(name)
    dim = m.out_dim(3, 8)
    out = torch.randn(4, dim, requires_grad=True)
    head = TextHead(torch.randn(3, 8), 100.0)
    logits = out if m.output == "logits" else head(out)
    loss = sum(m.losses(Batch(out, logits, torch.tensor([0, 1, 2, -1]), torch.randn(4, 8)),
                        MethodContext(head, 1.0)).values())
    loss.backward()
    assert torch.isfinite(loss) and out.grad is not None and out.grad.abs().sum() > 0


def test_unknown_method_and_bad_weights_are_clear():
    with pytest.raises(ConfigError, match="--method.*valid: .*kl"):
        Method("kld")
    with pytest.raises(ConfigError, match="--loss-weights"):
        Method("kl+mse", [1.0])
