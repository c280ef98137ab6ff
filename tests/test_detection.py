"""Detection: box ops, matcher, criterion, COCO evaluation, data errors, and each stage through the CLI."""

from __future__ import annotations

import csv
import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import DET_TINY as TINY
from conftest import fit
from PIL import Image

from vitkd.detection.box_ops import (
    coco_to_normalized,
    cxcywh_to_xyxy,
    generalized_box_iou,
    normalized_to_coco,
    xyxy_to_cxcywh,
)
from vitkd.detection.criterion import SetCriterion
from vitkd.detection.evaluate import coco_map, detection_map
from vitkd.detection.matcher import HungarianMatcher
from vitkd.errors import VitkdInputError


def random_boxes(g: torch.Generator, n: int) -> torch.Tensor:
    c = torch.rand(n, 2, generator=g) * 0.6 + 0.2
    wh = torch.rand(n, 2, generator=g) * 0.3 + 0.05
    return torch.cat([c, wh], 1)


# -- box ops ------------------------------------------------------------------------------------------
def test_giou_hand_checked():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [3.0, 0.0, 4.0, 2.0]])
    g = generalized_box_iou(a, b)[0]
    # overlap: IoU 1/7, enclosing 3x3=9, union 7 → 1/7 − 2/9
    assert g[0].item() == pytest.approx(1 / 7 - 2 / 9, abs=1e-6)
    assert g[1].item() == pytest.approx(1.0)
    # disjoint: IoU 0, enclosing 4x2=8, union 4+2=6 → −2/8
    assert g[2].item() == pytest.approx(-0.25)


def test_box_conversions_round_trip():
    g = torch.Generator().manual_seed(0)
    b = random_boxes(g, 10)
    assert torch.allclose(xyxy_to_cxcywh(cxcywh_to_xyxy(b)), b, atol=1e-6)
    xywh = torch.tensor([[4.0, 8.0, 10.0, 6.0]])
    norm = coco_to_normalized(xywh, 64, 32)
    assert torch.allclose(norm, torch.tensor([[9 / 64, 11 / 32, 10 / 64, 6 / 32]]))
    assert torch.allclose(normalized_to_coco(norm, 64, 32), xywh, atol=1e-5)


# -- matcher ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(8))
def test_matcher_equals_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    q, t, k = 5, int(torch.randint(1, 5, (1,), generator=g)), 3
    logits, boxes = torch.randn(1, q, k + 1, generator=g), random_boxes(g, q)[None]
    tgt = {"labels": torch.randint(0, k, (t,), generator=g), "boxes": random_boxes(g, t)}
    matcher = HungarianMatcher()
    ((rows, cols),) = matcher({"pred_logits": logits, "pred_boxes": boxes}, [tgt])
    cost = matcher.cost_matrix(logits[0], boxes[0], tgt["labels"], tgt["boxes"])
    assert len(rows) == t and sorted(cols.tolist()) == list(range(t))
    best = min(sum(cost[p[j], j].item() for j in range(t)) for p in itertools.permutations(range(q), t))
    assert cost[rows, cols].sum().item() == pytest.approx(best, abs=1e-5)


def test_batched_matcher_matches_each_image_alone():
    """The batch's one cost matrix gives each image the assignment it gets matched on its own, empty images too."""
    g = torch.Generator().manual_seed(0)
    b, q, k = 6, 7, 3
    sizes = [3, 0, 1, 5, 0, 2]
    logits, boxes = torch.randn(b, q, k + 1, generator=g), random_boxes(g, b * q).view(b, q, 4)
    targets = [
        {"labels": torch.randint(0, k, (t,), generator=g), "boxes": random_boxes(g, t) if t else torch.zeros(0, 4)}
        for t in sizes
    ]
    matcher = HungarianMatcher()
    batched = matcher({"pred_logits": logits, "pred_boxes": boxes}, targets)
    for i, t in enumerate(targets):
        ((rows, cols),) = matcher({"pred_logits": logits[i : i + 1], "pred_boxes": boxes[i : i + 1]}, [t])
        assert torch.equal(batched[i][0], rows) and torch.equal(batched[i][1], cols) and len(rows) == sizes[i]
    none = matcher({"pred_logits": logits, "pred_boxes": boxes}, [targets[1]] * b)
    assert all(len(r) == 0 and len(c) == 0 for r, c in none)


def test_matcher_and_criterion_fp32_under_autocast():
    g = torch.Generator().manual_seed(0)
    outputs = {
        "pred_logits": torch.randn(2, 6, 4, generator=g).bfloat16(),
        "pred_boxes": random_boxes(g, 12).view(2, 6, 4).bfloat16(),
    }
    targets = [
        {"labels": torch.tensor([0, 2]), "boxes": random_boxes(g, 2)},
        {"labels": torch.tensor([1]), "boxes": random_boxes(g, 1)},
    ]
    crit = SetCriterion(3, HungarianMatcher())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = crit(outputs, targets)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in terms.values())


# -- criterion ----------------------------------------------------------------------------------------
def test_criterion_zero_on_perfect_predictions():
    g = torch.Generator().manual_seed(1)
    k, q = 3, 6
    targets = [
        {"labels": torch.tensor([0, 2, 1]), "boxes": random_boxes(g, 3)},
        {"labels": torch.tensor([2]), "boxes": random_boxes(g, 1)},
    ]
    logits = torch.full((2, q, k + 1), -30.0)
    logits[..., k] = 30.0  # every query says "no object" …
    boxes = random_boxes(g, 2 * q).view(2, q, 4)
    for i, t in enumerate(targets):  # … except one per target, right class and box (in shuffled slots)
        slots = torch.randperm(q, generator=g)[: len(t["labels"])]
        logits[i, slots] = -30.0
        logits[i, slots, t["labels"]] = 30.0
        boxes[i, slots] = t["boxes"]
    out = {
        "pred_logits": logits,
        "pred_boxes": boxes,
        "aux_outputs": [{"pred_logits": logits.clone(), "pred_boxes": boxes.clone()}],
    }
    terms = SetCriterion(k, HungarianMatcher())(out, targets)
    assert set(terms) == {"ce", "bbox", "giou", "ce_aux0", "bbox_aux0", "giou_aux0"}
    assert all(v.item() < 1e-5 for v in terms.values())
    out["pred_boxes"] = out["pred_boxes"] + 0.05  # and clearly not 0 when the boxes are off
    assert SetCriterion(k, HungarianMatcher())(out, targets)["bbox"].item() > 0.1


# Two boxes (cxcywh) and, near each, one prediction; the GIoU of each pair by hand (xyxy, area, union, enclosing):
#   A = (0.3, 0.3, 0.2, 0.2)  → [0.2, 0.2, 0.4, 0.4]   A' = (0.35, 0.35, 0.2, 0.2) → [0.25, 0.25, 0.45, 0.45]
#       L1 = 0.05 + 0.05 = 0.1; inter 0.15·0.15 = 0.0225, union 0.04 + 0.04 − 0.0225 = 0.0575, IoU 9/23,
#       enclosing 0.25·0.25 = 0.0625 → GIoU = 9/23 − 0.005/0.0625 = 9/23 − 0.08, 1 − GIoU = 14/23 + 0.08
#   B = (0.7, 0.6, 0.2, 0.4)  → [0.6, 0.4, 0.8, 0.8]   B' = (0.75, 0.65, 0.2, 0.3) → [0.65, 0.5, 0.85, 0.8]
#       L1 = 0.05 + 0.05 + 0 + 0.1 = 0.2; inter 0.15·0.3 = 0.045, union 0.08 + 0.06 − 0.045 = 0.095, IoU 9/19,
#       enclosing 0.25·0.4 = 0.1 → GIoU = 9/19 − 0.005/0.1 = 9/19 − 0.05, 1 − GIoU = 10/19 + 0.05
BOX_A, BOX_A_NEAR = [0.3, 0.3, 0.2, 0.2], [0.35, 0.35, 0.2, 0.2]
BOX_B, BOX_B_NEAR = [0.7, 0.6, 0.2, 0.4], [0.75, 0.65, 0.2, 0.3]
BOX_FAR = [0.1, 0.9, 0.1, 0.1]  # far from A and B: never matched to either
HAND_L1 = (0.1, 0.2)
HAND_ONE_MINUS_GIOU = (14 / 23 + 0.08, 10 / 19 + 0.05)


def hand_nll(logits: list[float], label: int) -> float:
    """−log softmax(logits)[label], written out."""
    return math.log(sum(math.exp(z) for z in logits)) - logits[label]


def hand_kl(t_logits: list[float], s_logits: list[float], tau: float) -> float:
    """KL(softmax(t/τ) ‖ softmax(s/τ)) = Σ_c p_T(c) (log p_T(c) − log p_S(c)), written out."""
    pt = [math.exp(z / tau) for z in t_logits]
    ps = [math.exp(z / tau) for z in s_logits]
    pt, ps = [v / sum(pt) for v in pt], [v / sum(ps) for v in ps]
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps))


# 2 targets (labels 1 on A, 0 on B; K = 2, no-object = 2), 3 queries: q0 near A, q1 far (unmatched → no-object),
# q2 near B. Box costs (5·L1 − 2·GIoU ≈ −0.12 and 0.15 for the right pairs, > 2 for any other) fix the matching.
CRIT_LOGITS = [[0.0, 2.0, 0.0], [1.0, 0.0, -1.0], [1.0, 0.0, 0.5]]
CRIT_BOXES = [BOX_A_NEAR, BOX_FAR, BOX_B_NEAR]
CRIT_TARGET = {"labels": [1, 0], "boxes": [BOX_A, BOX_B]}


def crit_hand_values(eos_coef: float = 0.1) -> dict[str, float]:
    """Unweighted ce, bbox, giou of CRIT_* by hand: weighted-mean CE (weights 1, eos_coef, 1), sums / N_b = 2."""
    nll = [hand_nll(CRIT_LOGITS[0], 1), hand_nll(CRIT_LOGITS[1], 2), hand_nll(CRIT_LOGITS[2], 0)]
    ce = (1.0 * nll[0] + eos_coef * nll[1] + 1.0 * nll[2]) / (1.0 + eos_coef + 1.0)
    return {"ce": ce, "bbox": sum(HAND_L1) / 2, "giou": sum(HAND_ONE_MINUS_GIOU) / 2}


def test_criterion_hand_values_with_no_object_query():
    out = {"pred_logits": torch.tensor([CRIT_LOGITS]), "pred_boxes": torch.tensor([CRIT_BOXES])}
    targets = [{"labels": torch.tensor(CRIT_TARGET["labels"]), "boxes": torch.tensor(CRIT_TARGET["boxes"])}]
    ((rows, cols),) = HungarianMatcher()(out, targets)
    assert dict(zip(rows.tolist(), cols.tolist())) == {0: 0, 2: 1}  # q1 is left to no-object
    hand = crit_hand_values()
    # NLLs: q0 log(e² + 2) − 2 ≈ 0.2395, q1 (no-object) log(e + 1 + 1/e) + 1 ≈ 2.4076, q2 log(e + 1 + √e) − 1 ≈ 0.6803
    # ce = (0.2395 + 0.1·2.4076 + 0.6803) / 2.1 ≈ 0.5527; bbox = 0.3/2 = 0.15; giou = (0.6887 + 0.5763)/2 ≈ 0.6325
    terms = SetCriterion(2, HungarianMatcher())(out, targets)  # DETR weights: ce 1, bbox 5, giou 2
    assert set(terms) == {"ce", "bbox", "giou"}
    assert terms["ce"].item() == pytest.approx(1.0 * hand["ce"], rel=1e-5)
    assert terms["bbox"].item() == pytest.approx(5.0 * hand["bbox"], rel=1e-5)
    assert terms["giou"].item() == pytest.approx(2.0 * hand["giou"], rel=1e-5)
    # eos_coef only weighs the no-object query: at 1.0 the CE is the plain mean of the three NLLs (≈ 1.1091)
    plain = SetCriterion(2, HungarianMatcher(), eos_coef=1.0)(out, targets)["ce"].item()
    assert plain == pytest.approx(crit_hand_values(eos_coef=1.0)["ce"], rel=1e-5)
    assert abs(plain - hand["ce"]) > 0.1


# -- distillation terms (distill.py) ---------------------------------------------------------------------
# Teacher (K = 2): q0 class 0 on A, q1 a no-object query (best object probability 1/(e³ + 2) ≈ 0.045) placed
# exactly on the student's far query, q2 class 1 on B. Student: s0 near B, s1 far, s2 near A.
KD_T_LOGITS = [[2.0, 0.0, 0.0], [0.0, 0.0, 3.0], [0.0, 3.0, 0.0]]
KD_T_BOXES = [BOX_A, BOX_FAR, BOX_B]
KD_S_LOGITS = [[0.5, 1.0, -0.5], [0.0, 0.0, 2.0], [1.0, -1.0, 0.0]]
KD_S_BOXES = [BOX_B_NEAR, BOX_FAR, BOX_A_NEAR]


def test_teacher_set_hand_made():
    from vitkd.detection.distill import teacher_set

    # image 0: p(q0) = softmax(2, 0, 0) → e²/(e² + 2) ≈ 0.787 class 0;  q1 → 1/(e³ + 2) ≈ 0.045;
    #          q2 → e³/(e³ + 2) ≈ 0.909 class 1
    # image 1: q0 = (1, 0, 3): 0.114 over all K + 1 classes (0.73 if no-object were left out of the softmax);
    #          q1 = (0, 1, 0.5): e/(e + 1 + e^0.5) ≈ 0.506 class 1;  q2 = (-1, -1, 4): ≈ 0.007
    logits = torch.tensor([KD_T_LOGITS, [[1.0, 0.0, 3.0], [0.0, 1.0, 0.5], [-1.0, -1.0, 4.0]]])
    boxes = torch.tensor([KD_T_BOXES, [BOX_B, BOX_A_NEAR, BOX_FAR]])
    sets = teacher_set({"pred_logits": logits, "pred_boxes": boxes}, threshold=0.5)
    assert len(sets) == 2
    assert sets[0]["labels"].tolist() == [0, 1] and sets[1]["labels"].tolist() == [1]
    assert torch.equal(sets[0]["boxes"], torch.tensor([BOX_A, BOX_B])) and torch.equal(
        sets[1]["boxes"], torch.tensor([BOX_A_NEAR])
    )
    assert torch.equal(sets[0]["logits"], logits[0, [0, 2]]) and torch.equal(sets[1]["logits"], logits[1, [1]])
    e = math.e
    assert sets[0]["scores"].tolist() == pytest.approx([e**2 / (e**2 + 2), e**3 / (e**3 + 2)], rel=1e-6)
    assert sets[1]["scores"].tolist() == pytest.approx([e / (e + 1 + e**0.5)], rel=1e-6)
    # a higher threshold keeps only image 0's q2 (0.909); no box passes 0.95
    high = teacher_set({"pred_logits": logits, "pred_boxes": boxes}, threshold=0.8)
    assert high[0]["labels"].tolist() == [1] and len(high[1]["labels"]) == 0
    assert torch.equal(high[0]["boxes"], torch.tensor([BOX_B]))
    assert all(len(t["labels"]) == 0 for t in teacher_set({"pred_logits": logits, "pred_boxes": boxes}, threshold=0.95))


def test_detr_kd_losses_hand_values():
    from vitkd.detection.distill import detr_kd_losses

    tau = 2.0
    student = {"pred_logits": torch.tensor([KD_S_LOGITS]), "pred_boxes": torch.tensor([KD_S_BOXES])}
    teacher = {"pred_logits": torch.tensor([KD_T_LOGITS]), "pred_boxes": torch.tensor([KD_T_BOXES])}
    kd = detr_kd_losses(student, teacher, HungarianMatcher(), kd_threshold=0.5, temperature=tau)
    # teacher set at 0.5: q0 (A, class 0) and q2 (B, class 1), N_T = 2; matched: s2 ↔ q0, s0 ↔ q2
    kl = hand_kl(KD_T_LOGITS[0], KD_S_LOGITS[2], tau) + hand_kl(KD_T_LOGITS[2], KD_S_LOGITS[0], tau)
    assert kd["kd_cls"].item() == pytest.approx(
        tau**2 * kl / 2, rel=1e-5
    )  # (D1) τ² · mean KL ≈ 4·(0.0229 + 0.1339)/2 ≈ 0.3135
    assert kd["kd_bbox"].item() == pytest.approx((0.1 + 0.2) / 2, rel=1e-5)  # (D2) Σ L1 / N_T
    assert kd["kd_giou"].item() == pytest.approx(
        (14 / 23 + 0.08 + 10 / 19 + 0.05) / 2, rel=1e-5
    )  # (D3) Σ (1 − GIoU) / N_T
    # a one-query student (s2 only) matches q0 alone: KL is averaged over the 1 matched pair,
    # the box terms still / N_T = 2
    one = {"pred_logits": torch.tensor([KD_S_LOGITS[2:]]), "pred_boxes": torch.tensor([KD_S_BOXES[2:]])}
    kd1 = detr_kd_losses(one, teacher, HungarianMatcher(), kd_threshold=0.5, temperature=tau)
    assert kd1["kd_cls"].item() == pytest.approx(
        tau**2 * hand_kl(KD_T_LOGITS[0], KD_S_LOGITS[2], tau), rel=1e-5
    )  # ≈ 0.0914
    assert kd1["kd_bbox"].item() == pytest.approx(0.1 / 2, rel=1e-5)
    assert kd1["kd_giou"].item() == pytest.approx((14 / 23 + 0.08) / 2, rel=1e-5)
    # a student that copies the teacher's confident queries has all three terms 0
    same = {"pred_logits": torch.tensor([KD_T_LOGITS]), "pred_boxes": torch.tensor([KD_T_BOXES])}
    assert all(
        v.item() == pytest.approx(0.0, abs=1e-6)
        for v in detr_kd_losses(same, teacher, HungarianMatcher(), 0.5, tau).values()
    )


def test_probe_loss_hand_values():
    from vitkd.detection.distill import probe_loss

    # (D4) N · mean over images and patches of (P_S/ΣP_S − P_T/ΣP_T)², N = 4 patches (2x2 grid)
    student = torch.tensor([[[2.0, 0.0], [1.0, 1.0]], [[0.5, 0.5], [0.5, 0.5]]])
    teacher = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 3.0]]])
    # image 0: (0.5, 0, 0.25, 0.25) − (0.25,) * 4 → squares 0.0625 + 0.0625 = 0.125
    # image 1: (0.25,) * 4 − (0, 0, 0, 1)          → squares 3·0.0625 + 0.5625 = 0.75
    # 4 · (0.125 + 0.75) / 8 = 0.4375
    assert probe_loss(student, teacher).item() == pytest.approx(0.4375, rel=1e-6)
    assert probe_loss(3 * teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)  # scale-free: each map renormalised
    with pytest.raises(ValueError, match="differ in shape"):
        probe_loss(student[:, :1], teacher)


def test_distill_stage_with_teacher_labels_uses_the_teacher_set(monkeypatch):
    """label_source=teacher: the set loss is against the teacher's queries scoring ≥ pseudo_threshold, not the
    given labels. A stub teacher whose confident set is CRIT_TARGET and a stub student giving CRIT_* predictions
    must reproduce the hand values of test_criterion_hand_values_with_no_object_query."""
    import vitkd.stages.detection as stages

    class Fixed(torch.nn.Module):
        def __init__(self, logits, boxes):
            super().__init__()
            self.out = {"pred_logits": torch.tensor([logits]), "pred_boxes": torch.tensor([boxes])}

        def forward(self, x, dn=None, queries=None):
            return {k: v.clone() for k, v in self.out.items()}

    # teacher: q0 class 1 on A (≈ 0.787), q1 below 0.5 (e³/(21e³ + 1) ≈ 0.048), q2 class 0 on B (≈ 0.909)
    # → labels [1, 0], boxes [A, B]
    teacher = Fixed([[0.0, 2.0, 0.0], [3.0, 0.0, 3.0 + math.log(20)], [3.0, 0.0, 0.0]], [BOX_A, BOX_FAR, BOX_B])
    monkeypatch.setattr(stages, "load_detr", lambda *a, **k: (teacher, {"arch": "stub"}))
    stage = stages.DetrDistillation(
        "unused.ckpt",
        arch="detr_test",
        num_classes=2,
        label_source="teacher",
        pseudo_threshold=0.5,
        kd_cls_weight=0.0,
        kd_bbox_weight=0.0,
        kd_giou_weight=0.0,
    )
    stage.model = Fixed(CRIT_LOGITS, CRIT_BOXES)
    wrong = [{"labels": torch.tensor([0]), "boxes": torch.tensor([BOX_FAR])}]  # the given labels must be ignored
    terms = stage.losses(torch.zeros(1, 3, 64, 64), wrong)
    hand = crit_hand_values()
    assert set(terms) == {"ce", "bbox", "giou"}
    assert terms["ce"].item() == pytest.approx(hand["ce"], rel=1e-5)
    assert terms["bbox"].item() == pytest.approx(5.0 * hand["bbox"], rel=1e-5)
    assert terms["giou"].item() == pytest.approx(2.0 * hand["giou"], rel=1e-5)


# -- evaluation ---------------------------------------------------------------------------------------
def small_coco() -> dict:
    images = [{"id": i, "file_name": f"{i}.png", "width": 64, "height": 64} for i in (1, 2)]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 10, 10]},
        {"id": 2, "image_id": 1, "category_id": 2, "bbox": [30, 20, 8, 12]},
        {"id": 3, "image_id": 2, "category_id": 1, "bbox": [50, 40, 12, 9]},
    ]
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}


def test_cocoeval_ground_truth_against_itself_is_one():
    gt = small_coco()
    dets = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in gt["annotations"]
    ]
    assert coco_map(gt, dets) == {"map": pytest.approx(1.0), "map50": pytest.approx(1.0)}
    shifted = [{**d, "bbox": [d["bbox"][0] + 6, *d["bbox"][1:]]} for d in dets]
    assert coco_map(gt, shifted)["map"] < 0.5
    metric = detection_map()
    boxes = torch.tensor([[4.0, 4, 14, 14], [30, 20, 38, 32]])
    metric.update(
        [{"boxes": boxes, "scores": torch.ones(2), "labels": torch.tensor([0, 1])}],
        [{"boxes": boxes, "labels": torch.tensor([0, 1])}],
    )
    r = metric.compute()
    assert r["map"].item() == pytest.approx(1.0) and r["map_50"].item() == pytest.approx(1.0)


# -- data -----------------------------------------------------------------------------------------------
def write_set(tmp: Path, coco: dict, skip: set[str] = frozenset()) -> Path:
    (tmp / "img").mkdir(parents=True, exist_ok=True)
    for im in coco["images"]:
        if im["file_name"] not in skip:
            Image.new("RGB", (im["width"], im["height"]), (90, 20, 200)).save(tmp / "img" / im["file_name"])
    (tmp / "ann.json").write_text(json.dumps(coco))
    return tmp / "ann.json"


def test_coco_missing_image_names_the_entry(tmp_path):
    from data_modules.coco import CocoDataModule

    ann = write_set(tmp_path, small_coco(), skip={"2.png"})
    dm = CocoDataModule(
        train_images=str(tmp_path / "img"), train_json=str(ann), val_images=str(tmp_path / "img"), val_json=str(ann)
    )
    with pytest.raises(VitkdInputError, match=r"image id 2 file '2.png' not found") as err:
        dm.setup("fit")
    assert "\n" not in str(err.value)


def test_coco_train_json_is_read_once(tmp_path, monkeypatch):
    import data_modules.coco as coco_mod

    ann = write_set(tmp_path, small_coco())
    reads = []
    real = coco_mod.load_json
    monkeypatch.setattr(coco_mod, "load_json", lambda f: reads.append(str(f)) or real(f))
    dm = coco_mod.CocoDataModule(
        train_images=str(tmp_path / "img"), train_json=str(ann), val_images=str(tmp_path / "img"), val_json=str(ann)
    )
    dm.setup("fit")
    assert reads == [str(ann), str(ann)]  # once for train (categories and entries), once for val
    assert dm.num_classes == len(small_coco()["categories"]) and len(dm.dataset("train")) == len(small_coco()["images"])


def test_coco_box_outside_image_names_the_entry(tmp_path):
    from data_modules.coco import CocoDetection

    coco = small_coco()
    coco["annotations"][2]["bbox"] = [58, 40, 12, 9]  # x + w = 70 > 64
    ann = write_set(tmp_path, coco)
    with pytest.raises(VitkdInputError, match=r"annotation id 3 \(image id 2\).*outside the 64x64 image"):
        CocoDetection(tmp_path / "img", ann, img_size=32)


def test_coco_set_and_shards_give_the_same_targets(tmp_path):
    from data_modules.coco import CocoDetection, DetectionShards, coco_to_shards

    ann = write_set(tmp_path, small_coco())
    ds = CocoDetection(tmp_path / "img", ann, img_size=32)
    x, t = ds[0]
    assert x.shape == (3, 32, 32) and t["labels"].tolist() == [0, 1]
    assert torch.allclose(t["boxes"][0], torch.tensor([9 / 64, 9 / 64, 10 / 64, 10 / 64]))
    coco_to_shards(tmp_path / "img", ann, tmp_path / "shards")
    items = list(DetectionShards(str(tmp_path / "shards" / "det-000000.tar"), img_size=32, num_classes=2))
    assert len(items) == 2
    for (xs, ts), i in zip(items, range(2)):
        xc, tc = ds[i]
        assert (
            torch.allclose(xs, xc)
            and torch.equal(ts["labels"], tc["labels"])
            and torch.allclose(ts["boxes"], tc["boxes"])
        )


def test_shard_box_outside_image_names_the_sample(tmp_path):
    import io

    from data_modules.coco import DetectionShards
    from data_modules.shards import write_shards

    buf = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buf, format="PNG")
    meta = {"width": 32, "height": 32, "annotations": [{"bbox": [20, 20, 20, 5], "category_id": 0}]}
    write_shards(
        [{"__key__": "bad0001", "png": buf.getvalue(), "json": json.dumps(meta)}],
        tmp_path / "s",
        pattern="det-%06d.tar",
    )
    with pytest.raises(VitkdInputError, match=r"'bad0001'.*outside the 32x32 image"):
        list(DetectionShards(str(tmp_path / "s" / "det-000000.tar"), img_size=32, num_classes=1))


def test_aerial_set_is_fixed_and_valid(tmp_path):
    from data_modules.aerial import AerialDataModule

    dm = AerialDataModule(data_dir=str(tmp_path), num_train=12, num_val=4, num_test=4)
    dm.setup("fit")
    dm.setup("test")
    first = (dm.root / "train.json").read_text()
    again = AerialDataModule(data_dir=str(tmp_path / "again"), num_train=12, num_val=4, num_test=4)
    again.prepare_data()
    assert (again.root / "train.json").read_text() == first
    ds = dm.dataset("train")
    boxes = torch.cat([ds[i][1]["boxes"] for i in range(len(ds))])
    assert len(boxes) >= 12 and boxes[:, 2:].max() < 0.25  # small objects, at least one per image
    assert set(torch.cat([ds[i][1]["labels"] for i in range(len(ds))]).tolist()) <= set(range(dm.num_classes))


# -- stages through the CLI -----------------------------------------------------------------------------
def test_teacher_stage_through_cli(det_teacher):
    """The teacher run's best checkpoint (its metrics are checked by the fixture) is a DetrTrainer checkpoint
    chosen on validation, with finite weights a distillation stage can load."""
    ckpt = torch.load(det_teacher, map_location="cpu", weights_only=False)
    assert ckpt["vitkd_stage"] == "DetrTrainer"
    best = next(v for k, v in ckpt["callbacks"].items() if k.startswith("ModelCheckpoint"))
    assert best["monitor"] == "val/map" and Path(best["best_model_path"]).name == "best.ckpt"
    state = ckpt["state_dict"]
    assert state and all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_student_scratch_stage_through_cli(tmp_path):
    m = fit(
        "--config",
        "experiments/detection/student_scratch.yaml",
        *TINY,
        "--data.init_args.data_dir",
        str(tmp_path / "d"),
        "--run_dir",
        str(tmp_path / "r"),
    )
    assert {"test/map", "test/map50", "params", "gflops", "images_per_s"} <= set(m)


@pytest.mark.parametrize("label_source", ["data", "teacher"])
def test_distill_stage_through_cli(det_teacher, tmp_path, label_source):
    run = tmp_path / "r"
    m = fit(
        "--config",
        "experiments/detection/distill.yaml",
        *TINY,
        "--data.init_args.data_dir",
        str(tmp_path / "d"),
        "--model.init_args.teacher_ckpt",
        str(det_teacher),
        "--model.init_args.label_source",
        label_source,
        "--model.init_args.pseudo_threshold",
        "0.0",
        "--model.init_args.probe_weight",
        "0.5",
        "--run_dir",
        str(run),
    )
    assert 0.0 <= m["test/map"] <= 1.0
    state = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert state and not any(
        k.startswith("teacher.") for k in state
    )  # the teacher stays out of the student's checkpoint


def test_distill_terms_switch_off_and_log(det_teacher):
    from vitkd.stages.detection import DetrDistillation

    stage = DetrDistillation(str(det_teacher), arch="detr_test", probe_weight=0.5, kd_giou_weight=0.0)
    stage.train()
    assert not stage.teacher.training
    x = torch.randn(2, 3, 64, 64)
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}] * 2
    terms = stage.losses(x, targets)
    assert {"ce", "bbox", "giou", "kd_cls", "kd_bbox", "probe"} <= set(terms) and "kd_giou" not in terms
    assert all(torch.isfinite(v) for v in terms.values())


def test_bad_teacher_checkpoint_is_one_line(tmp_path):
    with pytest.raises(VitkdInputError, match="does not exist"):
        fit(
            "--config",
            "experiments/detection/distill.yaml",
            *TINY,
            "--data.init_args.data_dir",
            str(tmp_path / "d"),
            "--model.init_args.teacher_ckpt",
            str(tmp_path / "none.ckpt"),
            "--run_dir",
            str(tmp_path / "r"),
        )


def test_detr_presets_and_outputs():
    from vitkd.detection.detr import DETR_PRESETS, create_detr

    teacher, student = (create_detr(n, num_classes=4) for n in ("detr_aerial_teacher", "detr_aerial_student"))

    def count(m):
        return sum(p.numel() for p in m.parameters())

    assert count(student) < count(teacher) / 3 and student.num_queries <= teacher.num_queries
    x = torch.randn(2, 3, 64, 64)
    out = teacher.train()(x)
    assert out["pred_logits"].shape == (2, 16, 5) and out["pred_boxes"].shape == (2, 16, 4)
    assert len(out["aux_outputs"]) == DETR_PRESETS["detr_aerial_teacher"]["dec_layers"] - 1
    assert ((out["pred_boxes"] > 0) & (out["pred_boxes"] < 1)).all()
    assert "aux_outputs" not in teacher.eval()(x)
    with pytest.raises(VitkdInputError, match="unknown DETR arch"):
        create_detr("detr_nope", num_classes=4)


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_distill_stage_under_mixed_precision(det_teacher, tmp_path, precision):
    """bf16 and fp16 autocast (the MixedPrecision plugin: Lightning turns '16-mixed' into bf16 on a CPU);
    the matcher and box losses stay fp32 inside, so every figure is finite."""
    args = (
        ["--trainer.precision", "bf16-mixed"]
        if precision == "bf16-mixed"
        else [
            "--trainer.precision",
            "null",
            "--trainer.plugins+=lightning.pytorch.plugins.precision.MixedPrecision",
            "--trainer.plugins.precision",
            "16-mixed",
            "--trainer.plugins.device",
            "cpu",
        ]
    )
    m = fit(
        "--config",
        "experiments/detection/distill.yaml",
        *TINY,
        *args,
        "--trainer.log_every_n_steps",
        "1",
        "--data.init_args.data_dir",
        str(tmp_path / "d"),
        "--model.init_args.teacher_ckpt",
        str(det_teacher),
        "--run_dir",
        str(tmp_path / "r"),
    )
    assert all(math.isfinite(m[k]) for k in ("test/map", "test/map50", "images_per_s"))
    logged = [
        float(v)
        for row in csv.DictReader(open(tmp_path / "r" / "metrics.csv"))
        for k, v in row.items()
        if k.startswith("train/") and v
    ]
    assert logged and all(math.isfinite(v) for v in logged)
