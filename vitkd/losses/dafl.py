"""DAFL's teacher-as-discriminator generator terms (Chen et al., "Data-Free Learning of Student Networks",
ICCV 2019, arXiv 1904.01186, Eqs. 2-4 and 5): L_oh, L_a, L_ie and their weighted sum."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def onehot_loss(teacher_logits: torch.Tensor) -> torch.Tensor:
    """DAFL's one-hot term (the paper's L_oh): L_oh = CE(T(G(z)), argmax T(G(z))), mean over the batch.

    Low when the teacher is confident on each generated image.
    """
    logits = teacher_logits.float()
    return F.cross_entropy(logits, logits.argmax(dim=1))


def information_entropy_loss(teacher_logits: torch.Tensor) -> torch.Tensor:
    """DAFL's information-entropy term (the paper's L_ie, base 10 as in the authors' code):
    L_ie = Σ_c p̄_c · log10 p̄_c, with p̄ the batch-mean teacher softmax.

    The negative entropy of the batch's class histogram: minimal (−log10 C) when classes are balanced.
    """
    p_bar = teacher_logits.float().softmax(dim=1).mean(dim=0)
    return (p_bar * torch.log10(p_bar.clamp_min(1e-12))).sum()


def activation_loss(teacher_features: torch.Tensor) -> torch.Tensor:
    """DAFL's activation term (the paper's L_a): L_a = −mean |f_T|, f_T the teacher's penultimate feature.

    For a ViT teacher vitkd takes f_T to be the pre-logits feature (pooled CLS token after the final norm),
    the feature the classifier head reads: vitkd's choice of "penultimate" for transformers.
    """
    return -teacher_features.float().abs().mean()


def dafl_loss(
    teacher_logits: torch.Tensor,
    teacher_features: torch.Tensor,
    oh_weight: float = 1.0,
    ie_weight: float = 5.0,
    act_weight: float = 0.1,
) -> dict[str, torch.Tensor]:
    """DAFL's generator loss L_G = oh·L_oh + ie·L_ie + a·L_a as named weighted terms (weight 0 drops a term).

    Defaults are the authors' MNIST setting (oh 1, ie 5, a 0.1).
    """
    out: dict[str, torch.Tensor] = {}
    if oh_weight:
        out["oh"] = oh_weight * onehot_loss(teacher_logits)
    if ie_weight:
        out["ie"] = ie_weight * information_entropy_loss(teacher_logits)
    if act_weight:
        out["act"] = act_weight * activation_loss(teacher_features)
    return out
