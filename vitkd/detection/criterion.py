"""DETR set criterion (``facebookresearch/detr`` ``models/detr.py`` ``SetCriterion``), end to end in one file.

For the Hungarian matching σ of predictions to targets (``matcher.py``), per image batch:

    L = w_ce · CE(p, c_σ; no-object weight) + w_bbox · Σ‖b_i − b_σ(i)‖₁ / N_b + w_giou · Σ(1 − GIoU(b_i, b_σ(i))) / N_b

- ``ce``: cross-entropy over K+1 classes for every query; unmatched queries target the no-object class K,
  whose weight is ``eos_coef`` = 0.1 (DETR) so the many empty queries do not swamp the few objects.
- ``bbox`` (L1, DETR weight 5) and ``giou`` (DETR weight 2) on matched pairs, summed and divided by the
  number of target boxes N_b. ``ce`` has DETR weight 1.
- N_b is DETR's ``num_boxes`` (``global_num_boxes``): the boxes of the whole step, summed over every process
  with ``torch.distributed`` when a process group is initialised, divided by the world size and clamped at 1,
  so the loss scale does not change with the number of GPUs.
- Auxiliary losses: the same terms, with their own matching, on the output of every earlier decoder layer
  (keys suffixed ``_aux{i}``), as DETR does by default.
- Denoising queries (DN-DETR, ``denoising.py``), when the outputs carry ``dn_outputs`` and ``forward`` gets
  their ``dn``: the same three terms on every layer against the boxes they were made from, with no matching
  (keys ``ce_dn``, ``bbox_dn``, ``giou_dn``, suffixed ``_aux{i}`` below the last layer).

Matching and all losses run in fp32 with autocast off, also inside an autocast region (see ``matcher.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitkd.detection.box_ops import cxcywh_to_xyxy, generalized_box_iou
from vitkd.detection.denoising import DenoisingQueries, denoising_losses
from vitkd.detection.matcher import HungarianMatcher


def global_num_boxes(targets: list[dict], device: torch.device) -> torch.Tensor:
    """DETR's box normaliser N_b = max(1, Σ_ranks n_r / world size), with n_r the target boxes of one process.

    As ``SetCriterion.forward`` in DETR (Carion et al., "End-to-End Object Detection with Transformers",
    arXiv 2005.12872): under DDP each process's box sums are divided by the mean box count over the processes,
    so after DDP's gradient averaging the box terms are Σ_all / N_all whatever the number of GPUs. Without an
    initialised process group it is the local count, clamped at 1. Returns a 0-d fp32 tensor on ``device``
    (no host sync); every process must call it, as it all-reduces.
    """
    n = torch.tensor(float(sum(len(t["labels"]) for t in targets)), dtype=torch.float32, device=device)
    world = 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(n)
        world = torch.distributed.get_world_size()
    return (n / world).clamp(min=1.0)


class SetCriterion(nn.Module):
    """Args:
    num_classes: K object classes (the no-object class is index K).
    matcher: a ``HungarianMatcher``.
    weight_ce, weight_bbox, weight_giou: loss weights (DETR: 1, 5, 2).
    eos_coef: class weight of no-object in the cross-entropy (DETR: 0.1).
    aux_loss: add the terms on every earlier decoder layer.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        weight_ce: float = 1.0,
        weight_bbox: float = 5.0,
        weight_giou: float = 2.0,
        eos_coef: float = 0.1,
        aux_loss: bool = True,
    ):
        super().__init__()
        self.num_classes, self.matcher, self.aux_loss = num_classes, matcher, aux_loss
        self.weights = {"ce": weight_ce, "bbox": weight_bbox, "giou": weight_giou}
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight, persistent=False)

    def layer_losses(
        self, outputs: dict, targets: list[dict], num_boxes: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Unweighted ``ce``, ``bbox``, ``giou`` of one decoder layer's ``pred_logits``/``pred_boxes``;
        ``num_boxes`` is N_b (default: ``global_num_boxes`` of ``targets``)."""
        indices = self.matcher(outputs, targets)
        logits, boxes = outputs["pred_logits"].float(), outputs["pred_boxes"].float()
        device = logits.device
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)]).to(device)
        src_idx = torch.cat([src for src, _ in indices]).to(device)

        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=device)
        target_classes[batch_idx, src_idx] = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)]).to(
            device
        )
        ce = F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight.to(device))

        if num_boxes is None:
            num_boxes = global_num_boxes(targets, device)
        src_boxes = boxes[batch_idx, src_idx]
        tgt_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).to(device).float()
        bbox = F.l1_loss(src_boxes, tgt_boxes, reduction="sum") / num_boxes
        giou = (
            1 - torch.diag(generalized_box_iou(cxcywh_to_xyxy(src_boxes), cxcywh_to_xyxy(tgt_boxes)))
        ).sum() / num_boxes
        return {"ce": ce, "bbox": bbox, "giou": giou}

    def forward(
        self, outputs: dict, targets: list[dict], dn: DenoisingQueries | None = None
    ) -> dict[str, torch.Tensor]:
        """Weighted terms of the last layer (``ce``, ``bbox``, ``giou``), of each auxiliary layer and, with
        ``dn``, of the denoising queries."""
        device = outputs["pred_logits"].device
        with torch.autocast(device_type=device.type, enabled=False):
            layers = [("", outputs)]
            if self.aux_loss:
                layers += [(f"_aux{i}", aux) for i, aux in enumerate(outputs.get("aux_outputs", []))]
            num_boxes = global_num_boxes(targets, device)  # once per step, shared by every layer (as DETR)
            terms = {}
            for suffix, out in layers:
                for name, value in self.layer_losses(out, targets, num_boxes).items():
                    terms[name + suffix] = self.weights[name] * value
            if dn is not None:
                dn_layers = outputs["dn_outputs"]
                for i, out in enumerate(dn_layers):
                    suffix = "_dn" if i == len(dn_layers) - 1 else f"_dn_aux{i}"
                    for name, value in denoising_losses(out, targets, dn, num_boxes).items():
                        terms[name + suffix] = self.weights[name] * value
        return terms
