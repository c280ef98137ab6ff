"""IdleViT keeps ⌊n · r⌋ image tokens per idle layer, as the authors' ``int(init_n * keep_ratio)``."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from vitkd.efficient.idlevit import IdleViT
from vitkd.errors import VitkdInputError


@pytest.fixture(scope="module")
def vit196():
    """A narrow ViT on 224×224 images with 16×16 patches: the 196 patches of DeiT."""
    torch.manual_seed(0)
    return VisionTransformer(img_size=224, patch_size=16, embed_dim=8, depth=3, num_heads=2, num_classes=3).eval()


@pytest.mark.parametrize("ratios", [[0.7, 0.49, 0.343], [0.7, 0.7**2, 0.7**3]])  # DeiT's base rate 0.7, per stage
def test_keep_counts_are_the_authors_floor(vit196, ratios):
    m = IdleViT(vit196, keep_ratio=ratios, idle_layers=[0, 1, 2])
    assert m.keep == {0: 137, 1: 96, 2: 67}  # ⌈·⌉ would give 138, 97, 68
    counts = []
    hooks = [b.mlp.register_forward_hook(lambda _m, i, _o: counts.append(i[0].shape[1])) for b in vit196.blocks]
    with torch.no_grad():
        m(torch.randn(1, 3, 224, 224))
    for h in hooks:
        h.remove()
    assert counts == [138, 97, 68]  # the computed tokens reach the MLP with CLS


def test_a_ratio_that_keeps_no_token_is_refused(vit196):
    assert IdleViT(vit196, keep_ratio=1 / 196 + 1e-9, idle_layers=[2]).keep == {2: 1}
    with pytest.raises(VitkdInputError, match="keeps 0 of 196 patches"):
        IdleViT(vit196, keep_ratio=0.004, idle_layers=[2])
