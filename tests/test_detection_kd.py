"""Detection distillation beyond (D1)–(D4): denoising queries (DN-DETR), shared-query distillation (KD-DETR,
Eq. D5–D7), anchor queries, unlabeled training images, and one CLI step per new variant."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DET_TINY as TINY
from conftest import fit

from vitkd.detection.box_ops import cxcywh_to_xyxy, generalized_box_iou
from vitkd.detection.criterion import SetCriterion
from vitkd.detection.denoising import denoising_losses, make_denoising_queries
from vitkd.detection.detr import create_detr
from vitkd.detection.distill import general_queries, shared_query_losses
from vitkd.detection.matcher import HungarianMatcher
from vitkd.errors import VitkdInputError

TARGETS = [
    {"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.1, 0.2], [0.7, 0.6, 0.2, 0.1]])},
    {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3]])},
]


# -- shared-query distillation (D5)–(D7) ------------------------------------------------------------------
def test_shared_query_terms_hand_values():
    """Two points, K = 1 (logits over [object, no object]): the teacher is sure of an object at point 0 (w0 = the
    sigmoid of 2) and unsure at point 1 (w1 = 1/2); the student is uniform at both."""
    t_logits = torch.tensor([[[2.0, 0.0], [0.0, 0.0]]])
    s_logits = torch.zeros(1, 2, 2)
    t_boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1]]])
    s_boxes = torch.tensor([[[0.6, 0.5, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1]]])
    terms = shared_query_losses(
        {"query_outputs": {"pred_logits": s_logits, "pred_boxes": s_boxes}},
        {"query_outputs": {"pred_logits": t_logits, "pred_boxes": t_boxes}},
    )
    p = 1 / (1 + math.exp(-2.0))  # teacher's object probability at point 0
    kl0 = p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5)
    assert terms["sq_cls"].item() == pytest.approx((kl0 + 0.0) / 2, rel=1e-5)
    w0, w1 = p, 0.5
    assert terms["sq_bbox"].item() == pytest.approx(w0 * 0.1 / (w0 + w1), rel=1e-5)
    # point 0: boxes [0.4, 0.6] vs [0.5, 0.7] in x, same y: IoU = 0.1·0.2 / (0.3·0.2) = 1/3, hull = union
    assert terms["sq_giou"].item() == pytest.approx(w0 * (1 - 1 / 3) / (w0 + w1), rel=1e-5)


def test_shared_query_terms_zero_when_the_student_answers_as_the_teacher():
    g = torch.Generator().manual_seed(0)
    out = {"pred_logits": torch.randn(2, 5, 4, generator=g), "pred_boxes": torch.rand(2, 5, 4, generator=g) * 0.3 + 0.2}
    terms = shared_query_losses({"query_outputs": out}, {"query_outputs": out})
    assert all(v.abs().item() < 1e-4 for v in terms.values())  # GIoU: torchvision adds eps 1e-7 to the areas
    hot = {"pred_logits": out["pred_logits"] * 3, "pred_boxes": out["pred_boxes"]}
    assert shared_query_losses({"query_outputs": out}, {"query_outputs": hot})["sq_cls"].item() > 1e-3


def test_general_queries_inside_the_image():
    q = general_queries(3, 50, torch.device("cpu"), 0.05, 0.3)
    assert q.shape == (3, 50, 4)
    assert (q[..., :2] >= 0).all() and (q[..., :2] <= 1).all()
    assert (q[..., 2:] >= 0.05).all() and (q[..., 2:] <= 0.3).all()


def test_a_query_is_a_box_both_models_answer():
    """Any box runs through teacher and student alike (different widths), as a group of its own: its answer
    does not change when the own queries or the denoising queries change."""
    torch.manual_seed(0)
    teacher, student = create_detr("detr_test", num_classes=3), create_detr("detr_test", num_classes=3, d_model=16)
    x, boxes = torch.randn(2, 3, 64, 64), general_queries(2, 4, torch.device("cpu"))
    for model in (teacher.eval(), student.eval()):
        a = model(x, queries=boxes)["query_outputs"]
        assert a["pred_logits"].shape == (2, 4, 4) and a["pred_boxes"].shape == (2, 4, 4)
        with torch.no_grad():
            model.anchors.add_(0.3)
        dn = make_denoising_queries(TARGETS, 3)
        b = model.train()(x, dn=dn, queries=boxes)["query_outputs"]
        assert torch.allclose(a["pred_logits"], b["pred_logits"], atol=1e-5)
        assert torch.allclose(a["pred_boxes"], b["pred_boxes"], atol=1e-5)


# -- denoising queries ------------------------------------------------------------------------------------
def test_denoising_noise_bounds_and_layout():
    torch.manual_seed(0)
    dn = make_denoising_queries(TARGETS, num_classes=3, groups=4, box_noise=0.4, label_noise=0.0, unknown=0.0)
    assert (dn.groups, dn.pad, dn.size) == (4, 2, 8)
    assert dn.valid.tolist() == [[True, True] * 4, [True, False] * 4]
    for i, t in enumerate(TARGETS):
        for q in range(dn.size):
            if not dn.valid[i, q]:
                assert dn.labels[i, q] == 3  # padding: "no label"
                continue
            gt = t["boxes"][dn.target_index[i, q]]
            assert dn.labels[i, q] == t["labels"][dn.target_index[i, q]]  # no label noise asked
            assert ((dn.boxes[i, q, :2] - gt[:2]).abs() <= gt[2:] / 2 * 0.4 + 1e-6).all()
            assert ((dn.boxes[i, q, 2:] - gt[2:]).abs() <= gt[2:] * 0.4 + 1e-6).all()
    flipped = make_denoising_queries(TARGETS, num_classes=3, groups=50, label_noise=1.0, unknown=0.0)
    assert (flipped.labels[flipped.valid] < 3).all() and flipped.labels[~flipped.valid].eq(3).all()
    bare = make_denoising_queries(TARGETS, num_classes=3, groups=50, unknown=1.0)
    assert bare.labels.eq(3).all()
    assert (
        make_denoising_queries([{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}], 3) is None
    )


def test_denoising_attention_mask():
    dn = make_denoising_queries(TARGETS, num_classes=3, groups=2)  # pad 2: groups [0, 2), [2, 4); matching [4, 7)
    m = dn.attention_mask(3)
    assert m.shape == (7, 7)
    assert m[4:, :4].all() and not m[4:, 4:].any()  # the matching queries see only themselves
    assert not m[:2, :2].any() and m[:2, 2:4].all() and not m[:2, 4:].any()  # group 0: itself and matching
    assert m[2:4, :2].all() and not m[2:4, 2:].any()  # group 1


class CountingMatcher(HungarianMatcher):
    def __init__(self):
        super().__init__()
        self.query_counts = []

    def forward(self, outputs, targets):
        self.query_counts.append(outputs["pred_logits"].shape[1])
        return super().forward(outputs, targets)


def test_denoising_queries_are_not_matched_and_perfect_answers_cost_nothing():
    """The criterion matches only the own queries (every matcher call sees Q of them, never the D denoising
    ones), and denoising outputs equal to their targets give (near) zero loss on every layer."""
    torch.manual_seed(0)
    k, q = 3, 5
    dn = make_denoising_queries(TARGETS, num_classes=k, groups=3)
    perfect_logits = torch.full((2, dn.size, k + 1), -30.0)
    perfect_boxes = torch.full((2, dn.size, 4), 0.5)
    for i, t in enumerate(TARGETS):
        for j in range(dn.size):
            if dn.valid[i, j]:
                perfect_logits[i, j, t["labels"][dn.target_index[i, j]]] = 30.0
                perfect_boxes[i, j] = t["boxes"][dn.target_index[i, j]]
    own = {"pred_logits": torch.randn(2, q, k + 1), "pred_boxes": torch.rand(2, q, 4) * 0.2 + 0.3}
    perfect = {"pred_logits": perfect_logits, "pred_boxes": perfect_boxes}
    outputs = {**own, "aux_outputs": [dict(own)], "dn_outputs": [dict(perfect), dict(perfect)]}
    matcher = CountingMatcher()
    terms = SetCriterion(k, matcher)(outputs, TARGETS, dn)
    assert matcher.query_counts == [q, q]  # last layer and one auxiliary layer; no call for the denoising part
    dn_terms = {n: v for n, v in terms.items() if "_dn" in n}
    assert set(dn_terms) == {f"{t}{s}" for t in ("ce", "bbox", "giou") for s in ("_dn", "_dn_aux0")}
    assert all(v.item() < 1e-4 for v in dn_terms.values())
    # a wrong denoising answer costs: the term can fail
    wrong = denoising_losses({**perfect, "pred_boxes": perfect_boxes.roll(1, 1)}, TARGETS, dn, torch.tensor(3.0))
    assert wrong["bbox"].item() > 0.01 and wrong["giou"].item() > 0.01


def test_denoising_loss_hand_value():
    """One image, one box, one group; the denoising query answers box B for target A with uniform classes."""
    t = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    dn = make_denoising_queries(t, num_classes=2, groups=1)
    out = {"pred_logits": torch.zeros(1, 1, 3), "pred_boxes": torch.tensor([[[0.55, 0.5, 0.2, 0.2]]])}
    got = denoising_losses(out, t, dn, torch.tensor(1.0))
    assert got["ce"].item() == pytest.approx(math.log(3), rel=1e-6)
    assert got["bbox"].item() == pytest.approx(0.05, rel=1e-5)
    a, b = cxcywh_to_xyxy(t[0]["boxes"]), cxcywh_to_xyxy(out["pred_boxes"][0])
    assert got["giou"].item() == pytest.approx(1 - generalized_box_iou(a, b).item(), rel=1e-5)
    assert got["giou"].item() == pytest.approx(1 - 0.15 * 0.2 / (0.25 * 0.2), rel=1e-5)  # IoU 3/5
    assert F.cross_entropy(torch.zeros(1, 3), torch.tensor([1])).item() == pytest.approx(got["ce"].item())


# -- CLI: one step per new variant --------------------------------------------------------------------------
def one_step(config: str, tmp_path, *extra: str) -> dict:
    return fit(
        "--config",
        f"experiments/detection/{config}",
        *TINY,
        "--data.init_args.data_dir",
        str(tmp_path / "d"),
        "--run_dir",
        str(tmp_path / "r"),
        "--trainer.log_every_n_steps",
        "1",
        *extra,
    )


def test_teacher_with_denoising_queries_through_cli(tmp_path):
    m = one_step("teacher.yaml", tmp_path, "--model.init_args.dn_groups", "2")
    assert 0.0 <= m["test/map"] <= 1.0
    logged = (tmp_path / "r" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "train/ce_dn" in logged and "train/bbox_dn" in logged


@pytest.mark.parametrize("config", ["distill_shared_query.yaml", "distill_pseudo_gt.yaml", "distill_data_free.yaml"])
def test_distill_variant_through_cli(det_teacher, tmp_path, config):
    m = one_step(
        config,
        tmp_path,
        "--model.init_args.teacher_ckpt",
        str(det_teacher),
        "--model.init_args.pseudo_threshold",
        "0.0",
        "--model.init_args.sq_general",
        "3",
        *(["--data.init_args.wild_images", "12"] if "data_free" in config else []),
    )
    assert 0.0 <= m["test/map"] <= 1.0
    logged = (tmp_path / "r" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/sq_cls", "train/sq_bbox", "train/sq_giou"} <= set(logged)
    if "data_free" in config:
        pool = sorted((tmp_path / "d").glob("aerial-wild-*/*.png"))
        assert len(pool) == 12 and not list((tmp_path / "d").glob("aerial-wild-*/*.json"))


def test_unlabeled_images_need_a_teacher_for_targets(det_teacher, tmp_path):
    """Training on labels from an unlabeled pool is one line naming the fix, before anything is written."""
    with pytest.raises(VitkdInputError, match="label_source teacher"):
        one_step("student_scratch.yaml", tmp_path, "--data.init_args.wild_images", "4")
    with pytest.raises(VitkdInputError, match="label_source teacher"):
        one_step(
            "distill.yaml",
            tmp_path,
            "--model.init_args.teacher_ckpt",
            str(det_teacher),
            "--data.init_args.wild_images",
            "4",
        )
    assert not (tmp_path / "r" / "checkpoints").exists()


# -- the teacher cache ---------------------------------------------------------------------------------------
def test_teacher_cache_gives_the_teachers_outputs(det_teacher):
    """With the cache the teacher's own outputs and its answers to shared queries are those of running it,
    the first time computed, the second time read back by image id."""
    from vitkd.stages.detection import DetrDistillation

    stage = DetrDistillation(str(det_teacher), arch="detr_test", sq_cls_weight=1.0, sq_general=3).train()
    x = torch.rand(2, 3, 64, 64)
    targets = [{**t, "image_id": i + 1} for i, t in enumerate(TARGETS)]
    queries = stage.shared_queries(2, x.device)
    direct = stage.teacher(x, queries=queries)
    for _ in range(2):
        got = stage.teacher_outputs(x, targets, queries)
        for key in ("pred_logits", "pred_boxes"):
            assert torch.allclose(got[key], direct[key], atol=1e-5)
            assert torch.allclose(got["query_outputs"][key], direct["query_outputs"][key], atol=1e-5)
    assert (stage.cache.misses, stage.cache.hits) == (2, 2)
    assert stage.report()["teacher_cache"]["samples"] == 2


# -- the demo's table -----------------------------------------------------------------------------------------
def test_demo_rows_and_goal_checks():
    from vitkd.demos.detection import checks, row

    def run(m, val):
        return {"test/map": m, "test/map50": 2 * m, "best_val/map": val, "params": 10, "gflops": 0.1, "images_per_s": 5}

    rows = {
        "teacher": row("teacher", [run(0.42, 0.4)]),
        "student_scratch": row("student_scratch", [run(0.10, 0.1), run(0.12, 0.1), run(0.14, 0.1)]),
        "student_distilled": row("student_distilled", [run(0.15, 0.2)] * 3),
        "student_shared_query": row("student_shared_query", [run(0.20, 0.1)] * 3),  # better on test, not on val
        "student_data_free": row("student_data_free", [run(0.12, 0.1)] * 3),
    }
    s = rows["student_scratch"]
    assert s["map"] == pytest.approx(0.12) and s["map_std"] == pytest.approx(0.02) and s["map50"] == pytest.approx(0.24)
    c = checks(rows)
    assert c["distilled_chosen_on_val"] == "student_distilled"  # chosen on validation, never on test
    assert c["distilled_minus_scratch"] == pytest.approx(0.03) and c["distilled_at_least_scratch_plus_0.03"]
    assert c["data_free_over_distilled"] == pytest.approx(0.8) and c["teacher_map_at_least_0.40"]


def test_demo_picture(det_teacher, tmp_path):
    """The picture: one row per test image, ground truth + teacher + each student, written atomically."""
    from PIL import Image

    from data_modules.aerial import AerialDataModule
    from vitkd.demos.detection import picture

    data = AerialDataModule(data_dir=str(tmp_path / "d"), num_train=4, num_val=2, num_test=4)
    path = picture(tmp_path / "boxes.png", det_teacher, {"student": det_teacher}, data, n=4)
    with Image.open(path) as im:
        w, h = im.size
    assert h > w  # 4 rows of images over 3 columns
    assert not list(tmp_path.glob(".boxes.png.*"))
