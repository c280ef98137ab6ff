"""Hungarian matching of predictions to targets (DETR, ``facebookresearch/detr`` ``models/matcher.py``).

Per image, the cost of assigning prediction i to target j is

    C[i, j] = w_class · (−p_i[c_j]) + w_bbox · ‖b_i − b_j‖₁ + w_giou · (−GIoU(b_i, b_j))

with DETR's weights w_class = 1, w_bbox = 5, w_giou = 2: the class cost is the negative softmax probability
(not the NLL), L1 is on normalised ``cxcywh`` boxes, GIoU on ``xyxy``. The optimal one-to-one assignment is
solved by ``scipy.optimize.linear_sum_assignment`` on CPU, image by image (the costs of the whole batch computed
at once, as DETR does).

Always in fp32, also under autocast: in fp16 box areas and costs overflow and ``linear_sum_assignment``
raises "matrix contains invalid numeric entries" (mmdetection PR #10335).
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from vitkd.detection.box_ops import cxcywh_to_xyxy, generalized_box_iou


class HungarianMatcher(nn.Module):
    """Matches each image's targets to predictions one-to-one at minimum total cost.

    Args:
        cost_class, cost_bbox, cost_giou: weights of the class, L1 and GIoU costs (DETR: 1, 5, 2).
    """

    def __init__(self, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0):
        super().__init__()
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou

    def cost_matrix(
        self, logits: torch.Tensor, boxes: torch.Tensor, tgt_labels: torch.Tensor, tgt_boxes: torch.Tensor
    ) -> torch.Tensor:
        """(Q, T) cost of one image: ``logits`` (Q, K+1), ``boxes`` (Q, 4) cxcywh; targets (T,), (T, 4)."""
        prob = logits.float().softmax(-1)
        boxes, tgt_boxes = boxes.float(), tgt_boxes.float()
        c_class = -prob[:, tgt_labels]
        c_bbox = torch.cdist(boxes, tgt_boxes, p=1)
        c_giou = -generalized_box_iou(cxcywh_to_xyxy(boxes), cxcywh_to_xyxy(tgt_boxes))
        return self.cost_bbox * c_bbox + self.cost_class * c_class + self.cost_giou * c_giou

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``outputs``: ``pred_logits`` (B, Q, K+1) and ``pred_boxes`` (B, Q, 4); ``targets``: per image
        ``labels`` (T,) and ``boxes`` (T, 4). Returns per image (prediction indices, target indices).

        As DETR: one cost matrix of every prediction against every target of the batch, then each image's own
        block solved, so the cost's tensor ops run once per batch, not once per image."""
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        b, q = logits.shape[:2]
        sizes = [len(t["labels"]) for t in targets]
        empty = torch.zeros(0, dtype=torch.int64)
        if sum(sizes) == 0:
            return [(empty, empty) for _ in range(b)]
        with torch.autocast(device_type=logits.device.type, enabled=False):
            labels = torch.cat([t["labels"] for t in targets])
            tgt_boxes = torch.cat([t["boxes"] for t in targets])
            cost = self.cost_matrix(logits.flatten(0, 1), boxes.flatten(0, 1), labels, tgt_boxes)
            blocks = cost.view(b, q, -1).cpu().split(sizes, dim=-1)
        out = []
        for i, block in enumerate(blocks):
            if sizes[i] == 0:
                out.append((empty, empty))
                continue
            rows, cols = linear_sum_assignment(block[i].numpy())
            out.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return out
