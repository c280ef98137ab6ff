"""IdleViT — token idling (Xu et al., "IdleViT: Efficient Vision Transformer via Token Idle and Token Cut Loss",
arXiv 2310.05654), restated from the paper and the authors' ``vit.py``/``losses.py`` (Ackesnal/IdleViT; Xu et al.,
"IdleViT: Efficient Vision Transformer via Token Idle and Token Cut Loss", arXiv 2310.05654).

In an idle layer, the image tokens with the highest CLS-row attention logits (pre-softmax, mean over heads)
are computed; the others pass through unchanged ("idle") and may be selected again in a later layer.
The selected tokens are gathered, attend only among themselves, go through the MLP and are scattered back,
in training as in evaluation (the authors mask in training and gather only at test; gathering in both keeps
train and test the same computation). qkv is computed for all tokens, because selection needs every key.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitkd.efficient import vit_parts as vp
from vitkd.errors import VitkdInputError


def cls_logit_scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """IdleViT selection score of every token: the CLS query's pre-softmax logits, averaged over heads. (B, N)."""
    return ((q[:, :, :1] * scale) @ k.transpose(-2, -1)).squeeze(2).mean(dim=1)


def select_tokens(score: torch.Tensor, num_prefix: int, keep: int) -> torch.Tensor:
    """Indices of the computed tokens, (B, num_prefix + keep): the prefix (CLS) always, then the ``keep`` image
    tokens with the highest score, in their original order (so keep = all is the identity)."""
    top = score[:, num_prefix:].topk(keep, dim=-1).indices.sort(dim=-1).values + num_prefix
    prefix = torch.arange(num_prefix, device=score.device).expand(score.shape[0], -1)
    return torch.cat([prefix, top], dim=1)


def token_cut_loss(attn: torch.Tensor, mask: torch.Tensor, num_prefix: int = 1) -> torch.Tensor:
    """IdleViT token cut loss (normalised-cut regulariser), ``both`` variant of the authors' ``IdleViTTotalLoss``.

    ``attn`` (B, N, N): row-softmax of the head-averaged, unmasked pre-softmax logits. ``mask`` (B, N): 1 for
    computed tokens (CLS = 1), 0 for idle ones.
    - cut (inter): r_i = Σ_{j ∉ prefix} |m_i − m_j| W_ij, penalised by MSE(r, 0);
    - association (intra): a_i = Σ_j m_i m_j W_ij, penalised by MSE(a, m).
    Returns cut + association of one layer.

    ``IdleViT.forward_aux`` scores every idle layer and averages over all of them. The authors' loss loop
    deletes entries from the list it iterates, so it scores only every other idle layer (4 of DeiT's 8) yet
    still divides by all of them: at the same ``cut_weight`` (their 20) vitkd's term is about twice theirs.
    vitkd keeps the mean over every idle layer.
    """
    m = mask.to(attn.dtype)
    diff = (m[:, :, None] - m[:, None, :]).abs()[:, :, num_prefix:]
    cut = (diff * attn[:, :, num_prefix:]).sum(-1)
    assoc = (m[:, :, None] * m[:, None, :] * attn).sum(-1)
    return F.mse_loss(cut, torch.zeros_like(cut)) + F.mse_loss(assoc, m)


def keep_count(num_patches: int, keep_ratio: float) -> int:
    """Image tokens computed in an idle layer: ⌊n · r⌋, the authors' ``int(init_n * keep_ratio)`` (196 patches
    at r = 0.7, 0.7², 0.7³ keep 137, 96, 67). A ratio that keeps no token is an input error, not rounded up."""
    keep = int(num_patches * keep_ratio)
    if keep < 1:
        raise VitkdInputError(
            f"IdleViT keep_ratio {keep_ratio} keeps 0 of {num_patches} patches: use at least 1/{num_patches}"
        )
    return keep


def default_idle_layers(depth: int) -> list[int]:
    """Authors' DeiT schedule idles layers 4..11 of 12 (the first third computes every token): same fraction here."""
    return list(range(depth // 3, depth))


class IdleViT(nn.Module):
    """A timm ViT with token idling in chosen layers.

    Args:
        vit: a timm ``VisionTransformer`` with CLS pooling (its modules are used, and trained when fine-tuned).
        keep_ratio: fraction r of the n image tokens computed in each idle layer (⌊n·r⌋ tokens, ``keep_count``):
            one value, or one per idle layer.
        idle_layers: block indices that idle tokens (default: the last two thirds of the blocks).
    """

    def __init__(self, vit: nn.Module, keep_ratio: float | list[float] = 0.7, idle_layers: list[int] | None = None):
        super().__init__()
        vp.check_vit(vit, "IdleViT")
        self.vit = vit
        depth = len(vit.blocks)
        layers = default_idle_layers(depth) if idle_layers is None else [int(i) % depth for i in idle_layers]
        ratios = keep_ratio if isinstance(keep_ratio, (list, tuple)) else [keep_ratio] * len(layers)
        if len(ratios) != len(layers):
            raise VitkdInputError(
                f"IdleViT keep_ratio has {len(ratios)} values for {len(layers)} idle layers: "
                "give one value or one per idle layer"
            )
        if any(not 0.0 < float(r) <= 1.0 for r in ratios):
            raise VitkdInputError(f"IdleViT keep_ratio {keep_ratio} is outside (0, 1]: use e.g. 0.7")
        n = vit.patch_embed.num_patches
        self.keep = {layer: keep_count(n, float(r)) for layer, r in zip(layers, ratios)}

    def forward_aux(
        self, x: torch.Tensor, with_cut_loss: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(logits, pooled pre-logit feature, mean token cut loss over idle layers or None)."""
        vit, p = self.vit, self.vit.num_prefix_tokens
        x = vp.embed(vit, x)
        cuts = []
        for i, blk in enumerate(vit.blocks):
            keep = self.keep.get(i)
            if keep is None:
                x = blk(x)
                continue
            y = blk.norm1(x)
            q, k, v = vp.qkv_heads(blk.attn, y)
            idx = select_tokens(cls_logit_scores(q, k, blk.attn.scale), p, keep)
            if with_cut_loss:
                w = ((q * blk.attn.scale) @ k.transpose(-2, -1)).mean(dim=1).softmax(dim=-1)
                mask = torch.zeros(x.shape[:2], device=x.device).scatter(1, idx, 1.0)
                cuts.append(token_cut_loss(w, mask, p))
            hidx = idx[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[-1])
            out, _ = vp.attend(blk.attn, q.gather(2, hidx), k.gather(2, hidx), v.gather(2, hidx))
            cidx = idx[..., None].expand(-1, -1, x.shape[-1])
            xs, ys = x.gather(1, cidx), y.gather(1, cidx)
            xs = vp.mlp_residual(blk, vp.attn_residual(blk, xs, vp.project(blk.attn, out, ys)))
            x = x.scatter(1, cidx, xs)
        feats = vp.head(vit, x, pre_logits=True)
        logits = vit.head(feats)
        cut = torch.stack(cuts).mean() if cuts else None
        return logits, feats, cut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_aux(x)[0]
