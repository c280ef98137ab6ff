"""Wild-data value function of the attention-probe selector (Wang et al., "Attention Probe: Vision Transformer
Distillation in the Wild", arXiv 2102.05958, Eqs. 4–6)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
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


def selection_value(
    va: Sequence[torch.Tensor], vn: torch.Tensor, lambda_a: Sequence[float], lambda_n: float
) -> torch.Tensor:
    """Eq. 6: V(x) = Σ_l λa_l · V_a^l(x) + λn · V_n(x); the selector keeps the lowest values."""
    v = lambda_n * vn
    for w, a in zip(lambda_a, va, strict=True):
        v = v + w * a
    return v


# -- vitkd's own selection terms (not in the paper) ---------------------------------------------------------
def energy_value(teacher_logits: torch.Tensor) -> torch.Tensor:
    """Energy score E(x) = −logsumexp(f(x)) of "Energy-based Out-of-distribution Detection" (Liu et al.,
    arXiv:2010.03759, Eq. 2 with T = 1); (B, C) → (B,); low = in-distribution, like V_n."""
    return -torch.logsumexp(teacher_logits.float(), dim=1)


def shift_image(x: torch.Tensor, dy: int, dx: int, fill: float = -1.0) -> torch.Tensor:
    """(B, C, H, W) moved by (dy, dx) pixels, the uncovered border set to ``fill`` (black in [-1, 1] inputs)."""
    h, w = x.shape[-2:]
    padded = torch.nn.functional.pad(x, (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0)), value=fill)
    return padded[..., max(-dy, 0) : max(-dy, 0) + h, max(-dx, 0) : max(-dx, 0) + w]


STABILITY_VIEWS = {
    "hflip": lambda x: x.flip(-1),
    "shift": lambda x: shift_image(x, 2, 2),
}


def stability_value(teacher_logits: torch.Tensor, view_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """V_s(x) = mean over views T of KL(p(x) ‖ p(T(x))), p the teacher's softmax: how much the teacher's
    belief moves under changes that keep an in-distribution image's class (a flip, a small shift). A vitkd term,
    not from a paper: the teacher is as sure of glyphs and textures as of its own classes, but less steadily
    so. (B, C) and views of (B, C) → (B,); low = stable (kept)."""
    logp = teacher_logits.float().log_softmax(dim=1)
    kls = [
        F.kl_div(v.float().log_softmax(dim=1), logp, log_target=True, reduction="none").sum(dim=1) for v in view_logits
    ]
    return torch.stack(kls).mean(dim=0)


def fusion_columns(cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The columns ``zscore_fusion`` weighs, from a selection's saved score columns: ``vn``, ``vs`` and
    ``energy`` where present, and ``va``, the mean of the probed blocks' ``va_blk*`` columns (float64)."""
    out = {c: cols[c].astype(np.float64) for c in ("vn", "vs", "energy") if c in cols}
    va = [cols[c].astype(np.float64) for c in sorted(cols) if c.startswith("va_blk")]
    if va:
        out["va"] = np.mean(va, axis=0)
    return out


def zscore_fusion(
    columns: dict[str, np.ndarray], weights: dict[str, float], stats: dict[str, tuple[float, float]]
) -> np.ndarray:
    """vitkd's fused selection value V_z(x) = Σ_c w_c · (s_c(x) − μ_c) / σ_c over score columns c (``vn``,
    ``va`` = the mean of the probed blocks' V_a, ``vs``, ``energy``), μ_c and σ_c taken over the whole pool.
    Eq. 6 adds V_a (a cosine in [0, 1]) to V_n (a cross-entropy in [0, log C]) with fixed λ, so the term with
    the larger spread decides alone; putting each on one scale first lets each weigh what its λ says."""
    out = None
    for c, w in weights.items():
        if w == 0:
            continue
        mu, sd = stats[c]
        z = (columns[c].astype(np.float64) - mu) / (sd if sd > 0 else 1.0)
        out = w * z if out is None else out + w * z
    if out is None:
        raise ValueError(f"fusion weights {weights} are all zero: give at least one score a weight")
    return out
