"""Each stage once through the CLI on tiny settings, and the run-directory contract."""

import csv
import json

import pytest
import webdataset as wds
import yaml

from tests.conftest import fit


def test_teacher_run_directory(tiny_teacher):
    run = tiny_teacher.parent.parent
    assert (run / "checkpoints" / "best.ckpt").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["test/acc"] <= 1.0 and metrics["params"] > 0
    # cost figures of the trained model: both FLOP conventions and a measured throughput
    assert metrics["gflops"] > 0 and metrics["macs_linear"] > 0 and metrics["images_per_s"] > 0
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["model"]["class_path"] == "vitkd.stages.Classifier"
    assert cfg["model"]["init_args"]["arch"] == "test_vit_patch4_16"
    assert not list(run.rglob("*.tmp")), "no temporary files are left behind"


def select(teacher, pool: str, num_keep: int, run_dir, *extra: str) -> dict:
    """The demo's selection config on a handmade pool, probing both blocks of the tiny teacher."""
    return fit(
        "--config",
        "experiments/digits/select.yaml",
        "--model.init_args.teacher_ckpt",
        str(teacher),
        "--model.init_args.probe_blocks",
        "[0, 1]",
        "--model.init_args.num_keep",
        str(num_keep),
        "--data.init_args.wild_urls",
        pool,
        "--run_dir",
        str(run_dir),
        *extra,
    )


def test_selector_keeps_lowest_values(tiny_teacher, tiny_pool, tmp_path):
    m = select(tiny_teacher, tiny_pool, 30, tmp_path, "--data.init_args.eval_batch_size", "32")
    rows = list(csv.DictReader(open(tmp_path / "scores.csv")))
    assert len(rows) == 120 == m["num_scored"]
    assert set(rows[0]) >= {"key", "va_blk0", "va_blk1", "vn", "value", "pred", "selected", "src"}
    by_value = sorted(rows, key=lambda r: float(r["value"]))
    kept = {r["key"] for r in rows if r["selected"] == "1"}
    assert kept == {r["key"] for r in by_value[:30]}
    assert max(float(r["value"]) for r in rows if r["key"] in kept) <= min(
        float(r["value"]) for r in rows if r["key"] not in kept
    )
    # V recomputed from its columns (Eq. 6)
    r = rows[0]
    v = 0.9 * float(r["vn"]) + 0.05 * (float(r["va_blk0"]) + float(r["va_blk1"]))
    assert abs(v - float(r["value"])) < 1e-4
    # selected shards: exactly the kept keys, pseudo-label in cls, src carried along
    samples = list(wds.WebDataset(str(tmp_path / "selected" / "shard-000000.tar"), shardshuffle=False))
    assert {s["__key__"] for s in samples} == kept
    preds = {r["key"]: r["pred"] for r in rows}
    assert all(s["cls"].decode() == preds[s["__key__"]] for s in samples)
    n_digit = sum(s["src"] == b"digit" for s in samples)
    assert m["precision"] == n_digit / 30 and m["num_kept"] == 30
    # the precision's bounds and the score's AUROC, recomputed from scores.csv
    pos = [r["src"] == "digit" for r in rows]
    assert m["precision_max"] == min(1.0, sum(pos) / 30) and m["precision_random"] == sum(pos) / 120
    pairs = [(float(a["value"]), float(b["value"])) for a, p in zip(rows, pos) if p for b, q in zip(rows, pos) if not q]
    auroc = sum((va < vb) + 0.5 * (va == vb) for va, vb in pairs) / len(
        pairs
    )  # P(a digit's V is lower than a non-digit's)
    assert m["value_auroc"] == pytest.approx(auroc, abs=1e-6) == m["score_auroc"]["value"]["all"]
    assert set(m["score_auroc"]) == {"va_blk0", "va_blk1", "vn", "value"}
    assert set(m["score_auroc"]["vn"]) == {"all"} | {r["src"] for r in rows} - {"digit"}
    # the digits' cls: never chosen by, only measures how often the teacher's pseudo-label is right
    # counted: the digits' labels within the teacher's 10 classes; not the noise's "5", not a digit's "12"
    assert {r["cls"] for r in rows if r["src"] == "noise"} == {"", "5"} and sum(r["cls"] == "12" for r in rows) == 1
    labelled = [r for r in rows if r["src"] == "digit" and r["cls"] not in ("", "12")]
    assert len(labelled) == 39 == m["labelled_scored"]
    assert m["teacher_acc_labelled"] == sum(r["cls"] == r["pred"] for r in labelled) / 39
    kept_labelled = [r for r in labelled if r["selected"] == "1"]
    assert m["labelled_kept"] == len(kept_labelled)
    assert m["pseudo_label_acc"] == sum(r["cls"] == r["pred"] for r in kept_labelled) / len(kept_labelled)
    assert json.loads((tmp_path / "metrics.json").read_text())["num_kept"] == 30


def test_random_strategy_keeps_a_seeded_subset(tiny_teacher, tiny_pool, tmp_path):
    """The random-wild baseline: num_keep samples drawn by the seed, whatever their V."""
    runs = {
        name: select(
            tiny_teacher,
            tiny_pool,
            30,
            tmp_path / name,
            "--model.init_args.strategy",
            "random",
            "--model.init_args.seed",
            seed,
        )
        for name, seed in (("a", "0"), ("b", "0"), ("c", "1"))
    }
    kept = {
        name: {r["key"] for r in csv.DictReader(open(tmp_path / name / "scores.csv")) if r["selected"] == "1"}
        for name in runs
    }
    assert len(kept["a"]) == 30 and kept["a"] == kept["b"] != kept["c"]
    rows = list(csv.DictReader(open(tmp_path / "a" / "scores.csv")))
    lowest = {r["key"] for r in sorted(rows, key=lambda r: float(r["value"]))[:30]}
    assert kept["a"] != lowest  # not the value strategy's choice
    m = runs["a"]
    assert (
        m["strategy"] == "random"
        and m["precision"] == sum(r["src"] == "digit" for r in rows if r["key"] in kept["a"]) / 30
    )
    assert "value_auroc" not in m and set(m["score_auroc"]) == {
        "va_blk0",
        "va_blk1",
        "vn",
        "value",
    }  # V scored, not used


def test_student_on_selected_shards(tiny_teacher, tiny_pool, tmp_path):
    sel = select(tiny_teacher, tiny_pool, 60, tmp_path / "sel")
    m = fit(
        "--config",
        "experiments/digits/attention_probe.yaml",
        "--model.init_args.arch",
        "test_vit_patch4_16",
        "--model.init_args.teacher_ckpt",
        str(tiny_teacher),
        "--model.init_args.probe_pairs",
        "[[0, 0], [1, 1]]",
        "--data.init_args.train_urls",
        sel["selected_urls"],
        "--data.init_args.val_fraction",
        "0.2",
        "--trainer.max_epochs",
        "1",
        "--trainer.log_every_n_steps",
        "1",
        "--run_dir",
        str(tmp_path / "student"),
    )
    assert 0.0 <= m["test/acc"] <= 1.0 and "q_diagonal" in m
    log = list(csv.DictReader(open(tmp_path / "student" / "metrics.csv")))
    logged = {k for row in log for k, v in row.items() if v}
    assert {"train/ce", "train/probe", "train/kd", "val/acc"} <= logged
    # the frozen teacher is not stored in the student's checkpoint
    import torch

    state = torch.load(tmp_path / "student" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert state and not any(k.startswith("teacher.") for k in state)


def test_kd_original_and_scratch_baselines(tiny_teacher, tmp_path):
    m = fit(
        "--config",
        "experiments/digits/kd_original.yaml",
        "--model.init_args.arch",
        "test_vit_patch4_16",
        "--model.init_args.teacher_ckpt",
        str(tiny_teacher),
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "3",
        "--run_dir",
        str(tmp_path / "kd"),
    )
    assert "test/acc" in m
    m = fit(
        "--config",
        "experiments/digits/scratch.yaml",
        "--model.init_args.arch",
        "test_vit_patch4_16",
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "3",
        "--run_dir",
        str(tmp_path / "scratch"),
    )
    assert "test/acc" in m


@pytest.mark.parametrize("label_source", ["data", "teacher"])
def test_label_source_sets_the_ce_target(tiny_teacher, label_source):
    """KD on the original data takes the batch's labels as the CE target (Eq. 9 with ŷ = y); the data-free
    students take the teacher's argmax. Q off, α = β = 0: the loss is the plain CE, computed here by hand."""
    import torch
    import torch.nn.functional as F

    from vitkd.stages import ProbeDistillation, ProbeLossWeights

    torch.manual_seed(0)
    stage = ProbeDistillation(
        arch="test_vit_patch4_16",
        teacher_ckpt=str(tiny_teacher),
        label_source=label_source,
        noisy_adaptation=False,
        loss_weights=ProbeLossWeights(alpha=0.0, beta=0.0),
        probe_pairs=[(0, 0)],
    )
    x = torch.randn(6, 1, 16, 16)
    with torch.no_grad():
        t_pred = stage.teacher(x).argmax(dim=1)
        s_logits = stage.model(x).float()
    y = (t_pred + 1) % 10  # never the teacher's label
    want = F.cross_entropy(s_logits, y if label_source == "data" else t_pred)
    other = F.cross_entropy(s_logits, t_pred if label_source == "data" else y)
    got = stage.losses(x, y)
    assert set(got) == {"ce"} and got["ce"].item() == pytest.approx(want.item(), rel=1e-5)
    assert abs(want.item() - other.item()) > 1e-3, "the two targets give different losses"


def test_resume_from_checkpoint(tiny_teacher, tmp_path):
    m = fit(
        "--config",
        "experiments/digits/teacher.yaml",
        "--model.init_args.arch",
        "test_vit_patch4_16",
        "--trainer.max_epochs",
        "2",
        "--trainer.limit_train_batches",
        "2",
        "--ckpt_path",
        str(tiny_teacher.parent / "last.ckpt"),
        "--run_dir",
        str(tmp_path),
    )
    assert m["epochs"] == 2
    # the checkpoint's epoch is not trained again: only the second epoch's 2 batches ran here (4 if it started afresh)
    assert m["train_batches_per_rank"] == [2]
    steps = [int(r["step"]) for r in csv.DictReader(open(tmp_path / "metrics.csv")) if r.get("train/loss")]
    assert steps and min(steps) >= 4, "the log continues after the checkpoint's 4 steps"
