"""GTP attention sparsification θ (GTP-ViT, arXiv 2311.03035): hand-computed maps, and the option in GTPViT."""

from __future__ import annotations

import math

import pytest
import torch
from timm.models.vision_transformer import Attention

from vitkd.efficient import gtp
from vitkd.efficient.gtp import GTPViT, sparse_attend, sparsify_attention, split_tokens
from vitkd.errors import VitkdInputError
from vitkd.models import create_model

# Two heads of a 2-token map. Head 0 sorted: .3 .4 .6 .7; head 1 sorted: .1 .5 .5 .9.
MAP = torch.tensor([[[[0.7, 0.3], [0.4, 0.6]], [[0.5, 0.5], [0.1, 0.9]]]])


def test_sparsify_by_hand():
    # θ = 0.5: k = ⌊4 · 0.5⌋ = 2, threshold = 2nd smallest (.4 and .5); entries below it become 0, ties stay
    half = torch.tensor([[[[0.7, 0.0], [0.4, 0.6]], [[0.5, 0.5], [0.0, 0.9]]]])
    assert torch.equal(sparsify_attention(MAP, 0.5), half)
    # θ = 0.25: k = 3, thresholds .6 and .5
    quarter = torch.tensor([[[[0.7, 0.0], [0.0, 0.6]], [[0.5, 0.5], [0.0, 0.9]]]])
    assert torch.equal(sparsify_attention(MAP, 0.25), quarter)
    # θ = 0.75: k = 1, the threshold is the minimum: nothing is below it; θ = 1: k = 0, off
    assert torch.equal(sparsify_attention(MAP, 0.75), MAP)
    assert sparsify_attention(MAP, 1.0) is MAP


def test_sparse_attend_by_hand():
    attn = Attention(dim=1, num_heads=1).eval()  # head_dim 1: scale 1
    q = k = torch.tensor([[[[1.0], [0.0]]]])
    v = torch.tensor([[[[2.0], [10.0]]]])
    # logits: row 0 (1, 0) → softmax (e/(e+1), 1/(e+1)) ≈ (.731, .269); row 1 (0, 0) → (.5, .5)
    # θ = 0.5: k = 2, threshold .5 → the .269 goes, rows are not renormalised
    out, a = sparse_attend(attn, q, k, v, None, 0.5)
    p = math.e / (math.e + 1)
    torch.testing.assert_close(a, torch.tensor([[[[p, 0.0], [0.5, 0.5]]]]))
    torch.testing.assert_close(out, torch.tensor([[[2 * p], [0.5 * 2 + 0.5 * 10]]]))
    # token sizes (1, e) add log e = 1 to the second key's logit:
    # row 0 (1, 1) → (.5, .5); row 1 (0, 1) → (.269, .731); the .269 goes
    _, a = sparse_attend(attn, q, k, v, torch.tensor([[0.0, 1.0]]), 0.5)
    torch.testing.assert_close(a, torch.tensor([[[[0.5, 0.5], [0.0, p]]]]))


def test_stable_tie_break_keeps_the_earlier_token():
    kept, prop = split_tokens(torch.tensor([[0.5, 0.0, 0.0, 0.2, 0.0]]), num_prop=2)
    assert kept.tolist() == [[0, 1, 3]] and prop.tolist() == [[2, 4]]


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return create_model("test_vit_patch4_16").eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))


def test_theta_one_is_todays_gtp_and_theta_below_one_selects_on_the_sparse_map(vit, images, monkeypatch):
    with torch.no_grad():
        plain = GTPViT(vit, num_prop=[3, 1])(images)
        assert torch.equal(GTPViT(vit, num_prop=[3, 1], sparsity=1.0)(images), plain)
        seen = []
        real = gtp.token_importance
        monkeypatch.setattr(gtp, "token_importance", lambda amap, p: seen.append(amap) or real(amap, p))
        sparse = GTPViT(vit, num_prop=[3, 1], sparsity=0.5)(images)
    # block 0: 17 tokens, k = ⌊289 · 0.5⌋ = 144, so 143 entries of each (image, head) map fall below the threshold
    zeros = (seen[0] == 0).flatten(-2).sum(-1)
    assert (zeros == 143).all()
    assert not torch.allclose(sparse, plain)


def test_theta_per_block_and_bad_values(vit, images):
    with torch.no_grad():
        mixed = GTPViT(vit, num_prop=[3, 1], sparsity=[1.0, 0.5])(images)
        assert not torch.allclose(mixed, GTPViT(vit, num_prop=[3, 1], sparsity=0.5)(images))
    for bad in (0.0, 1.5, [0.5]):
        with pytest.raises(VitkdInputError, match="sparsity"):
            GTPViT(vit, sparsity=bad)
