"""DETR's box normaliser under torch.distributed: N_b is the mean box count over the processes, clamped at 1.

A real single-process gloo group checks that the all-reduce is taken; a patched all-reduce then plays a
second process holding more (or fewer) boxes, and the box terms must follow N_b = max(1, (n_0 + n_1) / 2).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from vitkd.detection import criterion
from vitkd.detection.criterion import SetCriterion
from vitkd.detection.distill import detr_kd_losses
from vitkd.detection.matcher import HungarianMatcher

# One image, 2 target boxes, 3 queries: q0 near A, q1 far (no-object), q2 near B. By hand (see test_detection):
# Σ L1 = 0.1 + 0.2, Σ (1 − GIoU) = 14/23 + 0.08 + 10/19 + 0.05.
BOX_A, BOX_A_NEAR = [0.3, 0.3, 0.2, 0.2], [0.35, 0.35, 0.2, 0.2]
BOX_B, BOX_B_NEAR = [0.7, 0.6, 0.2, 0.4], [0.75, 0.65, 0.2, 0.3]
BOX_FAR = [0.1, 0.9, 0.1, 0.1]
SUM_L1 = 0.1 + 0.2
SUM_ONE_MINUS_GIOU = 14 / 23 + 0.08 + 10 / 19 + 0.05
OUT = {
    "pred_logits": torch.tensor([[[0.0, 2.0, 0.0], [1.0, 0.0, -1.0], [1.0, 0.0, 0.5]]]),
    "pred_boxes": torch.tensor([[BOX_A_NEAR, BOX_FAR, BOX_B_NEAR]]),
}
TARGETS = [{"labels": torch.tensor([1, 0]), "boxes": torch.tensor([BOX_A, BOX_B])}]
# Teacher whose confident set (threshold 0.5) is A and B: the student OUT matches it as above.
TEACHER = {
    "pred_logits": torch.tensor([[[0.0, 3.0, 0.0], [0.0, 0.0, 3.0], [3.0, 0.0, 0.0]]]),
    "pred_boxes": torch.tensor([[BOX_A, BOX_FAR, BOX_B]]),
}
REAL_ALL_REDUCE = dist.all_reduce


@pytest.fixture
def gloo_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def other_rank(monkeypatch, boxes: float, world: int = 2) -> list[float]:
    """Patch the all-reduce so that another process seems to add ``boxes``; returns the values it reduced."""
    real, seen = REAL_ALL_REDUCE, []

    def fake(tensor, *args, **kwargs):
        seen.append(float(tensor))
        out = real(tensor, *args, **kwargs)  # the real gloo call (world size 1: the identity)
        tensor += boxes
        return out

    monkeypatch.setattr(dist, "all_reduce", fake)
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: world)
    return seen


def test_without_a_process_group_the_local_count_is_used():
    assert not dist.is_initialized()
    assert criterion.global_num_boxes(TARGETS, torch.device("cpu")).item() == 2.0
    assert criterion.global_num_boxes([{"labels": torch.zeros(0)}], torch.device("cpu")).item() == 1.0  # clamped at 1
    terms = SetCriterion(2, HungarianMatcher())(OUT, TARGETS)
    assert terms["bbox"].item() == pytest.approx(5.0 * SUM_L1 / 2, rel=1e-5)


def test_single_process_group_takes_the_all_reduce_and_keeps_the_scale(gloo_group, monkeypatch):
    seen = other_rank(monkeypatch, boxes=0.0, world=1)
    terms = SetCriterion(2, HungarianMatcher())(OUT, TARGETS)
    assert seen == [2.0]  # one all-reduce per step (shared by the layers), on the local box count
    assert terms["bbox"].item() == pytest.approx(5.0 * SUM_L1 / 2, rel=1e-5)
    assert terms["giou"].item() == pytest.approx(2.0 * SUM_ONE_MINUS_GIOU / 2, rel=1e-5)


@pytest.mark.parametrize("other, n_b", [(6.0, 4.0), (0.0, 1.0)])  # (2 + 6) / 2 = 4; (2 + 0) / 2 = 1
def test_criterion_divides_by_the_mean_box_count_over_processes(gloo_group, monkeypatch, other, n_b):
    seen = other_rank(monkeypatch, boxes=other)
    out = {**OUT, "aux_outputs": [{"pred_logits": OUT["pred_logits"].clone(), "pred_boxes": OUT["pred_boxes"].clone()}]}
    terms = SetCriterion(2, HungarianMatcher())(out, TARGETS)
    for suffix in ("", "_aux0"):
        assert terms["bbox" + suffix].item() == pytest.approx(5.0 * SUM_L1 / n_b, rel=1e-5)
        assert terms["giou" + suffix].item() == pytest.approx(2.0 * SUM_ONE_MINUS_GIOU / n_b, rel=1e-5)
    assert seen == [2.0]


def test_box_count_is_clamped_at_one_after_averaging(gloo_group, monkeypatch):
    other_rank(monkeypatch, boxes=1.0)  # (0 + 1) / 2 = 0.5 → 1
    assert criterion.global_num_boxes([{"labels": torch.zeros(0)}], torch.device("cpu")).item() == 1.0
    other_rank(monkeypatch, boxes=5.0, world=4)  # (2 + 5) / 4 = 1.75
    assert criterion.global_num_boxes(TARGETS, torch.device("cpu")).item() == pytest.approx(1.75)


def test_kd_box_terms_use_the_global_teacher_count(gloo_group, monkeypatch):
    local = detr_kd_losses(OUT, TEACHER, HungarianMatcher(), kd_threshold=0.5)
    assert local["kd_bbox"].item() == pytest.approx(SUM_L1 / 2, rel=1e-5)
    other_rank(monkeypatch, boxes=6.0)  # N_T = (2 + 6) / 2 = 4
    kd = detr_kd_losses(OUT, TEACHER, HungarianMatcher(), kd_threshold=0.5)
    assert kd["kd_bbox"].item() == pytest.approx(SUM_L1 / 4, rel=1e-5)
    assert kd["kd_giou"].item() == pytest.approx(SUM_ONE_MINUS_GIOU / 4, rel=1e-5)
    assert kd["kd_cls"].item() == pytest.approx(local["kd_cls"].item(), rel=1e-6)  # (D1) stays a per-process mean


def test_kd_with_an_empty_teacher_set_still_joins_the_all_reduce(gloo_group, monkeypatch):
    seen = other_rank(monkeypatch, boxes=3.0)
    kd = detr_kd_losses(OUT, TEACHER, HungarianMatcher(), kd_threshold=0.99)  # nothing is that confident here
    assert seen == [0.0]  # the other processes are not left waiting
    assert all(v.item() == 0.0 for v in kd.values())
