"""COCO mAP (IoU 0.50:0.95) and mAP@50, both through pycocotools' ``COCOeval``.

- ``coco_map``: ``COCOeval`` directly, on a COCO ground-truth dict and a list of COCO detections.
- ``detection_map``: torchmetrics' ``MeanAveragePrecision`` with ``backend="pycocotools"`` (the same COCOeval
  underneath, with torchmetrics' accumulation and DDP syncing), used by the stages on validation and test.
"""

from __future__ import annotations

import contextlib
import copy
import io

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchmetrics.detection import MeanAveragePrecision


def coco_map(gt: dict, detections: list[dict]) -> dict[str, float]:
    """``gt``: a COCO instances dict (``images``, ``annotations``, ``categories``); ``detections``: dicts with
    ``image_id``, ``category_id``, ``bbox`` (xywh pixels) and ``score``. Returns ``map`` and ``map50``."""
    if not detections:
        return {"map": 0.0, "map50": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        for ann in coco_gt.dataset["annotations"]:
            ann.setdefault("area", ann["bbox"][2] * ann["bbox"][3])
            ann.setdefault("iscrowd", 0)
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(copy.deepcopy(detections))
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"map": max(0.0, float(ev.stats[0])), "map50": max(0.0, float(ev.stats[1]))}


def detection_map() -> MeanAveragePrecision:
    """The stages' metric: inputs per image ``boxes`` (xyxy pixels), ``scores``, ``labels``; ``map`` and ``map_50``."""
    return MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")
