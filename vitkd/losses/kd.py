"""Logit distillation (Wang et al., "Attention Probe: Vision Transformer Distillation in the Wild", arXiv 2102.05958,
Eq. 9)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Eq. 9: L_KD = T² · KL(softmax(t/T) ‖ softmax(s/T)), averaged over the batch.

    The T² factor keeps gradient magnitudes comparable across temperatures (Hinton et al.), as in the
    authors' ``kdloss`` (T = 4).
    """
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)
