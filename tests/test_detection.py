"""Detection (issue 5): box ops, matcher, criterion, COCO evaluation, data errors, and each stage through the CLI."""
from __future__ import annotations

import itertools
import csv
import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import fit
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
    (rows, cols), = matcher({"pred_logits": logits, "pred_boxes": boxes}, [tgt])
    cost = matcher.cost_matrix(logits[0], boxes[0], tgt["labels"], tgt["boxes"])
    assert len(rows) == t and sorted(cols.tolist()) == list(range(t))
    best = min(sum(cost[p[j], j].item() for j in range(t)) for p in itertools.permutations(range(q), t))
    assert cost[rows, cols].sum().item() == pytest.approx(best, abs=1e-5)


def test_matcher_and_criterion_fp32_under_autocast():
    g = torch.Generator().manual_seed(0)
    outputs = {"pred_logits": torch.randn(2, 6, 4, generator=g).bfloat16(), "pred_boxes": random_boxes(g, 12).view(2, 6, 4).bfloat16()}
    targets = [{"labels": torch.tensor([0, 2]), "boxes": random_boxes(g, 2)}, {"labels": torch.tensor([1]), "boxes": random_boxes(g, 1)}]
    crit = SetCriterion(3, HungarianMatcher())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = crit(outputs, targets)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in terms.values())


# -- criterion ----------------------------------------------------------------------------------------
def test_criterion_zero_on_perfect_predictions():
    g = torch.Generator().manual_seed(1)
    k, q = 3, 6
    targets = [{"labels": torch.tensor([0, 2, 1]), "boxes": random_boxes(g, 3)}, {"labels": torch.tensor([2]), "boxes": random_boxes(g, 1)}]
    logits = torch.full((2, q, k + 1), -30.0)
    logits[..., k] = 30.0  # every query says "no object" …
    boxes = random_boxes(g, 2 * q).view(2, q, 4)
    for i, t in enumerate(targets):  # … except one per target, right class and box (in shuffled slots)
        slots = torch.randperm(q, generator=g)[: len(t["labels"])]
        logits[i, slots] = -30.0
        logits[i, slots, t["labels"]] = 30.0
        boxes[i, slots] = t["boxes"]
    out = {"pred_logits": logits, "pred_boxes": boxes, "aux_outputs": [{"pred_logits": logits.clone(), "pred_boxes": boxes.clone()}]}
    terms = SetCriterion(k, HungarianMatcher())(out, targets)
    assert set(terms) == {"ce", "bbox", "giou", "ce_aux0", "bbox_aux0", "giou_aux0"}
    assert all(v.item() < 1e-5 for v in terms.values())
    out["pred_boxes"] = out["pred_boxes"] + 0.05  # and clearly not 0 when the boxes are off
    assert SetCriterion(k, HungarianMatcher())(out, targets)["bbox"].item() > 0.1


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
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0} for a in gt["annotations"]]
    assert coco_map(gt, dets) == {"map": pytest.approx(1.0), "map50": pytest.approx(1.0)}
    shifted = [{**d, "bbox": [d["bbox"][0] + 6, *d["bbox"][1:]]} for d in dets]
    assert coco_map(gt, shifted)["map"] < 0.5
    metric = detection_map()
    boxes = torch.tensor([[4.0, 4, 14, 14], [30, 20, 38, 32]])
    metric.update([{"boxes": boxes, "scores": torch.ones(2), "labels": torch.tensor([0, 1])}], [{"boxes": boxes, "labels": torch.tensor([0, 1])}])
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
    dm = CocoDataModule(train_images=str(tmp_path / "img"), train_json=str(ann), val_images=str(tmp_path / "img"), val_json=str(ann))
    with pytest.raises(VitkdInputError, match=r"image id 2 file '2.png' not found") as err:
        dm.setup("fit")
    assert "\n" not in str(err.value)


def test_coco_train_json_is_read_once(tmp_path, monkeypatch):
    import data_modules.coco as coco_mod

    ann = write_set(tmp_path, small_coco())
    reads = []
    real = coco_mod.load_json
    monkeypatch.setattr(coco_mod, "load_json", lambda f: reads.append(str(f)) or real(f))
    dm = coco_mod.CocoDataModule(train_images=str(tmp_path / "img"), train_json=str(ann), val_images=str(tmp_path / "img"), val_json=str(ann))
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
        assert torch.allclose(xs, xc) and torch.equal(ts["labels"], tc["labels"]) and torch.allclose(ts["boxes"], tc["boxes"])


def test_shard_box_outside_image_names_the_sample(tmp_path):
    import io

    from data_modules.coco import DetectionShards
    from data_modules.shards import write_shards

    buf = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buf, format="PNG")
    meta = {"width": 32, "height": 32, "annotations": [{"bbox": [20, 20, 20, 5], "category_id": 0}]}
    write_shards([{"__key__": "bad0001", "png": buf.getvalue(), "json": json.dumps(meta)}], tmp_path / "s", pattern="det-%06d.tar")
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
TINY = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
        "--trainer.limit_test_batches", "1", "--model.init_args.arch", "detr_test", "--model.init_args.measure_batch_size", "4",
        "--data.init_args.num_train", "16", "--data.init_args.num_val", "8", "--data.init_args.num_test", "8",
        "--data.init_args.batch_size", "4", "--trainer.callbacks+=callbacks.AttentionProbeLogger", "--trainer.callbacks.every_n_epochs", "0"]


@pytest.fixture(scope="module")
def det_teacher(tmp_path_factory) -> Path:
    data, run = tmp_path_factory.mktemp("aerial"), tmp_path_factory.mktemp("det_teacher")
    metrics = fit("--config", "experiments/detection/teacher.yaml", *TINY, "--data.init_args.data_dir", str(data), "--run_dir", str(run))
    for key in ("test/map", "test/map50", "params", "gflops", "images_per_s"):
        assert math.isfinite(metrics[key])
    assert 0.0 <= metrics["test/map"] <= 1.0 and metrics["params"] > 0 and metrics["gflops"] > 0
    assert json.loads((run / "metrics.json").read_text())["test/map"] == metrics["test/map"]
    return run / "checkpoints" / "best.ckpt"


def test_teacher_stage_through_cli(det_teacher):
    assert det_teacher.is_file()


def test_student_scratch_stage_through_cli(tmp_path):
    m = fit("--config", "experiments/detection/student_scratch.yaml", *TINY, "--data.init_args.data_dir", str(tmp_path / "d"), "--run_dir", str(tmp_path / "r"))
    assert {"test/map", "test/map50", "params", "gflops", "images_per_s"} <= set(m)


@pytest.mark.parametrize("label_source", ["data", "teacher"])
def test_distill_stage_through_cli(det_teacher, tmp_path, label_source):
    run = tmp_path / "r"
    m = fit("--config", "experiments/detection/distill.yaml", *TINY, "--data.init_args.data_dir", str(tmp_path / "d"),
            "--model.init_args.teacher_ckpt", str(det_teacher), "--model.init_args.label_source", label_source,
            "--model.init_args.pseudo_threshold", "0.0", "--model.init_args.probe_weight", "0.5", "--run_dir", str(run))
    assert 0.0 <= m["test/map"] <= 1.0
    state = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert state and not any(k.startswith("teacher.") for k in state)  # the teacher stays out of the student's checkpoint


def test_distill_terms_switch_off_and_log(det_teacher):
    from vitkd.detection.stages import DetrDistillation

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
        fit("--config", "experiments/detection/distill.yaml", *TINY, "--data.init_args.data_dir", str(tmp_path / "d"),
            "--model.init_args.teacher_ckpt", str(tmp_path / "none.ckpt"), "--run_dir", str(tmp_path / "r"))


def test_detr_presets_and_outputs():
    from vitkd.detection.detr import DETR_PRESETS, create_detr

    teacher, student = (create_detr(n, num_classes=4) for n in ("detr_aerial_teacher", "detr_aerial_student"))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
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
    args = (["--trainer.precision", "bf16-mixed"] if precision == "bf16-mixed" else
            ["--trainer.precision", "null", "--trainer.plugins+=lightning.pytorch.plugins.precision.MixedPrecision",
             "--trainer.plugins.precision", "16-mixed", "--trainer.plugins.device", "cpu"])
    m = fit("--config", "experiments/detection/distill.yaml", *TINY, *args, "--trainer.log_every_n_steps", "1",
            "--data.init_args.data_dir", str(tmp_path / "d"), "--model.init_args.teacher_ckpt", str(det_teacher), "--run_dir", str(tmp_path / "r"))
    assert all(math.isfinite(m[k]) for k in ("test/map", "test/map50", "images_per_s"))
    logged = [float(v) for row in csv.DictReader(open(tmp_path / "r" / "metrics.csv")) for k, v in row.items() if k.startswith("train/") and v]
    assert logged and all(math.isfinite(v) for v in logged)
