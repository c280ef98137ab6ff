"""Projector-ensemble feature distillation (PEFD; Chen et al., "Improved Feature Distillation via Projector Ensemble",
arXiv 2210.15274).

Restated from the PEFD paper and ``chenyd7/PEFD`` (Chen et al., "Improved Feature Distillation via Projector Ensemble",
NeurIPS 2022, arXiv 2210.15274): several projectors
f_i = act(W_i f_s + b_i) map the student's pooled feature to the teacher's width; their average f̄ is
matched to the teacher's pooled feature by cosine: L = mean_batch (1 − cos(f̄, f_t)). The projectors differ
only by their random initialisation; the authors use 3 (a 4th is built but never used) with ReLU.
For a ViT, the pooled feature is the pre-logit vector (the normed CLS token).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitkd.errors import VitkdInputError


class ProjectorEnsemble(nn.Module):
    """``num_projectors`` Linear(student_dim → teacher_dim) projectors (+ ReLU); ``forward`` returns their mean."""

    def __init__(
        self, student_dim: int, teacher_dim: int, num_projectors: int = 3, activation: Literal["relu", "none"] = "relu"
    ):
        super().__init__()
        if num_projectors < 1:
            raise VitkdInputError(f"num_projectors {num_projectors} must be at least 1: use e.g. 3")
        self.projectors = nn.ModuleList(nn.Linear(student_dim, teacher_dim) for _ in range(num_projectors))
        self.activation = activation

    def forward(self, f_s: torch.Tensor) -> torch.Tensor:
        outs = [p(f_s.float()) for p in self.projectors]
        if self.activation == "relu":
            outs = [F.relu(o) for o in outs]
        return torch.stack(outs).mean(dim=0)


def projector_ensemble_loss(f_s: torch.Tensor, f_t: torch.Tensor, ensemble: ProjectorEnsemble) -> torch.Tensor:
    """PEFD loss: mean over the batch of 1 − cos(mean_i f_i(f_s), f_t)."""
    return (1.0 - F.cosine_similarity(ensemble(f_s), f_t.float(), dim=-1)).mean()
