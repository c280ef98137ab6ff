"""Generators and generator loss terms: shapes, ranges, and each term against a value worked out by hand."""

import math

import pytest
import torch

from vitkd.errors import VitkdInputError
from vitkd.generators import DAFLGenerator, TransformerGenerator, photometric_view
from vitkd.losses import probe_relation_loss
from vitkd.losses.dafl import activation_loss, dafl_loss, information_entropy_loss, onehot_loss
from vitkd.losses.data_free import (
    adversarial_loss,
    attention_consistency_loss,
    attention_loss,
    attention_peak_loss,
    discrepancy_loss,
    generator_loss,
)
from vitkd.stages.data_free import rank_noise_generator


@pytest.mark.parametrize("cls", [DAFLGenerator, TransformerGenerator])
@pytest.mark.parametrize("size,chans", [(16, 1), (32, 3)])
def test_generator_shape_and_range(cls, size, chans):
    torch.manual_seed(0)
    g = cls(img_size=size, in_chans=chans, latent_dim=20)
    x = g(torch.randn(4, 20) * 50)  # large noise drives tanh into saturation
    assert x.shape == (4, chans, size, size)
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert x.std() > 0  # not a constant image
    x.sum().backward()
    assert all(p.grad is not None for p in g.parameters() if p.requires_grad)


def test_transformer_generator_any_patch_grid_and_bad_sizes():
    assert TransformerGenerator(img_size=12, in_chans=2, latent_dim=8, patch_size=3)(torch.randn(2, 8)).shape == (
        2,
        2,
        12,
        12,
    )
    with pytest.raises(VitkdInputError, match="patch_size"):
        TransformerGenerator(img_size=10, patch_size=4)
    with pytest.raises(VitkdInputError, match="divisible by 4"):
        DAFLGenerator(img_size=10)


def test_transformer_generator_tokens_attend_across_patches():
    """Patch-level self-attention: changing one token's position embedding changes other patches' pixels."""
    torch.manual_seed(0)
    g = TransformerGenerator(img_size=8, latent_dim=4, patch_size=4, embed_dim=16, depth=1, num_heads=2).eval()
    z = torch.randn(1, 4)
    a = g(z)
    with torch.no_grad():
        g.pos_embed[0, 0] += torch.randn(16)  # token of the top-left patch
    b = g(z)
    far = (slice(None), slice(None), slice(5, 8), slice(5, 8))  # bottom-right patch, out of the seam conv's reach
    assert not torch.allclose(a[far], b[far])


def test_onehot_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    expected = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-1))) / 2
    assert onehot_loss(logits).item() == pytest.approx(expected, rel=1e-6)


def test_information_entropy_loss_by_hand():
    assert information_entropy_loss(torch.zeros(3, 2)).item() == pytest.approx(math.log10(0.5), rel=1e-6)
    # one confident sample (p = [1, 0]) and one uniform: p̄ = [0.75, 0.25]
    logits = torch.tensor([[100.0, 0.0], [0.0, 0.0]])
    expected = 0.75 * math.log10(0.75) + 0.25 * math.log10(0.25)
    assert information_entropy_loss(logits).item() == pytest.approx(expected, rel=1e-5)
    # balanced classes give the minimum −log10 C
    assert information_entropy_loss(torch.eye(10) * 100).item() == pytest.approx(-1.0, rel=1e-5)


def test_activation_and_discrepancy_by_hand():
    assert activation_loss(torch.tensor([[1.0, -2.0], [3.0, -4.0]])).item() == pytest.approx(-2.5)
    s, t = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 4.0]])
    assert discrepancy_loss(s, t).item() == pytest.approx(-1.5)


def test_dafl_loss_weights_and_switches():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    feats = torch.tensor([[1.0, -2.0], [3.0, -4.0]])
    terms = dafl_loss(logits, feats, oh_weight=2.0, ie_weight=3.0, act_weight=0.5)
    assert terms["oh"].item() == pytest.approx(2 * onehot_loss(logits).item())
    assert terms["ie"].item() == pytest.approx(3 * information_entropy_loss(logits).item())
    assert terms["act"].item() == pytest.approx(0.5 * -2.5)
    assert set(dafl_loss(logits, feats, 1.0, 0.0, 0.0)) == {"oh"}
    adv = adversarial_loss(logits, feats, torch.zeros(2, 2), 0.0, 0.0, 0.0, disc_weight=2.0)
    assert set(adv) == {"disc"} and adv["disc"].item() == pytest.approx(2 * -(2 + 0 + 0 + 1) / 4)


def test_attention_peak_loss_by_hand():
    peaked = torch.tensor([[1.0, 0.0, 0.0, 0.0]])  # cos to uniform = 1/√4
    flat = torch.full((1, 4), 0.25)  # cos to uniform = 1
    assert attention_peak_loss([peaked]).item() == pytest.approx(0.5, rel=1e-6)
    assert attention_peak_loss([peaked, flat]).item() == pytest.approx(0.75, rel=1e-6)


def test_attention_consistency_loss_by_hand():
    a = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    b = torch.tensor([[0.0, 1.0], [0.6, 0.8]])  # orthogonal rows → 1, equal rows → 0
    assert attention_consistency_loss([a], [b]).item() == pytest.approx(0.5, abs=1e-6)
    assert attention_consistency_loss([a, a], [b, a]).item() == pytest.approx(0.25, abs=1e-6)


def test_attention_loss_and_generator_loss_compose():
    p = [torch.tensor([[1.0, 0.0, 0.0, 0.0]])]
    terms = attention_loss(p, p, peak_weight=2.0, consistency_weight=3.0)
    assert terms["attn_peak"].item() == pytest.approx(1.0) and terms["attn_cons"].item() == pytest.approx(0.0, abs=1e-6)
    assert set(attention_loss(p, None, 1.0, 0.0)) == {"attn_peak"}
    adv = {"oh": torch.tensor(1.0), "ie": torch.tensor(2.0)}
    attn = {"attn_peak": torch.tensor(3.0)}
    assert generator_loss(adv, attn, 0.5).item() == pytest.approx(4.5)
    assert generator_loss(adv, attn, 0.0).item() == pytest.approx(3.0)


def test_photometric_view():
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    assert torch.allclose(photometric_view(x, 0.0), x)
    x.requires_grad_(True)
    v = photometric_view(x, 0.5, torch.Generator().manual_seed(0))
    assert v.shape == x.shape and v.min() >= -1 and v.max() <= 1 and not torch.allclose(v, x)
    v.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_rank_noise_streams():
    a0 = torch.randn(5, generator=rank_noise_generator(7, 0))
    a1 = torch.randn(5, generator=rank_noise_generator(7, 1))
    assert torch.equal(a0, torch.randn(5, generator=rank_noise_generator(7, 0)))
    assert not torch.allclose(a0, a1)
    assert torch.equal(a1, torch.randn(5, generator=rank_noise_generator(8, 0)))  # seed + rank, as specified


def test_attention_terms_reach_the_generator(tiny_teacher):
    """L_attention is differentiable through the teacher's probe hooks back to the generator's weights."""
    from vitkd.models import AttentionProbe
    from vitkd.teacher import load_teacher

    teacher, _ = load_teacher(tiny_teacher)
    probe = AttentionProbe(teacher, [0, 1], "mean")
    g = TransformerGenerator(img_size=16, latent_dim=8, embed_dim=16, depth=1, num_heads=2)
    teacher(g(torch.randn(4, 8)))
    rows = probe.rows()
    attention_peak_loss([rows[0], rows[1]]).backward()
    assert g.to_tokens.weight.grad is not None and g.to_tokens.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_probe_relation_loss_averages_two_different_pairs_by_hand():
    """L_patch (the generator stage's student term) over two layer pairs whose hand values differ: the mean of
    the per-pair MSEs of the CLS relation rows, not the first pair's, the last pair's or their sum."""
    # one sample, CLS + 2 patches; channel norm: each token's features scaled to unit length
    s1 = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]]])  # CLS row [1/√2, 0]
    s2 = torch.tensor([[[1.0, 0.0], [0.0, 3.0], [2.0, 0.0]]])  # CLS row [0, 1]
    t = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]])  # width 3; CLS row [1, 0]
    pair1 = ((1 / math.sqrt(2) - 1) ** 2 + 0.0**2) / 2  # ≈ 0.0429
    pair2 = ((0.0 - 1) ** 2 + (1.0 - 0) ** 2) / 2  # = 1
    assert probe_relation_loss([s1], [t], "channel").item() == pytest.approx(pair1, abs=1e-6)
    assert probe_relation_loss([s2], [t], "channel").item() == pytest.approx(pair2, abs=1e-6)
    assert probe_relation_loss([s1, s2], [t, t], "channel").item() == pytest.approx(
        (pair1 + pair2) / 2, abs=1e-6
    )  # ≈ 0.5214
    assert probe_relation_loss([s2, s1], [t, t], "channel").item() == pytest.approx((pair1 + pair2) / 2, abs=1e-6)


def test_class_entropy_shows_a_collapsed_generator(tiny_teacher):
    """val/class_entropy is 0 when the teacher puts every generated image in one class, 1 when balanced."""
    import math

    from vitkd.stages.data_free import DataFreeGAN

    stage = DataFreeGAN(
        arch="test_vit_patch4_16", teacher_ckpt=str(tiny_teacher), generator="dafl", generator_kwargs={"width": 8}
    )
    logged = {}
    stage.log = lambda k, v, **kw: logged.__setitem__(k, float(v))
    stage._val_classes = torch.tensor([0.0, 0.0, 7.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    stage.on_validation_epoch_end()
    assert logged["val/class_entropy"] == pytest.approx(0.0, abs=1e-6)
    stage._val_classes = torch.full((10,), 3.0)
    stage.on_validation_epoch_end()
    assert logged["val/class_entropy"] == pytest.approx(1.0, abs=1e-6)
    stage._val_classes = torch.tensor([1.0, 1.0] + [0.0] * 8)
    stage.on_validation_epoch_end()
    assert logged["val/class_entropy"] == pytest.approx(math.log(2) / math.log(10), abs=1e-6)
