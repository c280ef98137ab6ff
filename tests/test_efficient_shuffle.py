"""Channel-shuffle block: the shuffle pattern, shapes, parameter counts, attention on the Attended group only."""

from __future__ import annotations

import timm
import torch

from vitkd.models import count_params
from vitkd.models.shuffle_block import ChannelShuffleBlock, channel_shuffle


def test_channel_shuffle_interleaves_the_groups():
    x = torch.arange(6.0).expand(1, 2, 6)
    assert channel_shuffle(x, 2)[0, 0].tolist() == [0, 3, 1, 4, 2, 5]
    assert channel_shuffle(x, 3)[0, 0].tolist() == [0, 2, 4, 1, 3, 5]


def _block_params(dim: int, att: int, mlp_ratio: float) -> int:
    hidden = int(dim * mlp_ratio)
    norm1, norm2 = 2 * att, 2 * dim
    attn = (att * 3 * att + 3 * att) + (att * att + att)  # qkv (with bias) + proj
    mlp = (dim * hidden + hidden) + (hidden * dim + dim)
    return norm1 + attn + norm2 + mlp


def test_block_shapes_and_parameter_count():
    blk = ChannelShuffleBlock(dim=24, num_heads=2, mlp_ratio=2.0, qkv_bias=True, attended_ratio=0.5)
    seen = []
    blk.attn.register_forward_hook(lambda _m, i, o: seen.append((i[0].shape, o.shape)))
    out = blk(torch.randn(3, 17, 24))
    assert out.shape == (3, 17, 24)
    assert seen == [(torch.Size([3, 17, 12]), torch.Size([3, 17, 12]))]  # attention sees the Attended group only
    assert count_params(blk) == _block_params(24, 12, 2.0)


def test_idle_channels_skip_attention():
    torch.manual_seed(0)
    blk = ChannelShuffleBlock(dim=8, num_heads=2, attended_ratio=0.5).eval()
    captured = []
    blk.attn.register_forward_hook(lambda _m, _i, o: captured.append(o))
    x = torch.randn(1, 5, 8)
    y = x.clone()
    y[..., 4:] += 10.0  # change only the Idle channels
    blk(x), blk(y)
    torch.testing.assert_close(captured[0], captured[1])


def test_presets_build_and_count():
    m = timm.create_model("test_shuffle_patch4_16")
    assert m(torch.randn(2, 1, 16, 16)).shape == (2, 10)
    dim, patches, depth = 16, 16, 2
    embed = (1 * 4 * 4 * dim + dim) + dim + (patches + 1) * dim  # patch conv, CLS, position embedding
    head = 2 * dim + (dim * 10 + 10)  # final norm + classifier
    assert count_params(m) == embed + depth * _block_params(dim, 8, 4.0) + head
    s = timm.create_model("digits_shuffle_patch4_16")
    assert s.blocks[0].attended == 18 and s.embed_dim == 38
