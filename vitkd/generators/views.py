"""A second view of a generated image for the attention-consistency loss (vitkd's own choice)."""

from __future__ import annotations

import torch


def photometric_view(x: torch.Tensor, strength: float = 0.2, generator: torch.Generator | None = None) -> torch.Tensor:
    """Differentiable photometric jitter of images in [-1, 1]: x' = clamp(c·x + b + σ·ε, −1, 1).

    Per image, contrast c ~ U(1−s, 1+s), brightness b ~ U(−s, s); ε is pixel noise with σ = s/2.
    Geometric augmentation is deliberately left out: the patch grid stays where it is, so the teacher's
    attention probe of the two views can be compared patch by patch.
    """
    b = x.shape[0]
    shape = (b,) + (1,) * (x.ndim - 1)
    kw = dict(generator=generator, device=x.device, dtype=torch.float32)
    c = 1.0 + strength * (2.0 * torch.rand(shape, **kw) - 1.0)
    bias = strength * (2.0 * torch.rand(shape, **kw) - 1.0)
    eps = torch.randn(x.shape, **kw) * (strength / 2.0)
    return (x * c.to(x.dtype) + bias.to(x.dtype) + eps.to(x.dtype)).clamp(-1.0, 1.0)
