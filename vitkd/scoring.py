"""Wild-data value function of the attention-probe selector (``attention-probe.txt`` Eqs. 4–6)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def attention_value(probe: torch.Tensor) -> torch.Tensor:
    """Eq. 4: V_a(x) = cos(P(x), S_N), S_N the uniform map of value 1/N. probe: (B, N) or (B, h, w) → (B,).

    Low = peaked, informative attention (kept); high = near-uniform attention (rejected). The cosine does
    not depend on the reshape γ nor on the uniform value, so it is computed on the flat vector.
    """
    p = probe.flatten(1).float()
    return F.cosine_similarity(p, torch.ones_like(p), dim=1)


def confidence_value(teacher_logits: torch.Tensor) -> torch.Tensor:
    """Eq. 5: V_n(x) = KL(N_T(x) ‖ ŷ) read as the authors' code does: CE of the teacher against its own
    argmax, i.e. −log max softmax. (B, C) → (B,); low = confident."""
    logits = teacher_logits.float()
    return F.cross_entropy(logits, logits.argmax(dim=1), reduction="none")


def selection_value(va: Sequence[torch.Tensor], vn: torch.Tensor, lambda_a: Sequence[float], lambda_n: float) -> torch.Tensor:
    """Eq. 6: V(x) = Σ_l λa_l · V_a^l(x) + λn · V_n(x); the selector keeps the lowest values."""
    v = lambda_n * vn
    for w, a in zip(lambda_a, va, strict=True):
        v = v + w * a
    return v
