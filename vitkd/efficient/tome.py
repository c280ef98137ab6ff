"""ToMe — bipartite soft token matching (Bolya et al., ICLR 2023), the training-free baseline GTP is compared with.

Restated from the ToMe paper and ``facebookresearch/ToMe`` ``tome/merge.py`` (Bolya et al., "Token Merging: Your
ViT But Faster", ICLR 2023, arXiv 2210.09461): between attention and MLP of every block, r tokens are merged by
size-weighted average; attention is proportional (log token size added to the key logits); the similarity metric
is the keys averaged over heads.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitkd.efficient import vit_parts as vp
from vitkd.errors import VitkdInputError


def bipartite_soft_matching(metric: torch.Tensor, r: int, protect_cls: bool = True):
    """ToMe bipartite soft matching: alternate tokens into sets A (even) and B (odd); each A token's edge is its most
    cosine-similar B token; the r A tokens with the strongest edges are merged into their B partner. The CLS
    token (index 0, in A) is never merged and stays first. Returns ``merge(x) -> x'`` that sums merged rows
    (so ``merge`` of size-weighted features then division by merged sizes is the size-weighted average).
    ``r`` is clipped to half the unprotected tokens; r = 0 returns the identity (no reordering).
    """
    t = metric.shape[1]
    r = min(r, (t - int(protect_cls)) // 2)
    if r <= 0:
        return lambda x: x
    with torch.no_grad():
        m = F.normalize(metric, dim=-1)
        a, b = m[:, ::2], m[:, 1::2]
        scores = a @ b.transpose(-1, -2)
        if protect_cls:
            scores[:, 0, :] = float("-inf")
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx = edge_idx[:, r:]
        src_idx = edge_idx[:, :r]
        dst_idx = node_idx[..., None].gather(1, src_idx)
        if protect_cls:
            unm_idx = unm_idx.sort(dim=1).values  # CLS has score -inf, so sort to keep it first

    def merge(x: torch.Tensor) -> torch.Tensor:
        src, dst = x[:, ::2], x[:, 1::2]
        c = x.shape[-1]
        unm = src.gather(1, unm_idx.expand(-1, -1, c))
        src = src.gather(1, src_idx.expand(-1, -1, c))
        dst = dst.scatter_reduce(1, dst_idx.expand(-1, -1, c), src, reduce="sum")
        return torch.cat([unm, dst], dim=1)

    return merge


def merge_weighted_average(merge, x: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ToMe size-weighted merge: x' = merge(x·s) / merge(s), s' = merge(s). ``size`` is (B, N)."""
    s = size[..., None]
    x = merge(x * s)
    s = merge(s)
    return x / s, s[..., 0]


class ToMeViT(nn.Module):
    """A trained timm ViT run with ToMe merging between attention and MLP of every block (no fine-tuning).

    Args:
        vit: a timm ``VisionTransformer`` with CLS pooling (its modules are used, not copied).
        r: tokens merged per block: one int for every block or one per block (clipped per block to half the tokens).
        prop_attn: proportional attention (log size added to key logits); ToMe's trained checkpoints use it.
    """

    def __init__(self, vit: nn.Module, r: int | list[int] = 0, prop_attn: bool = True):
        super().__init__()
        vp.check_vit(vit, "ToMe")
        self.vit = vit
        self.r = [int(v) for v in vp.per_block(r, len(vit.blocks), "r")]
        if any(v < 0 for v in self.r):
            raise VitkdInputError(f"ToMe r {r} is negative: use r >= 0")
        self.prop_attn = prop_attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        x = vp.embed(vit, x)
        size = x.new_ones(x.shape[:2])
        for blk, r in zip(vit.blocks, self.r):
            y = blk.norm1(x)
            q, k, v = vp.qkv_heads(blk.attn, y)
            out, _ = vp.attend(blk.attn, q, k, v, log_size=size.log() if self.prop_attn else None)
            x = vp.attn_residual(blk, x, vp.project(blk.attn, out, y))
            if r > 0:
                merge = bipartite_soft_matching(k.mean(dim=1), r, protect_cls=True)
                x, size = merge_weighted_average(merge, x, size)
            x = vp.mlp_residual(blk, x)
        return vp.head(vit, x)
