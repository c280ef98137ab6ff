"""Probe distillation through patch relations (Wang et al., "Attention Probe: Vision Transformer Distillation in the
Wild", arXiv 2102.05958, Eqs. 7–8)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

NormAxis = Literal["channel", "token"]


def cls_relation(features: torch.Tensor, norm_axis: NormAxis = "channel", num_prefix_tokens: int = 1) -> torch.Tensor:
    """Eq. 7, CLS row only: R[0, 1:N+1] with R = F̂ F̂ᵀ, F̂ the L2-normalised features (B, N+1, D) → (B, N).

    ``norm_axis="channel"`` normalises each token's feature vector, so R is the token-to-token cosine
    matrix the paper describes. ``norm_axis="token"`` normalises each channel over the tokens, which is
    what the authors' code does (``loss.patch_attention_probe_loss``, ``dim=2`` of an (L, B, N, C) stack).
    Only the CLS row is needed by Eq. 8, so only that row is formed: O(N·D), not O(N²·D).
    """
    dim = -1 if norm_axis == "channel" else -2
    with torch.autocast(features.device.type, enabled=False):  # fp32: autocast would run the einsum in bf16/fp16
        f = F.normalize(features.float(), dim=dim)
        return torch.einsum("bd,bnd->bn", f[:, 0], f[:, num_prefix_tokens:])


def relation_rows_loss(student_rows: list[torch.Tensor], teacher_rows: list[torch.Tensor]) -> torch.Tensor:
    """Eq. 8 on CLS relation rows already formed (``cls_relation``): the mean over layer pairs of the MSE
    between student and teacher rows. The teacher's rows are all the teacher-output cache keeps of L_P."""
    losses = [F.mse_loss(s, t.float()) for s, t in zip(student_rows, teacher_rows, strict=True)]
    return torch.stack(losses).mean()


def probe_relation_loss(
    student_features: list[torch.Tensor],
    teacher_features: list[torch.Tensor],
    norm_axis: NormAxis = "channel",
    num_prefix_tokens: int = 1,
) -> torch.Tensor:
    """Eq. 8: L_P = ‖R_T[0, 1:N+1] − R_S[0, 1:N+1]‖², averaged over layer pairs, batch and patches.

    Teacher and student widths may differ (only N-vectors are compared); token counts must match.
    """
    return relation_rows_loss(
        [cls_relation(s, norm_axis, num_prefix_tokens) for s in student_features],
        [cls_relation(t, norm_axis, num_prefix_tokens) for t in teacher_features],
    )
