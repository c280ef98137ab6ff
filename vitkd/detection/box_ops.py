"""Box formats, converted in ONE place, and (generalised) IoU.

Formats: ``cxcywh`` (centre, size; normalised to [0, 1] by the image size: what the model predicts and the
losses see), ``xyxy`` (corners; GIoU and the evaluation), ``xywh`` (COCO JSON: top-left corner and size, pixels).
"""

from __future__ import annotations

import torch


def cxcywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def xyxy_to_cxcywh(b: torch.Tensor) -> torch.Tensor:
    x0, y0, x1, y1 = b.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def xywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    x, y, w, h = b.unbind(-1)
    return torch.stack([x, y, x + w, y + h], dim=-1)


def xyxy_to_xywh(b: torch.Tensor) -> torch.Tensor:
    x0, y0, x1, y1 = b.unbind(-1)
    return torch.stack([x0, y0, x1 - x0, y1 - y0], dim=-1)


def coco_to_normalized(xywh: torch.Tensor, width: float, height: float) -> torch.Tensor:
    """COCO ``[x, y, w, h]`` pixels → normalised ``cxcywh`` (the model's format)."""
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    return xyxy_to_cxcywh(xywh_to_xyxy(xywh.float()) / scale)


def normalized_to_coco(cxcywh: torch.Tensor, width: float, height: float) -> torch.Tensor:
    """Normalised ``cxcywh`` → COCO ``[x, y, w, h]`` pixels."""
    scale = torch.tensor([width, height, width, height], dtype=cxcywh.dtype, device=cxcywh.device)
    return xyxy_to_xywh(cxcywh_to_xyxy(cxcywh) * scale)


def normalized_to_pixel_xyxy(cxcywh: torch.Tensor, width: float, height: float) -> torch.Tensor:
    """Normalised ``cxcywh`` → ``xyxy`` pixels (the evaluation's format)."""
    scale = torch.tensor([width, height, width, height], dtype=cxcywh.dtype, device=cxcywh.device)
    return cxcywh_to_xyxy(cxcywh) * scale


def box_area(b: torch.Tensor) -> torch.Tensor:
    return (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairwise IoU (N, M) of ``xyxy`` boxes, and the union (N, M)."""
    area_a, area_b = box_area(a), box_area(b)
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return inter / union.clamp(min=1e-12), union


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise GIoU (N, M) of ``xyxy`` boxes (Rezatofighi et al. 2019): IoU − (|C| − |A∪B|) / |C|,
    C the smallest box enclosing both. In [−1, 1]; 1 only for identical boxes."""
    iou, union = box_iou(a, b)
    lt = torch.min(a[:, None, :2], b[None, :, :2])
    rb = torch.max(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    enclosing = wh[..., 0] * wh[..., 1]
    return iou - (enclosing - union) / enclosing.clamp(min=1e-12)
