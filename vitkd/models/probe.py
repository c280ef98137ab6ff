"""The attention probe (Wang et al., "Attention Probe: Vision Transformer Distillation in the Wild", arXiv 2102.05958,
Eq. 2) and block-output taps, without unfused attention.

timm's ``Attention`` uses fused scaled-dot-product attention, so the attention matrix never exists.
The probe needs only the CLS query row, so a forward hook on the probed block's ``attn.qkv`` linear
layer takes q of token 0 and all keys from that layer's own output and recomputes just that row:
O(B·H·N·d) extra work on probed blocks only, while training keeps the fused kernel everywhere.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn as nn

from vitkd.errors import VitkdInputError

HeadReduce = str | int  # "mean", "max" or a head index


def _check_blocks(model: nn.Module, blocks: Iterable[int], what: str) -> list[int]:
    depth = len(model.blocks)
    blocks = [int(b) for b in blocks]
    for b in blocks:
        if not -depth <= b < depth:
            raise VitkdInputError(
                f"{what} block index {b} is beyond the model depth {depth}: use indices 0..{depth - 1}"
            )
    return [b % depth for b in blocks]


def probe_from_qkv(
    qkv: torch.Tensor, attn: nn.Module, num_prefix_tokens: int, head: HeadReduce = "mean"
) -> torch.Tensor:
    """CLS row of the post-softmax attention over patch tokens, from a block's qkv projection output.

    Attention Probe, arXiv 2102.05958, Eq. 2: P(x) = γ(A(x)[0, 1:N+1]) (before the reshape γ). Softmax runs over all
    keys (CLS included), as in the full attention; the prefix columns are dropped afterwards.
    Returns (B, N) for one head or a head reduction.
    """
    b, n, _ = qkv.shape
    h = attn.num_heads
    d = qkv.shape[-1] // (3 * h)
    qkv = qkv.reshape(b, n, 3, h, d)
    q = attn.q_norm(qkv[:, 0:1, 0].transpose(1, 2))  # (B, H, 1, d)
    k = attn.k_norm(qkv[:, :, 1].transpose(1, 2))  # (B, H, N, d)
    scale = getattr(attn, "scale", d**-0.5)
    with torch.autocast(qkv.device.type, enabled=False):  # fp32 even under autocast: V_a compares near-uniform rows
        logits = (q.float() @ k.float().transpose(-2, -1)).squeeze(2) * scale  # (B, H, N)
    row = logits.softmax(dim=-1)[..., num_prefix_tokens:]
    if head == "mean":
        return row.mean(dim=1)
    if head == "max":
        return row.amax(dim=1)
    return row[:, int(head)]


class AttentionProbe:
    """Captures the attention probe of chosen blocks during any forward pass of a timm ViT.

    Usage::

        probe = AttentionProbe(model, blocks=[3, 7], head="mean")
        logits = model(x)
        maps = probe.maps()  # {3: (B, h, w), 7: (B, h, w)}
    """

    def __init__(self, model: nn.Module, blocks: Sequence[int], head: HeadReduce = "mean"):
        self.blocks = _check_blocks(model, blocks, "probe")
        if isinstance(head, str) and head not in ("mean", "max"):
            if not head.isdigit():
                raise VitkdInputError(f"probe head {head!r} is not valid: use 'mean', 'max' or a head index")
            head = int(head)
        if isinstance(head, int) and not 0 <= head < model.blocks[0].attn.num_heads:
            raise VitkdInputError(
                f"probe head {head} is beyond the {model.blocks[0].attn.num_heads} heads: "
                f"use 0..{model.blocks[0].attn.num_heads - 1}"
            )
        self.head = head
        self.num_prefix_tokens = model.num_prefix_tokens
        self.grid = model.patch_embed.grid_size
        self._rows: dict[int, torch.Tensor] = {}
        self._handles = []
        for b in self.blocks:
            attn = model.blocks[b].attn
            self._handles.append(attn.qkv.register_forward_hook(self._hook(b, attn)))

    def _hook(self, block: int, attn: nn.Module):
        def fn(_mod, _inp, out):
            self._rows[block] = probe_from_qkv(out, attn, self.num_prefix_tokens, self.head)

        return fn

    def rows(self) -> dict[int, torch.Tensor]:
        """Probes of the last forward as flat (B, N) vectors, keyed by block index."""
        return dict(self._rows)

    def maps(self) -> dict[int, torch.Tensor]:
        """Probes of the last forward reshaped to the patch grid, (B, h, w) (the γ of Eq. 2)."""
        return {b: r.reshape(r.shape[0], *self.grid) for b, r in self._rows.items()}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


class FeatureTap:
    """Keeps the token sequence output by chosen blocks (after the block, before the final norm)."""

    def __init__(self, model: nn.Module, blocks: Sequence[int]):
        self.blocks = _check_blocks(model, blocks, "feature")
        self._out: dict[int, torch.Tensor] = {}
        self._handles = [model.blocks[b].register_forward_hook(self._hook(b)) for b in self.blocks]

    def _hook(self, block: int):
        def fn(_mod, _inp, out):
            self._out[block] = out

        return fn

    def features(self) -> dict[int, torch.Tensor]:
        return dict(self._out)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def unfused_attention(block_attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Full post-softmax attention map (B, H, N, N) of a timm Attention on its (normed) input x.

    Reference path for tests and the reference-style benchmark; never used in training.
    """
    b, n, c = x.shape
    h = block_attn.num_heads
    qkv = block_attn.qkv(x).reshape(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
    q, k = block_attn.q_norm(qkv[0]), block_attn.k_norm(qkv[1])
    return ((q @ k.transpose(-2, -1)) * (c // h) ** -0.5).softmax(dim=-1)
