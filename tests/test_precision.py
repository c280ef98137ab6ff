"""Every stage runs under bf16-mixed and 16-mixed (fp16 autocast) through the CLI with finite losses and
metrics, and gets the default callbacks (probe maps, throughput) in both.

Lightning maps ``--trainer.precision 16-mixed`` to bf16-mixed on a CPU (with a warning); real fp16 autocast
on a CPU is asked for with the ``MixedPrecision`` plugin, which is what the 16-mixed runs here use.
"""

import csv
import json
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from tests.conftest import fit


class DtypeSpy(Callback):
    """Writes the dtypes of the trained model's logits inside training steps (autocast's dtype) to
    ``RUN_DIR/dtypes.txt`` (a file: the CLI imports this module under another name than pytest does)."""

    def on_train_start(self, trainer, pl_module):
        self.seen, self.in_step = set(), False
        head = pl_module.model.vit.head if hasattr(pl_module.model, "vit") else pl_module.model.head
        self._h = head.register_forward_hook(
            lambda _m, _i, out: self.seen.add(str(out.dtype)) if self.in_step else None
        )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.in_step = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.in_step = False

    def on_train_end(self, trainer, pl_module):
        self._h.remove()
        (Path(trainer.default_root_dir) / "dtypes.txt").write_text("\n".join(sorted(self.seen)))


PRECISIONS = {
    "bf16-mixed": (["--trainer.precision", "bf16-mixed"], torch.bfloat16),
    "16-mixed": (
        [
            "--trainer.precision",
            "null",
            "--trainer.plugins+=lightning.pytorch.plugins.precision.MixedPrecision",
            "--trainer.plugins.precision",
            "16-mixed",
            "--trainer.plugins.device",
            "cuda" if torch.cuda.is_available() else "cpu",
        ],
        torch.float16,
    ),
}
SHORT = [
    "--trainer.max_epochs",
    "1",
    "--trainer.limit_train_batches",
    "2",
    "--trainer.limit_val_batches",
    "1",
    "--trainer.limit_test_batches",
    "1",
    "--trainer.log_every_n_steps",
    "1",
]


def stage_args(stage: str, teacher, pool) -> list[str]:
    t = ["--model.init_args.teacher_ckpt", str(teacher)]
    if stage == "classifier":
        return [
            "--config",
            "experiments/digits/teacher.yaml",
            "--model.init_args.arch",
            "test_vit_patch4_16",
            "--model.init_args.measure_batch_size",
            "0",
            *SHORT,
        ]
    if stage == "probe_distillation":  # CE through Q + L_P + L_KD, on original images (pseudo-labels from the teacher)
        return [
            "--config",
            "experiments/digits/attention_probe.yaml",
            "--model.init_args.arch",
            "test_vit_patch4_16",
            *t,
            "--model.init_args.probe_pairs",
            "[[0, 0], [1, 1]]",
            "--data.init_args.train_urls",
            "null",
            "--model.init_args.measure_batch_size",
            "0",
            *SHORT,
        ]
    if stage == "generator":
        return [
            "--config",
            "experiments/generator/transformer_gan.yaml",
            "--model.init_args.arch",
            "test_vit_patch4_16",
            *t,
            "--model.init_args.generator_kwargs",
            "{patch_size: 4, embed_dim: 16, depth: 1, num_heads: 2}",
            "--model.init_args.batch_size",
            "8",
            "--model.init_args.steps_per_epoch",
            "2",
            "--model.init_args.val_samples",
            "16",
            "--model.init_args.grid_samples",
            "0",
            "--model.init_args.probe_blocks",
            "[0, 1]",
            "--model.init_args.patch_pairs",
            "[[0, 0], [1, 1]]",
            "--trainer.max_epochs",
            "1",
            "--trainer.log_every_n_steps",
            "1",
            "--trainer.limit_test_batches",
            "1",
        ]
    if stage == "idlevit":
        return [
            "--config",
            "experiments/efficient/idlevit.yaml",
            *t,
            "--model.init_args.measure_batch_size",
            "0",
            *SHORT,
        ]
    if stage == "selector":
        return [
            "--config",
            "experiments/digits/select.yaml",
            *t,
            "--model.init_args.probe_blocks",
            "[0, 1]",
            "--model.init_args.num_keep",
            "20",
            "--data.init_args.wild_urls",
            pool,
            "--data.init_args.eval_batch_size",
            "40",
        ]
    raise AssertionError(stage)


def logged_values(run) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for row in csv.DictReader(open(run / "metrics.csv")):
        for k, v in row.items():
            if v and k not in ("epoch", "step"):
                out.setdefault(k, []).append(float(v))
    return out


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("stage", ["classifier", "probe_distillation", "generator", "idlevit", "selector"])
def test_stage_runs_under_mixed_precision(stage, precision, tiny_teacher, tiny_pool, tmp_path):
    flags, dtype = PRECISIONS[precision]
    spy = [] if stage == "selector" else ["--trainer.callbacks+=tests.test_precision.DtypeSpy"]
    m = fit(*stage_args(stage, tiny_teacher, tiny_pool), *flags, *spy, "--run_dir", str(tmp_path))
    assert json.loads((tmp_path / "metrics.json").read_text())["run_dir"] == str(tmp_path)
    if stage == "selector":
        rows = list(csv.DictReader(open(tmp_path / "scores.csv")))
        assert len(rows) == 120 and m["num_kept"] == 20
        assert all(math.isfinite(float(r[c])) for r in rows for c in ("va_blk0", "va_blk1", "vn", "value"))
        return
    assert (tmp_path / "dtypes.txt").read_text().split() == [str(dtype)], (
        f"the training step ran under {dtype} autocast"
    )
    assert math.isfinite(m["test/acc"]) and 0.0 <= m["test/acc"] <= 1.0
    logged = logged_values(tmp_path)
    losses = {k: v for k, v in logged.items() if k.startswith("train/")}
    assert losses and all(math.isfinite(x) for v in losses.values() for x in v), losses
    # the default callbacks of a training stage: throughput per epoch and the probe maps after the last epoch
    assert logged["perf/images_per_s"][0] > 0 and logged["perf/peak_mem_mb"][0] > 0
    assert (tmp_path / "probe_maps" / "epoch000.png").is_file()


def test_16_mixed_on_cpu_is_mapped_to_bf16_by_lightning():
    """What ``--trainer.precision 16-mixed`` gives on a CPU: Lightning's bf16 autocast (fp16 needs the plugin)."""
    trainer = pl.Trainer(
        accelerator="cpu", precision="16-mixed", logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    assert trainer.precision == "bf16-mixed"
