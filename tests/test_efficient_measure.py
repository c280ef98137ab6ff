"""FLOPs of a tiny ViT against a formula; throughput figures are stated with their settings."""

from __future__ import annotations

import timm

from vitkd.efficient.measure import flops_per_image, linear_macs_per_image, measure, throughput
from vitkd.models import create_model


def _formula(img=16, patch=4, chans=1, d=16, depth=2, classes=10, mlp_ratio=4):
    """Per image, with N = patches + CLS tokens of width d:
    patch conv: P·d·(c·p²) MACs; per block: qkv 3Nd², proj Nd², MLP 2·r·Nd² (Linear MACs = 12Nd² at r = 4)
    and the attention matmuls q·kᵀ and A·v, N²d each; head: d·classes (CLS only). FLOPs = 2 × MACs."""
    p = (img // patch) ** 2
    n = p + 1
    conv = p * d * chans * patch * patch
    linear_block = n * d * d * (4 + 2 * mlp_ratio)
    attn_block = 2 * n * n * d
    head = d * classes
    macs_linear = conv + depth * linear_block + head
    flops = 2 * (macs_linear + depth * attn_block)
    return flops, macs_linear


def test_flops_of_tiny_vit_match_the_formula():
    m = create_model("test_vit_patch4_16")
    flops, macs = _formula()
    assert flops_per_image(m, (1, 16, 16)) == flops == 254400
    assert linear_macs_per_image(m, (1, 16, 16)) == macs == 108704
    wide = create_model("test_vit_patch4_16", embed_dim=32, depth=3)
    assert flops_per_image(wide, (1, 16, 16)) == _formula(d=32, depth=3)[0]


def test_flop_count_does_not_change_the_model():
    m = create_model("test_vit_patch4_16")
    flops_per_image(m, (1, 16, 16))
    assert all(
        getattr(mod, "fused_attn", True) == timm.layers.use_fused_attn()
        for mod in m.modules()
        if hasattr(mod, "fused_attn")
    )


def test_throughput_states_its_settings():
    m = create_model("test_vit_patch4_16").train()
    t = throughput(m, (1, 16, 16), batch_size=8, warmup=1, iters=2)
    assert t["images_per_s"] > 0 and t["throughput_batch_size"] == 8 and t["throughput_device"] == "cpu"
    assert m.training  # restored
    full = measure(m, (1, 16, 16), batch_size=4, warmup=0, iters=1)
    assert full["gflops"] == full["flops"] / 1e9 == 254400 / 1e9
    assert full["macs_linear"] == 108704 and "attention matmuls excluded" in full["macs_linear_convention"]
