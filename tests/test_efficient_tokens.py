"""GTP, ToMe and IdleViT on a tiny timm ViT: exactness when nothing is reduced, and the rules themselves."""

from __future__ import annotations

import copy

import pytest
import torch

from vitkd.efficient import vit_parts as vp
from vitkd.efficient.gtp import GTPViT, normalize_graph, propagate, semantic_graph, spatial_graph
from vitkd.efficient.idlevit import IdleViT, token_cut_loss
from vitkd.efficient.tome import ToMeViT, bipartite_soft_matching, merge_weighted_average
from vitkd.errors import VitkdInputError
from vitkd.models import create_model


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return create_model("test_vit_patch4_16").eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))


def _reference(vit, images):
    u = vp.unfused(copy.deepcopy(vit))
    with torch.no_grad():
        return u, u(images), vit(images)


@pytest.mark.parametrize(
    "make",
    [
        lambda m: GTPViT(m, num_prop=0),
        lambda m: ToMeViT(m, r=0),
        lambda m: IdleViT(m, keep_ratio=1.0, idle_layers=[0, 1]),
    ],
)
def test_no_reduction_reproduces_the_logits(vit, images, make):
    u, ref_unfused, ref_fused = _reference(vit, images)
    with torch.no_grad():
        out = make(u)(images)
    assert torch.equal(out, ref_unfused)  # bit-identical to timm's explicit attention path
    torch.testing.assert_close(out, ref_fused, rtol=0, atol=1e-5)  # and to the fused default up to kernel rounding


def _mlp_token_counts(model, wrapper, images):
    counts = []
    hooks = [b.mlp.register_forward_hook(lambda _m, i, _o: counts.append(i[0].shape[1])) for b in model.blocks]
    with torch.no_grad():
        wrapper(images)
    for h in hooks:
        h.remove()
    return counts


def test_gtp_and_tome_remove_the_configured_tokens_per_block(vit, images):
    assert _mlp_token_counts(vit, GTPViT(vit, num_prop=[3, 1]), images) == [14, 13]
    assert _mlp_token_counts(vit, ToMeViT(vit, r=2), images) == [15, 13]
    with pytest.raises(VitkdInputError):
        GTPViT(vit, num_prop=8)  # 16 patches, 2 blocks: nothing would be left


def test_spatial_graph_is_the_8_neighbourhood():
    deg = spatial_graph((3, 3)).sum(-1)
    assert deg.tolist() == [3, 5, 3, 5, 8, 5, 3, 5, 3]
    assert spatial_graph((3, 3))[4, 4] == 0


def test_semantic_graph_is_symmetric_knn_without_self_loops():
    adj = semantic_graph(torch.randn(2, 9, 5, generator=torch.Generator().manual_seed(0)), num_neighbours=2)
    assert torch.equal(adj, adj.transpose(1, 2))
    assert adj.diagonal(dim1=1, dim2=2).abs().sum() == 0
    assert (adj.sum(-1) >= 2).all()
    w = normalize_graph(adj)
    d = adj.sum(-1).rsqrt()
    torch.testing.assert_close(w, d[..., :, None] * adj * d[..., None, :])


def test_gtp_propagation_adds_alpha_times_the_weighted_propagated_mass():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 9, 4, generator=g)
    size = torch.rand(1, 9, generator=g) + 1
    w = normalize_graph(spatial_graph((3, 3)))[None]
    kept, prop = torch.tensor([[1, 2, 5, 6, 7, 8]]), torch.tensor([[0, 3, 4]])
    alpha = 0.3
    xk, sk, w_next, lost = propagate(x, size, w, kept, prop, alpha)
    for row, k in enumerate(kept[0].tolist()):  # the rule, token by token
        expect = x[0, k] + alpha * sum(w[0, k, p] * x[0, p] for p in prop[0].tolist())
        torch.testing.assert_close(xk[0, row], expect)
    # mass: Σ_kept Δx = α Σ_p (Σ_k W[k,p]) x_p, and the same for token sizes
    col = w[0][kept[0]][:, prop[0]].sum(0)
    torch.testing.assert_close(xk.sum(1) - x[0, kept[0]].sum(0), alpha * (col[:, None] * x[0, prop[0]]).sum(0)[None])
    torch.testing.assert_close(sk.sum() - size[0, kept[0]].sum(), alpha * (col * size[0, prop[0]]).sum())
    assert torch.equal(w_next[0], w[0][kept[0]][:, kept[0]])  # not renormalised
    assert lost == 0


def test_gtp_conserves_mass_exactly_when_each_propagated_token_spreads_weight_one():
    x = torch.randn(1, 4, 3, generator=torch.Generator().manual_seed(2))
    w = torch.tensor([[[0, 0.5, 0.2, 0.0], [0.5, 0, 0.8, 0.0], [0.2, 0.8, 0, 1.0], [0.0, 0.0, 1.0, 0]]])
    w[0, 1, 0], w[0, 2, 0] = 0.4, 0.6  # column 0 over the kept rows sums to 1; column 3 too (0 + 1.0)
    kept, prop = torch.tensor([[1, 2]]), torch.tensor([[0, 3]])
    xk, _, _, lost = propagate(x, None, w, kept, prop, alpha=1.0)
    torch.testing.assert_close(xk.sum(1), x.sum(1))
    assert lost == 0


def test_gtp_token_without_kept_neighbour_is_lost():
    x = torch.randn(1, 9, 2)
    w = normalize_graph(spatial_graph((3, 3)))[None]
    kept, prop = torch.tensor([[2, 5, 6, 7, 8]]), torch.tensor([[0, 1, 3, 4]])  # corner 0's neighbours 1,3,4 all go
    _, _, _, lost = propagate(x, None, w, kept, prop, alpha=0.1)
    assert lost == pytest.approx(0.25)


def test_tome_merge_keeps_cls_first_and_conserves_size_weighted_mass():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 9, 4, generator=g)
    size = torch.rand(2, 9, generator=g) + 0.5
    merge = bipartite_soft_matching(torch.randn(2, 9, 6, generator=g), r=3)
    xm, sm = merge_weighted_average(merge, x, size)
    assert xm.shape == (2, 6, 4) and sm.shape == (2, 6)
    torch.testing.assert_close(xm[:, 0], x[:, 0])
    torch.testing.assert_close(sm.sum(1), size.sum(1))
    torch.testing.assert_close((xm * sm[..., None]).sum(1), (x * size[..., None]).sum(1))


def test_tome_merges_the_most_similar_pair():
    metric = torch.tensor([[[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0.9, 0.1], [1, 1, 1]]])  # A = 0,2,4; B = 1,3
    x = torch.arange(5.0)[None, :, None]
    merged = bipartite_soft_matching(metric, r=1)(x)
    # A token 2 → best B cos .11 (token 3); A token 4 → best B cos .64 (token 3), the strongest edge: 4 merges into 3.
    # Output: unmerged A in order (CLS 0, token 2), then B with sums (1, 3 + 4).
    assert merged[0, :, 0].tolist() == [0.0, 2.0, 1.0, 7.0]


def test_idle_tokens_pass_through_unchanged(images):
    torch.manual_seed(0)
    m = create_model("test_vit_patch4_16", depth=1).eval()
    wrapped = IdleViT(m, keep_ratio=0.25, idle_layers=[0])
    seen = []
    h = m.norm.register_forward_hook(lambda _m, i, _o: seen.append(i[0]))
    with torch.no_grad():
        wrapped(images)
        x0 = vp.embed(m, images)
    h.remove()
    out = seen[0]
    same = (out == x0).all(-1)  # (B, N)
    assert same[:, 0].logical_not().all()  # CLS is always computed
    assert (same[:, 1:].sum(1) == 12).all()  # 16 patches, 4 computed, 12 idle and untouched


def test_token_cut_loss_by_hand():
    w = torch.tensor([[[0.5, 0.25, 0.25], [0.2, 0.6, 0.2], [0.1, 0.3, 0.6]]])
    m = torch.tensor([[1.0, 1.0, 0.0]])
    # cut r = (.25, .2, .3): MSE .1925/3; association a = (.75, .8, 0) vs m: MSE .1025/3
    assert token_cut_loss(w, m).item() == pytest.approx((0.1925 + 0.1025) / 3, abs=1e-6)


def test_idlevit_training_path_is_differentiable(vit, images):
    m = copy.deepcopy(vit).train()
    logits, feats, cut = IdleViT(m, keep_ratio=0.5).forward_aux(images, with_cut_loss=True)
    (logits.sum() + cut).backward()
    assert m.blocks[1].attn.qkv.weight.grad is not None and cut.item() > 0
