"""Each loss term against a value computed by hand on small tensors."""

import math

import pytest
import torch

from vitkd.errors import VitkdInputError
from vitkd.losses import NoisyAdaptation, adapted_cross_entropy, cls_relation, kd_loss, probe_relation_loss
from vitkd.selection.scoring import attention_value, confidence_value, selection_value


def test_kd_loss_by_hand():
    s = torch.tensor([[0.0, math.log(3.0)]])  # softmax at T=1: [1/4, 3/4]
    t = torch.tensor([[0.0, 0.0]])  # [1/2, 1/2]
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert kd_loss(s, t, temperature=1.0).item() == pytest.approx(expected, abs=1e-6)
    # T² scaling: at T=2 the logits are halved, then the KL is multiplied by 4
    s2, t2 = s * 2, t * 2
    assert kd_loss(s2, t2, temperature=2.0).item() == pytest.approx(4 * expected, abs=1e-6)
    # a batch of two different rows: the mean over the batch (a second row whose student equals its teacher adds 0)
    both = kd_loss(torch.cat([s, t]), torch.cat([t, t]), temperature=1.0).item()
    assert both == pytest.approx(expected / 2, abs=1e-6)


def test_noisy_adaptation_matrix_and_ce_by_hand():
    q = NoisyAdaptation(3, diagonal=0.7)
    m = q.matrix()
    # zero-initialised θ: off-diagonal mass (1 - 0.7) spread uniformly
    expected = torch.tensor([[0.7, 0.15, 0.15], [0.15, 0.7, 0.15], [0.15, 0.15, 0.7]])
    assert torch.allclose(m, expected, atol=1e-6)
    with torch.no_grad():
        q.theta[0] = torch.tensor([math.log(3.0), 0.0])  # row 0 off-diagonals: 3:1 → 0.225, 0.075
    m = q.matrix()
    assert torch.allclose(m[0], torch.tensor([0.7, 0.225, 0.075]), atol=1e-6)
    assert torch.allclose(m.sum(1), torch.ones(3), atol=1e-6)
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    p_adapted = torch.tensor([0.5, 0.25, 0.25]) @ m
    ce = adapted_cross_entropy(logits, torch.tensor([1]), m)
    assert ce.item() == pytest.approx(-math.log(p_adapted[1].item()), abs=1e-6)
    # gradients reach θ through the CE term
    q(logits, torch.tensor([1])).backward()
    assert q.theta.grad is not None and q.theta.grad.abs().sum() > 0


def test_noisy_adaptation_rejects_bad_diagonal():
    with pytest.raises(VitkdInputError, match="diagonal 1.5"):
        NoisyAdaptation(3, 1.5)


def test_cls_relation_and_probe_loss_by_hand():
    # one sample, CLS + 2 patches, 2 channels
    f = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]]])
    # channel norm: per-token unit vectors → cosines of CLS with each patch
    assert torch.allclose(cls_relation(f, "channel"), torch.tensor([[1 / math.sqrt(2), 0.0]]), atol=1e-6)
    # token norm (authors' code): each channel normalised over the 3 tokens
    c0 = torch.tensor([1.0, 1.0, 0.0]) / math.sqrt(2)
    c1 = torch.tensor([0.0, 1.0, 2.0]) / math.sqrt(5)
    expected = torch.tensor([[c0[0] * c0[1] + c1[0] * c1[1], c0[0] * c0[2] + c1[0] * c1[2]]])
    assert torch.allclose(cls_relation(f, "token"), expected, atol=1e-6)
    # L_P: mean squared difference of the CLS rows, averaged over layer pairs
    g = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]])  # another width (3)
    rg = cls_relation(g, "channel")  # [1, 0]
    rf = cls_relation(f, "channel")
    want = ((rf - rg) ** 2).mean().item()
    assert probe_relation_loss([f, f], [g, g], "channel").item() == pytest.approx(want, abs=1e-6)
    assert want == pytest.approx(((1 / math.sqrt(2) - 1) ** 2) / 2, abs=1e-6)
    # two different pairs: the mean of the two (the second pair, f against itself, is 0)
    assert probe_relation_loss([f, f], [g, f], "channel").item() == pytest.approx(want / 2, abs=1e-6)


def test_attention_value_by_hand():
    uniform = torch.full((1, 4), 0.25)
    peaked = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    assert attention_value(uniform).item() == pytest.approx(1.0, abs=1e-6)
    assert attention_value(peaked).item() == pytest.approx(0.5, abs=1e-6)  # 1 / (1 · √4)
    assert attention_value(peaked.reshape(1, 2, 2)).item() == pytest.approx(0.5, abs=1e-6)
    # per sample in a batch, not a batch mean
    assert torch.allclose(attention_value(torch.cat([uniform, peaked])), torch.tensor([1.0, 0.5]), atol=1e-6)


def test_confidence_and_selection_value_by_hand():
    logits = torch.log(torch.tensor([[0.8, 0.2], [0.5, 0.5]]))
    vn = confidence_value(logits)
    assert torch.allclose(vn, torch.tensor([-math.log(0.8), -math.log(0.5)]), atol=1e-6)
    va = [torch.tensor([0.5, 1.0]), torch.tensor([0.6, 0.9])]
    v = selection_value(va, vn, [0.05, 0.05], 0.9)
    assert torch.allclose(v, 0.9 * vn + 0.05 * (va[0] + va[1]), atol=1e-6)
    # one λ_a per probed block (Eq. 6), by hand: sample 0 = 0.1·0.5 + 0.4·0.6 + 0.5·(−ln 0.8)
    v = selection_value(va, vn, [0.1, 0.4], 0.5)
    assert v[0].item() == pytest.approx(0.1 * 0.5 + 0.4 * 0.6 - 0.5 * math.log(0.8), abs=1e-6)
    assert v[1].item() == pytest.approx(0.1 * 1.0 + 0.4 * 0.9 - 0.5 * math.log(0.5), abs=1e-6)
