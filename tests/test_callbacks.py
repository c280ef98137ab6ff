"""The default callbacks: attention-probe maps, throughput, selection report; where their images go."""

import csv
import json
import shutil
from collections import Counter
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image

from callbacks import AttentionProbeLogger, SelectionReport
from callbacks._images import log_image
from callbacks.attention_maps import probe_maps
from callbacks.throughput import images_in
from tests.conftest import fit
from vitkd.errors import VitkdInputError
from vitkd.models import create_model
from vitkd.models.probe import unfused_attention
from vitkd.selection.outputs import SelectionTallies
from vitkd.selection.result import SelectionResult


def _png(path) -> np.ndarray:
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_probe_maps_are_the_cls_row_of_the_attention_and_leave_no_hooks():
    torch.manual_seed(0)
    model = create_model("test_vit_patch4_16").train()
    captured = {}
    hook = model.blocks[1].attn.register_forward_pre_hook(lambda m, inp: captured.__setitem__(1, inp[0]))
    x = torch.randn(2, 1, 16, 16)
    maps = probe_maps(model, x, [1])
    hook.remove()
    full = unfused_attention(model.blocks[1].attn, captured[1])[:, :, 0, model.num_prefix_tokens :].mean(1)
    assert maps[1].shape == (2, 4, 4) and torch.allclose(maps[1].reshape(2, -1), full, atol=1e-5)
    assert model.training, "the training mode is restored"
    assert not model.blocks[1].attn.qkv._forward_hooks, "the probe hooks are removed after the forward"


def test_probe_logger_schedule_every_n_and_last_epoch():
    cb = AttentionProbeLogger(every_n_epochs=2)
    due = [cb.due(SimpleNamespace(current_epoch=e, max_epochs=5, should_stop=False)) for e in range(5)]
    assert due == [False, True, False, True, True]
    assert not AttentionProbeLogger(every_n_epochs=0).due(
        SimpleNamespace(current_epoch=4, max_epochs=5, should_stop=False)
    )


def test_probe_logger_refuses_a_block_beyond_the_depth_at_fit_start():
    module = SimpleNamespace(model=create_model("test_vit_patch4_16"))
    with pytest.raises(VitkdInputError, match="beyond the model depth 2"):
        AttentionProbeLogger(blocks=[5]).on_fit_start(SimpleNamespace(is_global_zero=True), module)


def test_images_in_a_batch():
    module = SimpleNamespace(hparams={"batch_size": 7})
    x = torch.zeros(5, 1, 16, 16)
    assert images_in((x, torch.zeros(5)), module) == 5
    assert images_in({"image": x, "key": ["a"] * 5}, module) == 5
    assert images_in(torch.zeros(1), module) == 7, "stages that generate their images count their batch_size"


def test_image_goes_to_tensorboard_when_it_is_on(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = TensorBoardLogger(str(tmp_path), name="tb", version="")
    image = (np.random.default_rng(0).random((40, 60, 3)) * 255).astype(np.uint8)
    assert log_image(SimpleNamespace(loggers=[tb]), "probe_maps", image, step=3)
    tb.experiment.flush()
    acc = EventAccumulator(str(tmp_path / "tb")).Reload()
    (event,) = acc.Images("probe_maps")
    assert (event.step, event.width, event.height) == (3, 60, 40)
    assert not log_image(SimpleNamespace(loggers=[]), "probe_maps", image, step=3), (
        "no image logger: the caller writes a PNG"
    )


KD = [
    "--config",
    "experiments/digits/kd_original.yaml",
    "--model.init_args.arch",
    "test_vit_patch4_16",
    "--model.init_args.measure_batch_size",
    "0",
    "--trainer.limit_train_batches",
    "2",
    "--trainer.limit_val_batches",
    "1",
    "--trainer.limit_test_batches",
    "1",
]


def test_probe_maps_teacher_beside_student_configured_from_the_cli(tiny_teacher, tmp_path):
    fit(
        *KD,
        "--model.init_args.teacher_ckpt",
        str(tiny_teacher),
        "--trainer.max_epochs",
        "2",
        "--trainer.callbacks+=callbacks.AttentionProbeLogger",
        "--trainer.callbacks.every_n_epochs",
        "1",
        "--trainer.callbacks.blocks",
        "[-1]",
        "--trainer.callbacks.num_images",
        "3",
        "--run_dir",
        str(tmp_path / "one"),
    )
    one = [_png(tmp_path / "one" / "probe_maps" / f"epoch{e:03d}.png") for e in (0, 1)]
    # default: every 5 epochs and the last one, middle and last block of each network, 4 images
    fit(
        *KD,
        "--model.init_args.teacher_ckpt",
        str(tiny_teacher),
        "--trainer.max_epochs",
        "2",
        "--run_dir",
        str(tmp_path / "default"),
    )
    assert sorted(p.name for p in (tmp_path / "default" / "probe_maps").iterdir()) == ["epoch001.png"]
    default = _png(tmp_path / "default" / "probe_maps" / "epoch001.png")
    # columns: image | teacher blocks | student blocks → 3 columns for one block, 5 for two; rows = images
    assert one[0].shape == one[1].shape
    assert abs(default.shape[1] / one[0].shape[1] - 5 / 3) < 0.1
    assert abs((default.shape[0] - 40) / (one[0].shape[0] - 40) - 4 / 3) < 0.1
    # below the title: the image and the frozen teacher's maps stay, the trained student's maps change
    w = one[0].shape[1]
    diff = np.abs(one[0].astype(int) - one[1].astype(int)).sum(-1)[45:]
    assert diff[:, : 2 * w // 3 - 5].max() == 0 and diff[:, 2 * w // 3 + 5 :].mean() > 1
    assert default.std() > 20, "the grid is not blank"


def test_probe_maps_switched_off_and_throughput_logged(tiny_teacher, tmp_path):
    fit(
        *KD,
        "--model.init_args.teacher_ckpt",
        str(tiny_teacher),
        "--trainer.max_epochs",
        "1",
        "--trainer.callbacks+=callbacks.AttentionProbeLogger",
        "--trainer.callbacks.every_n_epochs",
        "0",
        "--run_dir",
        str(tmp_path),
    )
    assert not (tmp_path / "probe_maps").exists()
    rows = [r for r in csv.DictReader(open(tmp_path / "metrics.csv")) if r.get("perf/images_per_s")]
    assert len(rows) == 1, "one throughput figure per epoch"
    assert float(rows[0]["perf/images_per_s"]) > 0 and float(rows[0]["perf/peak_mem_mb"]) > 10


class Handed(pl.Callback):
    """Keeps what the selector hands its callbacks."""

    def on_selection_end(self, trainer, pl_module, result):
        self.result = result


def handed_from_csv(path, positive_sources) -> SelectionResult:
    """The ``SelectionResult`` a selector writing ``path`` (a scores.csv) would hand over."""
    rows = list(csv.DictReader(open(path)))
    selected = np.array([r["selected"] == "1" for r in rows])
    src = [r["src"] for r in rows]
    names = [c for c in rows[0] if c not in ("key", "pred", "selected", "src", "cls")]
    tallies = SelectionTallies(
        scored=Counter(src),
        kept=Counter(s for s, k in zip(src, selected) if k),
        selected=selected,
        columns={c: np.array([float(r[c]) for r in rows], dtype=np.float32) for c in names},
    )
    return SelectionResult(path.parent, tuple(positive_sources), tallies)


def test_selection_report_from_a_selection(tiny_teacher, tiny_pool, tmp_path):
    from data_modules import DigitsDataModule
    from vitkd.stages import AttentionProbeSelector

    stage = AttentionProbeSelector(
        teacher_ckpt=str(tiny_teacher), num_keep=30, probe_blocks=[0, 1], lambda_a=[0.05, 0.05]
    )
    dm = DigitsDataModule(img_size=16, eval_batch_size=32, wild_urls=tiny_pool)
    report, handed = SelectionReport(per_group=20, embedding="tsne"), Handed()
    trainer = pl.Trainer(
        logger=False,
        default_root_dir=str(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[report, handed],
    )
    metrics = stage.execute(trainer, dm)
    assert (tmp_path / "report" / "selection.json").is_file(), (
        "the selector calls on_selection_end once its outputs exist"
    )
    first = json.loads((tmp_path / "report" / "selection.json").read_text())
    rows = list(csv.DictReader(open(tmp_path / "scores.csv")))
    # the report reads nothing back: the same report without the selection's files on disk
    shutil.rmtree(tmp_path / "selected")
    (tmp_path / "scores.csv").unlink()
    summary = report.on_selection_end(trainer, stage, handed.result)

    written = json.loads((tmp_path / "report" / "selection.json").read_text())
    assert written == first
    assert written == json.loads(json.dumps(summary))
    for src in ("digit", "noise"):
        scored = sum(r["src"] == src for r in rows)
        kept = sum(r["src"] == src and r["selected"] == "1" for r in rows)
        assert written["by_source"][src]["scored"] == scored and written["by_source"][src]["kept"] == kept
    assert written["num_kept"] == 30
    for key in (
        "precision",
        "recall",
        "precision_max",
        "precision_random",
    ):  # the figures of metrics.json, one computation
        assert written[key] == metrics[key], key
    assert 0 < written["precision"] <= written["precision_max"] <= 1
    kept_values = [float(r["value"]) for r in rows if r["selected"] == "1"]
    assert written["scores"]["value"]["kept_mean"] == pytest.approx(np.mean(kept_values), rel=1e-5)
    assert written["embedding"]["points"] == {"kept": 20, "rejected": 20, "original": 20}
    for name in ("scores", "sources", "embedding"):
        img = _png(tmp_path / "report" / f"{name}.png")
        assert img.shape[0] > 250 and img.shape[1] > 400 and img.std() > 10


def test_selection_report_names_no_precision_without_positive_sources(tmp_path):
    """Tagged pool, no positive source named (the paper configs): per-source counts, but no precision of 0."""
    with open(tmp_path / "scores.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["key", "vn", "value", "pred", "selected", "src"])
        for i in range(40):
            w.writerow([f"k{i}", 0.1, 0.1 * i, 0, int(i < 10), "a" if i % 4 else "b"])
    for positives, expect in (([], None), (["b"], 3 / 10)):
        module = SimpleNamespace(hparams={"positive_sources": positives})
        summary = SelectionReport(per_group=0).on_selection_end(
            SimpleNamespace(loggers=[], global_step=0), module, handed_from_csv(tmp_path / "scores.csv", positives)
        )
        assert summary["by_source"]["b"] == {
            "scored": 10,
            "kept": 3,
            "keep_rate": 0.3,
            "share_of_kept": 0.3,
            "positive": expect is not None,
        }
        assert summary.get("precision") == expect
        if expect is not None:
            assert summary["recall"] == 0.3 and summary["precision_max"] == 1.0 and summary["precision_random"] == 0.25
        assert (tmp_path / "report" / "sources.png").is_file()


def test_selection_report_without_source_tags(tmp_path):
    rng = np.random.default_rng(0)
    with open(tmp_path / "scores.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["key", "va_blk3", "va_blk7", "vn", "value", "pred", "selected", "src"])
        for i in range(500):
            w.writerow([f"k{i}", *rng.random(4).round(5), int(rng.integers(10)), int(i % 5 == 0), ""])
    module = SimpleNamespace(hparams={"positive_sources": ["digit"]})
    summary = SelectionReport(per_group=0).on_selection_end(
        SimpleNamespace(loggers=[], global_step=0), module, handed_from_csv(tmp_path / "scores.csv", ["digit"])
    )
    assert (
        summary["num_scored"] == 500
        and summary["num_kept"] == 100
        and "by_source" not in summary
        and "precision" not in summary
    )
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["scores.png", "selection.json"]
    img = _png(tmp_path / "report" / "scores.png")
    assert img.shape[1] > 4 * img.shape[0] // 2, "four panels side by side (two va columns, vn, value)"
