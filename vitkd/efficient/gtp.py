"""GTP — graph-based token propagation on a trained ViT, no fine-tuning (GTP-ViT, arXiv 2311.03035).

Per block: attention (token-size aware, optionally sparsified with θ) → choose the least important patch
tokens → propagate their features to their graph neighbours with weight α and drop them → MLP on the shorter
sequence.
Rules restated from the GTP-ViT paper and the authors' ``models_v3.py`` (see
Xu et al., "GTP-ViT: Efficient Vision Transformers via Graph-based Token Propagation", WACV 2024, arXiv 2311.03035);
deviations are ours and named in the docstrings:
- the semantic k-NN graph is symmetrised before normalisation (the authors' row-wise k-NN is not);
- ``num_prop = 0`` propagates nothing (the authors' slice ``[:-0]`` would propagate every token).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vitkd.efficient import vit_parts as vp
from vitkd.errors import VitkdInputError

GraphType = Literal["spatial", "semantic", "mixed"]


def spatial_graph(grid: tuple[int, int], device=None) -> torch.Tensor:
    """GTP spatial graph: 8-neighbourhood on the patch grid (|Δrow| ≤ 1 and |Δcol| ≤ 1), no self-loops. (Np, Np)."""
    h, w = grid
    r = torch.arange(h, device=device).repeat_interleave(w)
    c = torch.arange(w, device=device).repeat(h)
    adj = ((r[:, None] - r[None, :]).abs() <= 1) & ((c[:, None] - c[None, :]).abs() <= 1)
    adj.fill_diagonal_(False)
    return adj.float()


def semantic_graph(patches: torch.Tensor, num_neighbours: int) -> torch.Tensor:
    """GTP semantic graph: each patch linked to its ``num_neighbours`` most cosine-similar patches, no
    self-loops, then symmetrised (i~j if either picks the other; our choice, see module docstring). (B, Np, Np)."""
    n = patches.shape[1]
    k = min(num_neighbours, n - 1)
    f = F.normalize(patches.float(), dim=-1)
    sim = f @ f.transpose(1, 2)
    eye = torch.eye(n, dtype=torch.bool, device=patches.device)
    sim = sim.masked_fill(eye, float("-inf"))
    adj = torch.zeros_like(sim)
    if k > 0:
        adj.scatter_(2, sim.topk(k, dim=-1).indices, 1.0)
    return torch.maximum(adj, adj.transpose(1, 2))


def normalize_graph(adj: torch.Tensor) -> torch.Tensor:
    """GTP graph normalisation W = D^-1/2 A D^-1/2 (D = degree; isolated nodes keep zero rows)."""
    deg = adj.sum(-1)
    inv = deg.clamp(min=1e-12).rsqrt() * (deg > 0)
    return inv[..., :, None] * adj * inv[..., None, :]


def build_graph(patches: torch.Tensor, grid: tuple[int, int], kind: GraphType, num_neighbours: int) -> torch.Tensor:
    """The normalised token graph of a batch, (B, Np, Np): spatial, semantic, or mixed (their union)."""
    b = patches.shape[0]
    if kind == "spatial":
        adj = spatial_graph(grid, patches.device).expand(b, -1, -1)
    elif kind == "semantic":
        adj = semantic_graph(patches, num_neighbours)
    elif kind == "mixed":
        adj = torch.maximum(spatial_graph(grid, patches.device)[None], semantic_graph(patches, num_neighbours))
    else:
        raise VitkdInputError(f"GTP graph {kind!r} is unknown: use spatial, semantic or mixed")
    return normalize_graph(adj.float()).to(patches.dtype)


def token_importance(attn_map: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """GTP ``MixedAttnMax`` score of each patch token j, (B, Np):
    max_h A[h, j, j] (self-attention) × max_h Σ_i A[h, i, j] (attention received from every query, CLS included).
    """
    diag = attn_map.diagonal(dim1=-2, dim2=-1).amax(dim=1)
    received = attn_map.sum(dim=-2).amax(dim=1)
    return (diag * received)[:, num_prefix:]


def sparsify_attention(attn_map: torch.Tensor, sparsity: float) -> torch.Tensor:
    """GTP attention sparsification θ (the authors' ``--sparsity``; θ = 1 is off), (B, H, N, N) → same shape.

    Per sample and head, over all N² entries of the post-softmax map: with k = ⌊N² (1 − θ)⌋, every entry below
    the k-th smallest value is set to 0 (entries equal to it stay), so about a fraction θ of the map is kept. The
    rows are not renormalised. k = 0 leaves the map unchanged. The result both weighs the values and scores the
    tokens for selection, as in the authors' ``models_v3.py`` (Xu et al., "GTP-ViT: Efficient Vision
    Transformers via Graph-based Token Propagation", WACV 2024, arXiv 2311.03035).
    """
    n = attn_map.shape[-1]
    k = int(n * n * (1 - sparsity))
    if k < 1:
        return attn_map
    threshold = attn_map.flatten(-2).kthvalue(k, dim=-1, keepdim=True).values[..., None]  # (B, H, 1, 1)
    return attn_map * (attn_map >= threshold)


def sparse_attend(
    attn: nn.Module,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_size: torch.Tensor | None,
    sparsity: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``vit_parts.attend`` with ``sparsify_attention`` between the softmax and the value product; returns
    (values (B, N, H·d), sparsified map (B, H, N, N)). Attention dropout comes after the sparsification (the
    authors drop out first; the same in evaluation, where GTP runs)."""
    return vp.attend(attn, q, k, v, log_size, after_softmax=lambda a: sparsify_attention(a, sparsity))


def split_tokens(score: torch.Tensor, num_prop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, propagated) patch indices: the ``num_prop`` lowest scores are propagated; both keep token order.
    Ties (common with θ < 1, where a token whose self-attention was zeroed scores 0) go by token order, the
    earlier token kept (a stable sort, the same on every device)."""
    order = score.argsort(dim=-1, descending=True, stable=True)
    n = score.shape[-1]
    kept = order[:, : n - num_prop].sort(dim=-1).values
    prop = order[:, n - num_prop :].sort(dim=-1).values
    return kept, prop


def propagate(
    patches: torch.Tensor,
    size: torch.Tensor | None,
    graph: torch.Tensor,
    kept: torch.Tensor,
    prop: torch.Tensor,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """GTP propagation rule (``GraphProp``): x_kept ← x_kept + α · W[kept, prop] · x_prop, and the same for
    token sizes s_kept ← s_kept + α · W[kept, prop] · s_prop. The next block's graph is W[kept, kept],
    not renormalised (as the authors do). So the feature mass added to the kept tokens is exactly
    α · Σ_p (Σ_k W[k, p]) x_p; a propagated token with no kept neighbour passes nothing on.

    Returns (kept patches, kept sizes, next graph, fraction of propagated tokens with no kept neighbour).
    """
    c = patches.shape[-1]
    n = graph.shape[-1]
    rows = graph.gather(1, kept[..., None].expand(-1, -1, n))  # (B, K, Np)
    w_kp = rows.gather(2, prop[:, None, :].expand(-1, kept.shape[1], -1))  # (B, K, P)
    w_kk = rows.gather(2, kept[:, None, :].expand(-1, kept.shape[1], -1))  # (B, K, K)
    x_prop = patches.gather(1, prop[..., None].expand(-1, -1, c))
    x_kept = patches.gather(1, kept[..., None].expand(-1, -1, c)) + alpha * (w_kp @ x_prop)
    if size is not None:
        s_prop = size.gather(1, prop)
        size = size.gather(1, kept) + alpha * (w_kp @ s_prop[..., None]).squeeze(-1)
    lost = (w_kp.sum(dim=1) == 0).float().mean()
    return x_kept, size, w_kk, lost


class GTPViT(nn.Module):
    """A trained timm ViT run with graph-based token propagation (no fine-tuning).

    Args:
        vit: a timm ``VisionTransformer`` with CLS pooling (its modules are used, not copied).
        num_prop: patch tokens propagated (removed) per block: one int for every block, or one per block.
        graph: ``spatial`` (8-neighbour grid), ``semantic`` (k-NN by cosine) or ``mixed`` (their union).
        num_neighbours: k of the semantic graph (authors' default 8).
        alpha: propagation weight α (authors' default 0.1); 0 gives plain pruning.
        token_scale: token-size-aware attention (log of the propagated size added to the key logits).
        sparsity: attention sparsification θ in (0, 1], the fraction of each attention map kept
            (``sparsify_attention``): one value for every block or one per block; 1 (default) is off.
    """

    def __init__(
        self,
        vit: nn.Module,
        num_prop: int | list[int] = 0,
        graph: GraphType = "mixed",
        num_neighbours: int = 8,
        alpha: float = 0.1,
        token_scale: bool = True,
        sparsity: float | list[float] = 1.0,
    ):
        super().__init__()
        vp.check_vit(vit, "GTP")
        self.vit = vit
        self.num_prop = [int(n) for n in vp.per_block(num_prop, len(vit.blocks), "num_prop")]
        n_patches = vit.patch_embed.num_patches
        if any(n < 0 for n in self.num_prop) or sum(self.num_prop) >= n_patches:
            raise VitkdInputError(
                f"GTP num_prop {num_prop} removes {sum(self.num_prop)} of {n_patches} patches: "
                "keep at least one (lower num_prop)"
            )
        if graph not in ("spatial", "semantic", "mixed"):
            raise VitkdInputError(f"GTP graph {graph!r} is unknown: use spatial, semantic or mixed")
        self.sparsity = [float(t) for t in vp.per_block(sparsity, len(vit.blocks), "sparsity")]
        if any(not 0.0 < t <= 1.0 for t in self.sparsity):
            raise VitkdInputError(f"GTP sparsity {sparsity} is outside (0, 1]: use e.g. 0.7, or 1 for none")
        self.graph, self.num_neighbours, self.alpha, self.token_scale = graph, num_neighbours, alpha, token_scale
        # per reducing block, fraction of propagated tokens with no kept neighbour (last forward; tensors, so no
        # device sync)
        self.lost: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vit, p = self.vit, self.vit.num_prefix_tokens
        x = vp.embed(vit, x)
        graph = (
            build_graph(x[:, p:], vit.patch_embed.grid_size, self.graph, self.num_neighbours)
            if any(self.num_prop)
            else None
        )
        size = x.new_ones(x.shape[:2]) if self.token_scale else None
        self.lost = []
        for blk, n, theta in zip(vit.blocks, self.num_prop, self.sparsity):
            y = blk.norm1(x)
            log_size = size.log() if size is not None else None
            if theta < 1.0:
                out, amap = sparse_attend(blk.attn, *vp.qkv_heads(blk.attn, y), log_size, theta)
            else:
                out, amap = vp.attend(blk.attn, *vp.qkv_heads(blk.attn, y), log_size=log_size)
            x = vp.attn_residual(blk, x, vp.project(blk.attn, out, y))
            if n > 0:
                kept, prop = split_tokens(token_importance(amap, p), n)
                patches, psize, graph, lost = propagate(
                    x[:, p:], size[:, p:] if size is not None else None, graph, kept, prop, self.alpha
                )
                x = torch.cat([x[:, :p], patches], dim=1)
                size = torch.cat([size[:, :p], psize], dim=1) if size is not None else None
                self.lost.append(lost.detach())
            x = vp.mlp_residual(blk, x)
        return vp.head(vit, x)
