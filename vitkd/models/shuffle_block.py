"""Channel-shuffle block for tiny ViTs (Xu, Wang, Chen, Liu, arXiv 2310.05642).

The block's (expanded) channels are split into an Attended group (the first ``attended_ratio`` of the channels)
and an Idle group. Self-attention runs on the Attended group only; the MLP then runs on all channels, and a
channel shuffle (ShuffleNetV2) interleaves the groups so the next block attends to channels from both.
Only the abstract is public (Xu, Wang, Chen, Liu, arXiv 2310.05642): the split ratio, the MLP on all channels and the
shuffle pattern are our choices. The block is a drop-in ``block_fn`` for timm's ``VisionTransformer``, built from
timm's own ``Attention`` and ``Mlp`` (fused attention kept), so every vitkd stage trains it through ``arch``.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from timm.layers import Attention, DropPath, LayerScale, Mlp
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

from vitkd.errors import VitkdInputError
from vitkd.models.vit import preset_kwargs


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNetV2 channel shuffle on the last axis: (…, g·c) viewed as (…, g, c), transposed to (…, c, g),
    flattened."""
    *lead, ch = x.shape
    return x.reshape(*lead, groups, ch // groups).transpose(-1, -2).reshape(*lead, ch)


class ChannelShuffleBlock(nn.Module):
    """Pre-norm block: x_A ← x_A + Attn(LN(x_A)); x ← x + MLP(LN(x)); x ← shuffle(x).

    Args (timm ``Block`` names; ``dim`` is the expanded width):
        attended_ratio: fraction of channels in the Attended group (its width must divide by ``num_heads``).
        attended_dim: the Attended width in channels (overrides ``attended_ratio``).
        shuffle_groups: groups of the channel shuffle (2 = interleave Attended and Idle halves).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        proj_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        init_values: float | None = None,
        drop_path: float = 0.0,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        mlp_layer: type[nn.Module] = Mlp,
        attended_ratio: float = 0.5,
        attended_dim: int | None = None,
        shuffle_groups: int = 2,
        **_timm_extras,  # depth, attn_layer, scale norms, device/dtype: not used by this block
    ):
        super().__init__()
        self.attended = int(attended_dim) if attended_dim else int(round(dim * attended_ratio))
        if not 0 < self.attended <= dim or self.attended % num_heads:
            raise VitkdInputError(
                f"channel-shuffle attended width {self.attended} (dim {dim} × {attended_ratio}) must be in 1..{dim} "
                f"and divisible by {num_heads} heads: change attended_ratio or num_heads"
            )
        if dim % shuffle_groups:
            raise VitkdInputError(
                f"channel-shuffle dim {dim} is not divisible by shuffle_groups {shuffle_groups}: change one of them"
            )
        self.shuffle_groups = shuffle_groups
        self.norm1 = norm_layer(self.attended)
        self.attn = Attention(
            self.attended,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            qk_norm=qk_norm,
            proj_bias=proj_bias,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            norm_layer=norm_layer,
        )
        self.ls1 = LayerScale(self.attended, init_values=init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = mlp_layer(
            in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, bias=proj_bias, drop=proj_drop
        )
        self.ls2 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        xa, xi = x[..., : self.attended], x[..., self.attended :]
        xa = xa + self.drop_path1(self.ls1(self.attn(self.norm1(xa), attn_mask=attn_mask, is_causal=is_causal)))
        x = torch.cat([xa, xi], dim=-1)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return channel_shuffle(x, self.shuffle_groups)


def _shuffle_vit(
    pretrained: bool = False,
    attended_ratio: float = 0.5,
    attended_dim: int | None = None,
    shuffle_groups: int = 2,
    **kwargs,
) -> VisionTransformer:
    block = partial(
        ChannelShuffleBlock, attended_ratio=attended_ratio, attended_dim=attended_dim, shuffle_groups=shuffle_groups
    )
    return VisionTransformer(block_fn=block, **preset_kwargs(pretrained, kwargs))


@register_model
def digits_shuffle_patch4_16(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Channel-shuffle digits student: dim 38 (Attended 18, 2 heads of 9), depth 6, sized so its FlopCounter FLOPs
    (2.77 M) are within 1% of ``digits_student_patch4_16`` (dim 32, attention on all channels: 2.75 M)."""
    args = dict(
        img_size=16, patch_size=4, in_chans=1, embed_dim=38, attended_dim=18, depth=6, num_heads=2, num_classes=10
    )
    return _shuffle_vit(pretrained, **{**args, **kwargs})


@register_model
def test_shuffle_patch4_16(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Tiny channel-shuffle model for unit tests: dim 16 (Attended 8, 2 heads), depth 2."""
    args = dict(img_size=16, patch_size=4, in_chans=1, embed_dim=16, depth=2, num_heads=2, num_classes=10)
    return _shuffle_vit(pretrained, **{**args, **kwargs})
