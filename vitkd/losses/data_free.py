"""Generator loss L_G = L_adv + λ·L_attention (Habib et al., "Optimizing Vision Transformers with Data-Free
Knowledge Transfer", arXiv 2408.05952, names it; every term's form is vitkd's own).

Only the paper's abstract and summary are public: they give L_G = L_adv + λ·L_attention and call
L_attention an "attention-consistency loss" on attention probes, nothing more. vitkd defines:

- L_adv (the frozen teacher acts as the discriminator): DAFL's confidence (one-hot) and class-balance
  (information-entropy) terms, optionally DAFL's activation term, plus an optional adversarial
  student–teacher discrepancy term (DFAD-style; the generator seeks images where the student disagrees).
- L_attention on the teacher's CLS attention probes: ``attention_peak_loss`` (peaked, non-uniform probes)
  and ``attention_consistency_loss`` (the same probe for two photometric views of one image).

Each term is switched off by a weight of 0 (and then not computed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vitkd.losses.dafl import dafl_loss
from vitkd.selection.scoring import attention_value


def discrepancy_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """vitkd's adversarial student–teacher term (after DFAD, Fang et al. 2019): L_disc = −mean |s − t|.

    Mean absolute difference of the logits over batch and classes, negated: minimising it (the generator's
    step) pushes the generator toward images on which the student still disagrees with the teacher.
    Gradients reach only the generator; the student is not updated by this term.
    """
    return -(student_logits.float() - teacher_logits.float()).abs().mean()


def total_variation_loss(x: torch.Tensor) -> torch.Tensor:
    """vitkd's smoothness prior (the total-variation part of DeepInversion's image prior R_prior, Yin et al.,
    "Dreaming to Distill", arXiv 1912.08795):
    L_TV = mean |x[:, :, i+1, j] − x[:, :, i, j]| + mean |x[:, :, i, j+1] − x[:, :, i, j]|.

    Low for images made of smooth strokes, high for the per-pixel textures a generator finds when nothing
    but the teacher's confidence guides it.
    """
    x = x.float()
    return (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().mean() + (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().mean()


def attention_peak_loss(probes: list[torch.Tensor]) -> torch.Tensor:
    """vitkd's attention-peakedness term: mean over probed blocks and batch of cos(P(x), u), u uniform.

    P(x) is the teacher's CLS-row attention probe over patches (B, N). The cosine to the uniform vector is
    the attention-probe paper's selection criterion (low = informative, peaked attention), used here as a
    differentiable loss on generated images: minimising it makes the teacher attend to a few patches,
    as it does on real digits, instead of spreading attention over a texture.
    """
    return torch.stack([attention_value(p).mean() for p in probes]).mean()


def attention_consistency_loss(probes_a: list[torch.Tensor], probes_b: list[torch.Tensor]) -> torch.Tensor:
    """vitkd's attention-consistency term: mean over probed blocks and batch of 1 − cos(P(x_a), P(x_b)).

    x_a and x_b are two photometric views of one generated image (``vitkd.generators.photometric_view``);
    the patch grid is the same, so the teacher should attend to the same patches in both.
    """
    vals = [
        (1.0 - F.cosine_similarity(a.float(), b.float(), dim=-1)).mean()
        for a, b in zip(probes_a, probes_b, strict=True)
    ]
    return torch.stack(vals).mean()


def adversarial_loss(
    teacher_logits: torch.Tensor,
    teacher_features: torch.Tensor | None = None,
    student_logits: torch.Tensor | None = None,
    oh_weight: float = 1.0,
    ie_weight: float = 5.0,
    act_weight: float = 0.0,
    disc_weight: float = 0.0,
) -> dict[str, torch.Tensor]:
    """vitkd's L_adv as named weighted terms: oh·L_oh + ie·L_ie + a·L_a (DAFL's) + d·L_disc (vitkd's)."""
    if act_weight and teacher_features is None:
        raise ValueError("act_weight > 0 needs the teacher's pre-logits features")
    out = dafl_loss(teacher_logits, teacher_features, oh_weight, ie_weight, act_weight)
    if disc_weight:
        if student_logits is None:
            raise ValueError("disc_weight > 0 needs the student's logits")
        out["disc"] = disc_weight * discrepancy_loss(student_logits, teacher_logits)
    return out


def attention_loss(
    probes_a: list[torch.Tensor],
    probes_b: list[torch.Tensor] | None = None,
    peak_weight: float = 1.0,
    consistency_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """vitkd's L_attention as named weighted terms: peak·L_peak + cons·L_cons (λ is applied by the caller)."""
    out: dict[str, torch.Tensor] = {}
    if peak_weight:
        out["attn_peak"] = peak_weight * attention_peak_loss(probes_a)
    if consistency_weight:
        if probes_b is None:
            raise ValueError("consistency_weight > 0 needs the probes of a second view")
        out["attn_cons"] = consistency_weight * attention_consistency_loss(probes_a, probes_b)
    return out


def generator_loss(
    adv_terms: dict[str, torch.Tensor], attention_terms: dict[str, torch.Tensor], lam: float
) -> torch.Tensor:
    """L_G = L_adv + λ·L_attention (the paper's composition; the terms inside are vitkd's)."""
    parts = list(adv_terms.values())
    if lam and attention_terms:
        parts.append(lam * torch.stack(list(attention_terms.values())).sum())
    if not parts:
        raise ValueError("every generator loss term is switched off")
    return torch.stack(parts).sum()
