"""Fast-DFKD's meta-synthesizer (Fang et al., "Up to 100× Faster Data-free Knowledge Distillation",
arXiv 2112.06253): a generator meta-learned across synthesis rounds, reused with a short inner loop.

Each round (``meta_synthesize``) copies the meta generator, optimises the copy and a fresh latent batch z
for ``inner_steps`` steps on the generator loss, and keeps the lowest-loss batch of the round. The meta
generator learns by first-order MAML: the copy's gradient of every inner step is added to the meta
generator's ``.grad``, and the caller steps the meta optimiser once per round. The kept images go into
a ``MemoryBank`` the student draws its batches from, so most student steps cost no generator work.
Restated from the authors' ``datafree/synthesis/fast_meta.py``, not copied; the loss of the inner
loop is vitkd's L_G (the ViT teachers have no batch norms for Fast-DFKD's BN-statistics term).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn as nn


def meta_synthesize(
    generator: nn.Module,
    z: torch.Tensor,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    inner_steps: int,
    lr: float,
    lr_z: float,
    backward: Callable[[torch.Tensor], None] | None = None,
    betas: tuple[float, float] = (0.5, 0.999),
) -> tuple[torch.Tensor, torch.Tensor]:
    """One synthesis round; returns (the round's lowest-loss images, detached; that loss).

    ``loss_fn(x)`` is the generator loss of images x. The inner Adam (the authors' betas 0.5, 0.999)
    updates a copy of ``generator`` at ``lr`` and z at ``lr_z``; each inner step's gradient of the copy is
    added to ``generator``'s own ``.grad`` (first-order MAML), which the caller's meta optimiser steps.
    ``generator``'s weights are not changed here. Kept batches are chosen on device (no host sync).
    """
    if inner_steps < 1:
        raise ValueError("inner_steps must be ≥ 1")
    fast = copy.deepcopy(generator)
    z = z.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([{"params": fast.parameters()}, {"params": [z], "lr": lr_z}], lr=lr, betas=betas)
    backward = backward or (lambda loss: loss.backward())
    best_x, best_loss = None, None
    for _ in range(inner_steps):
        x = fast(z)
        loss = loss_fn(x)
        opt.zero_grad(set_to_none=True)
        backward(loss)
        for p, q in zip(generator.parameters(), fast.parameters()):
            if q.grad is None:
                continue
            p.grad = q.grad.detach().clone() if p.grad is None else p.grad.add_(q.grad)
        opt.step()
        loss = loss.detach()
        if best_x is None:
            best_x, best_loss = x.detach(), loss
        else:
            better = loss < best_loss
            best_x = torch.where(better, x.detach(), best_x)
            best_loss = torch.minimum(loss, best_loss)
    return best_x, best_loss


class MemoryBank(nn.Module):
    """A ring buffer of synthesised images (Fast-DFKD's data pool), kept in the checkpoint.

    ``push`` adds a batch (the oldest are overwritten once ``capacity`` is reached); ``sample`` draws a
    batch uniformly from what is stored. With ``logits_dim`` > 0 the bank also keeps the teacher's logits of
    each image (``push(x, logits)``, ``sample_pairs``): the teacher is frozen, so they need no recomputing.
    """

    def __init__(self, capacity: int, shape: tuple[int, ...], logits_dim: int = 0):
        super().__init__()
        if capacity < 1:
            raise ValueError("memory bank capacity must be ≥ 1")
        self.capacity = capacity
        self.register_buffer("images", torch.zeros(capacity, *shape))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))  # images ever pushed
        self.register_buffer("logits", torch.zeros(capacity, logits_dim) if logits_dim else None)

    def __len__(self) -> int:
        return int(min(int(self.count), self.capacity))

    def push(self, x: torch.Tensor, logits: torch.Tensor | None = None) -> None:
        n = x.shape[0]
        idx = (self.count + torch.arange(n, device=x.device)) % self.capacity
        self.images[idx] = x.detach().to(self.images.dtype)
        if self.logits is not None:
            if logits is None:
                raise ValueError("this memory bank keeps logits: push(x, logits)")
            self.logits[idx] = logits.detach().to(self.logits.dtype)
        self.count += n

    def _indices(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        stored = torch.clamp(self.count, max=self.capacity)
        u = torch.rand(n, generator=generator, device=self.images.device)
        return (u * stored).long().clamp_max(self.capacity - 1)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.images[self._indices(n, generator)]

    def sample_pairs(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, their teacher logits), drawn together."""
        if self.logits is None:
            raise ValueError("this memory bank keeps no logits (logits_dim 0)")
        idx = self._indices(n, generator)
        return self.images[idx], self.logits[idx]
