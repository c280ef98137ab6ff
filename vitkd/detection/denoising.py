"""Denoising queries (DN-DETR) and their loss, which needs no matching.

Li et al., "DN-DETR: Accelerate DETR Training by Introducing Query DeNoising", arXiv 2203.01305.

In training, each ground-truth box is fed to the decoder ``groups`` times as an extra query, noised:

    (Eq. 1, box noise)   c' = c + u_c · (w, h)/2 · λ_box,    (w', h') = (w, h) · (1 + u_s · λ_box),   u ~ U(−1, 1)
    (label noise)        the query's label is replaced by a random class with probability λ_label,
                         then by "no label" (K) with probability p_unknown

(the query's content is the label's embedding, its position the noised box: ``DETR.decode``). The
"no label" queries (box-only denoising, DN-DETR's ablation; vitkd's choice to mix both) teach the model to
answer a bare box, which is what a shared distillation query is (``distill.py``). Each
such query must reconstruct its own ground-truth box and label, so its target is known and the Hungarian
matcher is not applied to it. The attention mask keeps the matching queries from seeing the denoising ones
(they would read the answers) and the groups from seeing each other; a group sees the matching queries.

The loss (``denoising_losses``) on each decoder layer, for the denoising queries of real boxes:

    L_dn = w_ce · CE(p_dn, c) + w_bbox · Σ‖b_dn − b‖₁ / (N_b · groups) + w_giou · Σ(1 − GIoU(b_dn, b)) / (N_b · groups)

with DETR's weights and N_b the step's box count (``criterion.global_num_boxes``). Defaults are DN-DETR's
(``groups`` 5, λ_box 0.4, λ_label 0.2); p_unknown 0.5 is vitkd's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.ops import generalized_box_iou_loss

from vitkd.detection.box_ops import cxcywh_to_xyxy


@dataclass(frozen=True)
class DenoisingQueries:
    """``groups`` noised copies of every image's boxes, padded to ``pad`` boxes per group.

    boxes: (B, groups·pad, 4) noised cxcywh in [0, 1]; labels: (B, groups·pad) noised class, K on padding;
    valid: (B, groups·pad) True where the query stands for a real box (its label may be K: "no label");
    target_index: (B, groups·pad) that box's index in its image's targets (0 on padding).
    """

    boxes: torch.Tensor
    labels: torch.Tensor
    valid: torch.Tensor
    target_index: torch.Tensor
    groups: int
    pad: int

    @property
    def size(self) -> int:
        return self.groups * self.pad

    def attention_mask(self, num_queries: int) -> torch.Tensor:
        """(D+Q, D+Q) bool self-attention mask, True = blocked; denoising queries first, then matching ones."""
        d = self.size
        mask = torch.zeros(d + num_queries, d + num_queries, dtype=torch.bool, device=self.boxes.device)
        mask[d:, :d] = True  # the matching queries do not see the denoising ones
        for g in range(self.groups):  # nor does one group see another
            lo, hi = g * self.pad, (g + 1) * self.pad
            mask[lo:hi, :lo] = True
            mask[lo:hi, hi:d] = True
        return mask


def make_denoising_queries(
    targets: list[dict],
    num_classes: int,
    groups: int = 5,
    box_noise: float = 0.4,
    label_noise: float = 0.2,
    unknown: float = 0.5,
) -> DenoisingQueries | None:
    """Eq. 1 noise on every target box, ``groups`` times; None when the batch has no box."""
    pad = max((len(t["labels"]) for t in targets), default=0)
    if pad == 0 or groups <= 0:
        return None
    device = targets[0]["boxes"].device
    b = len(targets)
    boxes = torch.zeros(b, pad, 4, device=device)
    boxes[..., :2], boxes[..., 2:] = 0.5, 0.1
    labels = torch.full((b, pad), num_classes, dtype=torch.int64, device=device)
    valid = torch.zeros(b, pad, dtype=torch.bool, device=device)
    for i, t in enumerate(targets):
        n = len(t["labels"])
        boxes[i, :n], labels[i, :n], valid[i, :n] = t["boxes"].float(), t["labels"], True
    boxes, labels, valid = boxes.repeat(1, groups, 1), labels.repeat(1, groups), valid.repeat(1, groups)
    index = torch.arange(pad, device=device).repeat(groups).expand(b, -1)
    wh = boxes[..., 2:]
    u = torch.rand_like(boxes) * 2 - 1
    centre = boxes[..., :2] + u[..., :2] * wh / 2 * box_noise
    size = wh * (1 + u[..., 2:] * box_noise)
    noised = torch.cat([centre, size], -1).clamp(1e-3, 1.0)
    flip = (torch.rand(labels.shape, device=device) < label_noise) & valid
    labels = torch.where(flip, torch.randint_like(labels, num_classes), labels)
    labels = labels.masked_fill((torch.rand(labels.shape, device=device) < unknown) & valid, num_classes)
    return DenoisingQueries(noised, labels, valid, index, groups, pad)


def denoising_losses(
    outputs: dict, targets: list[dict], dn: DenoisingQueries, num_boxes: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Unweighted ``ce``, ``bbox``, ``giou`` of one decoder layer's denoising queries (fixed assignment)."""
    logits, boxes = outputs["pred_logits"].float(), outputs["pred_boxes"].float()
    b_idx, q_idx = dn.valid.nonzero(as_tuple=True)
    t_idx = dn.target_index[b_idx, q_idx]
    counts = torch.tensor([len(t["labels"]) for t in targets], device=b_idx.device)
    flat = (counts.cumsum(0) - counts)[b_idx] + t_idx  # index into the batch's concatenated targets
    tgt_labels = torch.cat([t["labels"] for t in targets]).to(logits.device)[flat]
    tgt_boxes = torch.cat([t["boxes"] for t in targets]).to(logits.device).float()[flat]
    src = boxes[b_idx, q_idx]
    norm = num_boxes * dn.groups
    ce = F.cross_entropy(logits[b_idx, q_idx], tgt_labels)
    bbox = F.l1_loss(src, tgt_boxes, reduction="sum") / norm
    giou = generalized_box_iou_loss(cxcywh_to_xyxy(src), cxcywh_to_xyxy(tgt_boxes), reduction="sum") / norm  # paired
    return {"ce": ce, "bbox": bbox, "giou": giou}
