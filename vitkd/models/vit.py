"""ViT presets, registered in timm's model registry so ``timm.create_model(name)`` builds them.

The paper pair (Attention Probe, arXiv 2102.05958, §3.1): DeiT-XSmall teacher (dim 384, depth 12, 3 heads) and
DeiT-XTiny student (dim 128, depth 12, 2 heads), patch 4 at 32×32. The ``digits_*`` presets are small
enough to train on a 2-core CPU in minutes on the embedded default data (16×16, 1 channel).
"""

from __future__ import annotations

from functools import partial

import torch.nn as nn
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

from vitkd.models.conv_stem import ConvStemEmbed


def preset_kwargs(pretrained: bool, kwargs: dict) -> dict:
    """Constructor kwargs of a vitkd preset: no pretrained weights, timm's registry bookkeeping dropped,
    DeiT's LayerNorm eps and qkv bias by default."""
    if pretrained:
        raise ValueError("vitkd presets have no pretrained weights; pass a checkpoint path to the stage instead")
    kwargs = {k: v for k, v in kwargs.items() if k not in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")}
    kwargs.setdefault("norm_layer", partial(nn.LayerNorm, eps=1e-6))
    kwargs.setdefault("qkv_bias", True)
    return kwargs


def _vit(pretrained: bool = False, **kwargs) -> VisionTransformer:
    return VisionTransformer(**preset_kwargs(pretrained, kwargs))


@register_model
def deit_xsmall_patch4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Paper teacher "DeiT-XSmall": dim 384, depth 12, 3 heads, patch 4, 32×32 (~21.3M params)."""
    args = dict(img_size=32, patch_size=4, embed_dim=384, depth=12, num_heads=3, num_classes=10)
    return _vit(pretrained, **{**args, **kwargs})


@register_model
def deit_xtiny_patch4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Paper student "DeiT-XTiny": dim 128, depth 12, 2 heads, patch 4, 32×32 (~2.4M params)."""
    args = dict(img_size=32, patch_size=4, embed_dim=128, depth=12, num_heads=2, num_classes=10)
    return _vit(pretrained, **{**args, **kwargs})


@register_model
def digits_teacher_patch4_16(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """CPU teacher for the embedded digits default: dim 96, depth 6, 3 heads, patch 4, 16×16, 1 channel."""
    args = dict(img_size=16, patch_size=4, in_chans=1, embed_dim=96, depth=6, num_heads=3, num_classes=10)
    return _vit(pretrained, **{**args, **kwargs})


@register_model
def digits_student_patch4_16(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """CPU student for the embedded digits default: dim 32, depth 6, 2 heads (the paper's 3:1 width ratio)."""
    args = dict(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=6, num_heads=2, num_classes=10)
    return _vit(pretrained, **{**args, **kwargs})


@register_model
def test_vit_patch4_16(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Tiny model for unit tests: dim 16, depth 2, 2 heads."""
    args = dict(img_size=16, patch_size=4, in_chans=1, embed_dim=16, depth=2, num_heads=2, num_classes=10)
    return _vit(pretrained, **{**args, **kwargs})


def _conv_stem_vit(pretrained: bool, stem_width: int, **kwargs) -> VisionTransformer:
    return _vit(pretrained, embed_layer=partial(ConvStemEmbed, stem_width=stem_width), **kwargs)


@register_model
def fashion_teacher_convstem_28(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Teacher of the Fashion-MNIST benchmark: conv stem to a 7×7 grid, dim 96, depth 6, 3 heads, 28×28, 1 channel."""
    args = dict(img_size=28, patch_size=4, in_chans=1, embed_dim=96, depth=6, num_heads=3, num_classes=10)
    return _conv_stem_vit(pretrained, stem_width=24, **{**args, **kwargs})


@register_model
def fashion_student_convstem_28(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Student of the Fashion-MNIST benchmark: the teacher's layout at dim 32, depth 4, 2 heads (the paper's 3:1 width
    ratio)."""
    args = dict(img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=4, num_heads=2, num_classes=10)
    return _conv_stem_vit(pretrained, stem_width=8, **{**args, **kwargs})
