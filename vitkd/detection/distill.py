"""Distillation terms of a DETR student from a frozen DETR teacher, and the pseudo ground truth (data-free).

Habib et al., "Optimizing Vision Transformers with Data-Free Knowledge Transfer", arXiv 2408.05952,
names only "classification, bounding-box and distillation losses"; the terms below are vitkd's own definition:

1. Teacher's confident set (``teacher_set``): per image the teacher's queries whose best object-class
   probability s = max_{c<K} p_T(c) is at least a threshold; each gives a label argmax, a box and its
   full class distribution.
2. Pseudo ground truth (``label_source: teacher``; no labels, the data-free setting): the confident set at
   ``pseudo_threshold`` replaces the labelled boxes in the DETR set loss (``criterion.py``).
3. Distillation (``detr_kd_losses``), Eq. (D1)–(D3), on the student queries matched (Hungarian, the same
   costs as the ground-truth matcher) to the teacher's confident set at ``kd_threshold``:

   (D1) L_kd_cls  = τ² · mean_matched KL(softmax(z_T/τ) ‖ softmax(z_S/τ))   over the K+1 classes
   (D2) L_kd_bbox = Σ_matched ‖b_S − b_T‖₁ / N_T
   (D3) L_kd_giou = Σ_matched (1 − GIoU(b_S, b_T)) / N_T

   with N_T the size of the teacher's set over the step, normalised as DETR's ``num_boxes``
   (``criterion.global_num_boxes``: summed over the processes under ``torch.distributed``, divided by the world
   size, at least 1), so the box terms do not change with the number of GPUs. The (D1) mean is per process,
   as DETR's cross-entropy. Last decoder layer only.
4. Shared-query distillation (``shared_query_losses``), Eq. (D5)–(D7): KD-DETR's consistent distillation
   points (Wang et al., "KD-DETR: Knowledge Distillation for Detection Transformer with Consistent
   Distillation Points Sampling", arXiv 2211.08071). The same M boxes are fed as queries to the teacher's and
   the student's decoders (``DETR.forward(x, queries=...)``: a query is an anchor box) and their last-layer
   answers are compared one to one, with no matching: the teacher's own learned anchors (specific sampling)
   and ``general_queries`` random boxes per image (general sampling). With p_T,m the teacher's class
   distribution at point m and w_m = 1 − p_T,m(∅) its object probability:

   (D5) L_sq_cls  = τ² · (1/M) Σ_m KL(softmax(z_T,m/τ) ‖ softmax(z_S,m/τ))   over the K+1 classes, every point
   (D6) L_sq_bbox = Σ_m w_m ‖b_S,m − b_T,m‖₁ / Σ_m w_m
   (D7) L_sq_giou = Σ_m w_m (1 − GIoU(b_S,m, b_T,m)) / Σ_m w_m

   KD-DETR weighs general points by the teacher's foreground confidence; here (vitkd's choice) the class
   term keeps every point, since "no object here" is knowledge too, and only the box terms are weighted, so
   points on the background do not pull boxes. The normalisers are per process, as the mean of (D1).
5. Optional probe term (``probe_loss``), Eq. (D4): mean squared difference of the teacher's and the student's
   attention-probe maps (Attention Probe, arXiv 2102.05958, Eq. 2, CLS-row attention of a backbone block, each map
   renormalised to sum 1 over the patch grid, times the number of patches so the scale does not shrink with
   the grid). Needs the same patch grid in both backbones.

All terms run in fp32 with autocast off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import generalized_box_iou_loss

from vitkd.detection.box_ops import cxcywh_to_xyxy, generalized_box_iou
from vitkd.detection.criterion import global_num_boxes
from vitkd.detection.matcher import HungarianMatcher


@torch.no_grad()
def teacher_set(outputs: dict, threshold: float) -> list[dict[str, torch.Tensor]]:
    """Per image, the teacher's queries scoring at least ``threshold``: ``labels``, ``boxes`` (cxcywh),
    ``logits`` (K+1) and ``scores``; the form of a target list for the matcher and the set criterion."""
    logits = outputs["pred_logits"].float()
    scores, labels = logits.softmax(-1)[..., :-1].max(-1)
    out = []
    for lg, bx, s, lb in zip(logits, outputs["pred_boxes"].float(), scores, labels):
        keep = s >= threshold
        out.append({"labels": lb[keep], "boxes": bx[keep], "logits": lg[keep], "scores": s[keep]})
    return out


def detr_kd_losses(
    student: dict, teacher: dict, matcher: HungarianMatcher, kd_threshold: float = 0.3, temperature: float = 1.0
) -> dict[str, torch.Tensor]:
    """Unweighted Eq. (D1)–(D3): ``kd_cls``, ``kd_bbox``, ``kd_giou`` of the student's last layer."""
    device = student["pred_logits"].device
    with torch.autocast(device_type=device.type, enabled=False):
        targets = teacher_set(teacher, kd_threshold)
        s_out = {"pred_logits": student["pred_logits"].float(), "pred_boxes": student["pred_boxes"].float()}
        indices = matcher(s_out, targets)
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)]).to(device)
        src_idx = torch.cat([src for src, _ in indices]).to(device)
        n_t = global_num_boxes(targets, device)  # before the early return: every process must join the all-reduce
        if len(src_idx) == 0:
            zero = s_out["pred_logits"].sum() * 0.0
            return {"kd_cls": zero, "kd_bbox": zero, "kd_giou": zero}
        t_logits = torch.cat([t["logits"][j] for t, (_, j) in zip(targets, indices)])
        t_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)])
        s_logits = s_out["pred_logits"][batch_idx, src_idx]
        s_boxes = s_out["pred_boxes"][batch_idx, src_idx]
        tau = temperature
        kd_cls = (
            F.kl_div(
                F.log_softmax(s_logits / tau, -1),
                F.log_softmax(t_logits / tau, -1),
                reduction="batchmean",
                log_target=True,
            )
            * tau**2
        )
        kd_bbox = F.l1_loss(s_boxes, t_boxes, reduction="sum") / n_t
        kd_giou = (1 - torch.diag(generalized_box_iou(cxcywh_to_xyxy(s_boxes), cxcywh_to_xyxy(t_boxes)))).sum() / n_t
    return {"kd_cls": kd_cls, "kd_bbox": kd_bbox, "kd_giou": kd_giou}


def general_queries(
    batch: int, n: int, device: torch.device, min_size: float = 0.05, max_size: float = 0.3
) -> torch.Tensor:
    """(batch, n, 4) random cxcywh boxes for general sampling: centres uniform over the image, width and
    height uniform in [min_size, max_size] (fractions of the image)."""
    centres = torch.rand(batch, n, 2, device=device)
    sizes = min_size + (max_size - min_size) * torch.rand(batch, n, 2, device=device)
    return torch.cat([centres, sizes], -1)


def shared_query_losses(student: dict, teacher: dict, temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """Unweighted Eq. (D5)–(D7): ``sq_cls``, ``sq_bbox``, ``sq_giou`` of the student's and the teacher's
    ``query_outputs`` (the same boxes asked of both)."""
    s_q, t_q = student["query_outputs"], teacher["query_outputs"]
    with torch.autocast(device_type=s_q["pred_logits"].device.type, enabled=False):
        s_logits, t_logits = s_q["pred_logits"].float().flatten(0, 1), t_q["pred_logits"].float().flatten(0, 1)
        s_boxes, t_boxes = s_q["pred_boxes"].float().flatten(0, 1), t_q["pred_boxes"].float().flatten(0, 1)
        tau = temperature
        kl = F.kl_div(
            F.log_softmax(s_logits / tau, -1), F.log_softmax(t_logits / tau, -1), reduction="none", log_target=True
        )
        sq_cls = kl.sum(-1).mean() * tau**2
        w = 1 - t_logits.softmax(-1)[:, -1]
        norm = w.sum().clamp(min=1e-6)
        sq_bbox = (w * (s_boxes - t_boxes).abs().sum(-1)).sum() / norm
        # paired 1 − GIoU (torchvision): the diagonal of the pairwise matrix costs O(M²) for M = B·points
        sq_giou = (w * generalized_box_iou_loss(cxcywh_to_xyxy(s_boxes), cxcywh_to_xyxy(t_boxes))).sum() / norm
    return {"sq_cls": sq_cls, "sq_bbox": sq_bbox, "sq_giou": sq_giou}


def probe_loss(student_map: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
    """Eq. (D4): N · mean((P_S/ΣP_S − P_T/ΣP_T)²) over maps (B, h, w) of the same grid."""
    if student_map.shape != teacher_map.shape:
        raise ValueError(f"probe maps differ in shape {tuple(student_map.shape)} vs {tuple(teacher_map.shape)}")
    with torch.autocast(device_type=student_map.device.type, enabled=False):  # as the module says: fp32, autocast off
        s = student_map.float().flatten(1)
        t = teacher_map.float().flatten(1)
        s, t = s / s.sum(1, keepdim=True).clamp(min=1e-12), t / t.sum(1, keepdim=True).clamp(min=1e-12)
        return s.shape[1] * F.mse_loss(s, t)
