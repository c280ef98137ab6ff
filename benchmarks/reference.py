"""Reference-style loops: how the authors' code scores wild data and runs a distillation step
(IIGROUP/AttentionProbe on GitHub), rebuilt on the same timm models so vitkd can be timed against them.

What makes them "reference style", on purpose:

- fp32 everywhere, every block's attention unfused (the explicit q·kᵀ / softmax / A·v path);
- selector: forward hooks on the probed blocks' ``attn`` modules store the attention *input*, and the full
  (B, H, N, N) attention is recomputed from the block's qkv weights for all heads, then the CLS row is cut;
  ``torch.no_grad()`` (not inference mode), scores moved to the host batch by batch;
- distillation: the teacher runs on every step (no cache), block outputs come from forward hooks, the
  relation loss forms the full N×N Gram matrix before taking its CLS row, Q is assembled row by row in a
  Python loop, θ has its own Adam, and the loss is printed (``.item()``, a host sync) every step.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitkd.efficient.vit_parts import unfused


def reference_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every attention unfused (the authors' ViT has no fused kernel)."""
    return unfused(copy.deepcopy(model))


class HookedAttention:
    """Forward hooks on ``blocks[b].attn`` keeping each probed block's attention input
    (authors' ``identify_attnlier``)."""

    def __init__(self, model: nn.Module, blocks: Sequence[int]):
        self.inputs: dict[int, torch.Tensor] = {}
        self.handles = [model.blocks[b].attn.register_forward_hook(self._hook(b)) for b in blocks]

    def _hook(self, b: int):
        def fn(_mod, inp, _out):
            self.inputs[b] = inp[0]

        return fn

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def full_attention(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, H, N, N) post-softmax attention recomputed from the qkv weights, as the authors' code does."""
    b, n, c = x.shape
    h = attn.num_heads
    qkv = F.linear(x, attn.qkv.weight, attn.qkv.bias).reshape(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]
    return ((q @ k.transpose(-2, -1)) * (c // h) ** -0.5).softmax(dim=-1)


def reference_scores(
    model: nn.Module, hooks: HookedAttention, x: torch.Tensor, blocks: Sequence[int], head, lambda_a, lambda_n
) -> dict[str, torch.Tensor]:
    """One scoring batch: forward, full attention of the probed blocks, CLS row, cosine to uniform, CE to argmax."""
    logits = model(x)
    va = []
    for b in blocks:
        a = full_attention(model.blocks[b].attn, hooks.inputs[b])[:, :, 0, model.num_prefix_tokens :]  # (B, H, N-1)
        probe = a.mean(1) if head == "mean" else a.amax(1) if head == "max" else a[:, int(head)]
        uniform = torch.full_like(probe, 1.0 / probe.shape[1])
        va.append(F.cosine_similarity(probe, uniform, dim=1))
    vn = F.cross_entropy(logits, logits.argmax(1), reduction="none")
    value = lambda_n * vn + sum(w * a for w, a in zip(lambda_a, va))
    return {
        "value": value.cpu(),
        "vn": vn.cpu(),
        "pred": logits.argmax(1).cpu(),
        **{f"va_blk{b}": a.cpu() for b, a in zip(blocks, va)},
    }


class ReferenceDistiller:
    """The authors' training step (``DFND_DeiT-train.py`` ``train()``), on vitkd's timm models."""

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        pairs: Sequence[tuple[int, int]],
        num_classes: int,
        q_diagonal: float = 0.9,
        alpha: float = 0.8,
        beta: float = 1.0,
        temperature: float = 4.0,
        relation_norm: str = "token",
        lr: float = 7e-4,
        weight_decay: float = 0.025,
    ):
        self.teacher = reference_model(teacher).eval().requires_grad_(False)
        self.student = reference_model(student).train()
        self.pairs, self.alpha, self.beta, self.t = list(pairs), alpha, beta, temperature
        self.norm_dim = 2 if relation_norm == "token" else 3  # on the (L, B, N, C) stack
        self.num_classes, self.acc = num_classes, q_diagonal
        self.theta = torch.zeros(num_classes, num_classes - 1, requires_grad=True)
        self.feats: dict[str, list[torch.Tensor]] = {"t": [], "s": []}
        for t, s in self.pairs:
            self.teacher.blocks[t].register_forward_hook(lambda _m, _i, o: self.feats["t"].append(o))
            self.student.blocks[s].register_forward_hook(lambda _m, _i, o: self.feats["s"].append(o))
        self.opt = torch.optim.AdamW(self.student.parameters(), lr=lr, weight_decay=weight_decay)
        self.opt_q = torch.optim.Adam([self.theta], lr=1e-3)

    def noisy(self) -> torch.Tensor:
        """Q built row by row (authors' ``noisy()``)."""
        off = self.theta.softmax(dim=1) * (1 - self.acc)
        rows = []
        for i in range(self.num_classes):
            rows.append(torch.cat([off[i, :i], torch.tensor([self.acc]), off[i, i:]]).unsqueeze(0))
        return torch.cat(rows, 0)

    def relation_loss(self) -> torch.Tensor:
        """``loss.patch_attention_probe_loss``: full Gram matrix of the normalised stack, then its CLS row."""
        ft, fs = torch.stack(self.feats["t"]), torch.stack(self.feats["s"])  # (L, B, N, C)
        ft, fs = F.normalize(ft, dim=self.norm_dim), F.normalize(fs, dim=self.norm_dim)
        rt, rs = ft @ ft.transpose(-2, -1), fs @ fs.transpose(-2, -1)
        d = rt[:, :, 0, 1:] - rs[:, :, 0, 1:]
        return (d * d).sum() / d.numel()

    def kd(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``loss.kdloss``: KL summed over the batch / B × T²."""
        p_s = F.log_softmax(s / self.t, dim=1)
        p_t = F.softmax(t / self.t, dim=1)
        return F.kl_div(p_s, p_t, reduction="sum") * self.t**2 / s.shape[0]

    def step(self, x: torch.Tensor) -> float:
        self.feats = {"t": [], "s": []}
        with torch.no_grad():
            t_logits = self.teacher(x)
        s_logits = self.student(x)
        target = t_logits.argmax(1)
        p = s_logits.softmax(1) @ self.noisy()
        loss = (
            F.nll_loss(torch.log(p), target)
            + self.beta * self.kd(s_logits, t_logits)
            + self.alpha * self.relation_loss()
        )
        self.opt.zero_grad()
        self.opt_q.zero_grad()
        loss.backward()
        self.opt.step()
        self.opt_q.step()
        return loss.item()  # the reference prints the loss every step


class ReferenceDAFL:
    """One step of the authors' DAFL loop (``DAFL-train.py`` in huawei-noah/Efficient-Computing), on given models.

    Reference style on purpose: fp32, the teacher's attention unfused and its ``requires_grad`` left on
    (gradients pile up on the teacher's parameters), L_G + L_KD summed into one backward, both Adam
    optimisers stepped, and every loss read with ``.item()`` each step (the authors print them).
    """

    def __init__(
        self,
        generator: nn.Module,
        teacher: nn.Module,
        student: nn.Module,
        batch: int,
        latent: int,
        lr_g: float = 0.2,
        lr_s: float = 2e-3,
        oh: float = 1.0,
        ie: float = 5.0,
        a: float = 0.1,
    ):
        self.generator, self.student = generator.train(), student.train()
        self.teacher = reference_model(teacher).eval().requires_grad_(True)
        self.batch, self.latent, self.oh, self.ie, self.a = batch, latent, oh, ie, a
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=lr_g)
        self.opt_s = torch.optim.Adam(self.student.parameters(), lr=lr_s)
        self.printed: list[tuple[float, ...]] = []

    def step(self) -> None:
        z = torch.randn(self.batch, self.latent)
        self.opt_g.zero_grad()
        self.opt_s.zero_grad()
        x = self.generator(z)
        f = self.teacher.forward_features(x)
        logits, feats = self.teacher.forward_head(f), self.teacher.forward_head(f, pre_logits=True)
        pred = logits.data.max(1)[1]
        loss_a = -feats.abs().mean()
        loss_oh = F.cross_entropy(logits, pred)
        p = F.softmax(logits, dim=1).mean(dim=0)
        loss_ie = (p * torch.log10(p)).sum()
        loss = loss_oh * self.oh + loss_ie * self.ie + loss_a * self.a
        s = self.student(x.detach())
        loss_kd = F.kl_div(F.log_softmax(s, dim=1), F.softmax(logits.detach(), dim=1), reduction="sum") / s.shape[0]
        loss = loss + loss_kd
        loss.backward()
        self.opt_g.step()
        self.opt_s.step()
        self.printed.append((loss_oh.item(), loss_ie.item(), loss_a.item(), loss_kd.item()))
