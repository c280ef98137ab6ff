"""Noisy adaptation matrix Q and the CE term of probe distillation (Wang et al., "Attention Probe: Vision Transformer
Distillation in the Wild", arXiv 2102.05958, Eq. 10, first term).

Q is DFND's ("Learning student networks in the wild"): row i says how a true class i turns into the
teacher's (noisy) label. Its diagonal is fixed to the teacher's accuracy; each row's off-diagonal mass
(1 − acc) is spread by a softmax over learned, zero-initialised logits θ ∈ R^{C×(C−1)}.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitkd.errors import VitkdInputError


class NoisyAdaptation(nn.Module):
    """Q ∈ R^{C×C}: fixed diagonal ``diagonal``, learned off-diagonal (softmax of θ, scaled to 1 − diagonal)."""

    def __init__(self, num_classes: int, diagonal: float):
        super().__init__()
        if not 0.0 < diagonal <= 1.0:
            raise VitkdInputError(f"noisy-adaptation diagonal {diagonal} must be in (0, 1]: use the teacher's accuracy")
        self.num_classes = num_classes
        self.diagonal = float(diagonal)
        self.theta = nn.Parameter(torch.zeros(num_classes, num_classes - 1))
        eye = torch.eye(num_classes, dtype=torch.bool)
        # column index of each off-diagonal entry, row by row
        self.register_buffer(
            "off_cols", torch.arange(num_classes).expand(num_classes, -1)[~eye].view(num_classes, -1), persistent=False
        )

    def matrix(self) -> torch.Tensor:
        c = self.num_classes
        q = torch.full((c, c), 0.0, device=self.theta.device)
        off = self.theta.float().softmax(dim=1) * (1.0 - self.diagonal)
        q = q.scatter(1, self.off_cols, off)
        return q + torch.eye(c, device=q.device) * self.diagonal

    def forward(self, student_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return adapted_cross_entropy(student_logits, target, self.matrix())


def adapted_cross_entropy(student_logits: torch.Tensor, target: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Eq. 10, first term: H_CE(Q(N_S(x)), ŷ) = −log (softmax(s) · Q)[ŷ], averaged over the batch."""
    with torch.autocast(student_logits.device.type, enabled=False):  # fp32: a tiny p[ŷ] must not round to 0 in fp16
        p = student_logits.float().softmax(dim=-1) @ q.float()
        return F.nll_loss(torch.log(p.clamp_min(1e-12)), target)
