"""Pieces of a timm ``VisionTransformer`` forward, reused by the token-reduction wrappers.

The wrappers keep timm's own modules (patch embedding, norms, qkv/proj linears, MLP, layer scale,
drop path, head) and only re-sequence them, so a trained checkpoint runs unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from vitkd.errors import VitkdInputError


def check_vit(model: nn.Module, what: str) -> None:
    """Token reducers need a timm ViT with ``blocks`` of standard ``Block``s and CLS-token pooling."""
    blocks = getattr(model, "blocks", None)
    if blocks is None or not hasattr(model, "patch_embed"):
        raise VitkdInputError(
            f"{what} needs a timm VisionTransformer, got {type(model).__name__}: pass a ViT teacher or student"
        )
    for b in blocks:
        if not (hasattr(b, "norm1") and hasattr(b.attn, "qkv") and hasattr(b, "mlp")):
            raise VitkdInputError(
                f"{what} needs timm Blocks with norm1/attn.qkv/mlp, got {type(b).__name__}: use a plain ViT arch"
            )
    if getattr(model, "global_pool", "token") != "token" or model.num_prefix_tokens != 1:
        raise VitkdInputError(
            f"{what} needs a ViT pooled by its single CLS token (global_pool='token'): "
            "build the model with class_token=True"
        )


def embed(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Image → token sequence before block 0 (timm's ``forward_features`` up to the blocks)."""
    x = model.patch_embed(x)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    return model.norm_pre(x)


def head(model: nn.Module, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
    """Token sequence after the last block → logits (or the pooled pre-logit feature)."""
    return model.forward_head(model.norm(x), pre_logits=pre_logits)


def qkv_heads(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of a timm ``Attention`` on its (normed) input, each (B, H, N, d), q/k norms applied."""
    b, n, _ = x.shape
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def attend(
    attn: nn.Module,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_size: torch.Tensor | None = None,
    after_softmax: Callable[[torch.Tensor], torch.Tensor] | None = None,
):
    """Softmax attention with the map materialised; returns (values (B, N, H·d), post-softmax map (B, H, N, N)).

    Hand-written instead of timm's fused SDPA because GTP, ToMe and IdleViT need the map (or a bias);
    the operation order is timm's unfused path, so with ``log_size`` None or all zeros the result is
    bit-identical to timm with ``fused_attn = False``. ``log_size`` (B, N) adds log(token size) to every
    key's logit: ToMe's proportional attention, GTP's token-scale attention. ``after_softmax`` changes the map
    before the value product and is what is returned (GTP's attention sparsification).
    """
    q = q * attn.scale
    logits = q @ k.transpose(-2, -1)
    if log_size is not None:
        logits = logits + log_size[:, None, None, :]
    a = logits.softmax(dim=-1)
    if after_softmax is not None:
        a = after_softmax(a)
    a_used = attn.attn_drop(a)
    out = (a_used @ v).transpose(1, 2).reshape(q.shape[0], q.shape[2], attn.attn_dim)
    return out, a


def project(attn: nn.Module, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The tail of timm's ``Attention.forward``: scale norm, optional gate (from the input x), proj, dropout."""
    out = attn.norm(out)
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(x).sigmoid()
    return attn.proj_drop(attn.proj(out))


def attn_residual(block: nn.Module, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
    return x + block.drop_path1(block.ls1(attn_out))


def mlp_residual(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def attention_blocks(model: nn.Module) -> list[nn.Module]:
    """The timm attention blocks of ``model``: those with a ``fused_attn`` switch (fused kernel or plain product)."""
    return [m for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool)]


def set_fused_attention(model: nn.Module, fused: bool) -> None:
    """Every timm attention block of ``model`` on the fused kernel (``True``) or its explicit path, in place."""
    for m in attention_blocks(model):
        m.fused_attn = fused


def unfused(model: nn.Module) -> nn.Module:
    """Switch every timm attention in ``model`` to its explicit (unfused) path, in place; returns the model."""
    set_fused_attention(model, False)
    return model


def per_block(value, depth: int, name: str) -> list:
    """A per-block setting given as one value or a list of ``depth`` values."""
    if isinstance(value, (list, tuple)):
        if len(value) != depth:
            raise VitkdInputError(f"{name} has {len(value)} values for {depth} blocks: give one value or one per block")
        return list(value)
    return [value] * depth
