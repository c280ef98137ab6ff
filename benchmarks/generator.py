"""The data-free generator step: the reference-style DAFL loop against vitkd's generator stage through its CLI."""

from __future__ import annotations

import csv
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import PRESETS, rate, timed
from benchmarks.reference import ReferenceDAFL
from vitkd.fit import cli_main
from vitkd.generators import DAFLGenerator
from vitkd.models import create_model

FAST_ARGS = [
    "--model.init_args.synthesizer",
    "fast",
    "--model.init_args.fast_synth_every",
    "5",
    "--model.init_args.fast_inner_steps",
    "2",
    "--model.init_args.lr_g",
    "5e-3",
]


def generator_stage_rate(
    ckpt: Path, teacher_arch: str, extra: list[str], steps: int, batch: int, threads: int
) -> dict[str, float]:
    """The generator stage through the real CLI (``dafl_reference.yaml``) for two epochs of ``steps`` steps;
    the second epoch's training throughput (``perf/images_per_s``: student images, validation excluded)."""
    with tempfile.TemporaryDirectory() as tmp:
        m = cli_main(
            [
                "--config",
                "experiments/generator/dafl_reference.yaml",
                "--run_dir",
                tmp,
                "--model.init_args.teacher_ckpt",
                str(ckpt),
                "--model.init_args.teacher_arch",
                teacher_arch,
                "--model.init_args.batch_size",
                str(batch),
                "--model.init_args.steps_per_epoch",
                str(steps),
                "--model.init_args.val_samples",
                "64",
                "--model.init_args.grid_samples",
                "0",
                "--trainer.max_epochs",
                "2",
                "--torch_threads",
                str(threads),
                "--trainer.enable_progress_bar",
                "false",
                *extra,
            ]
        )
        with open(Path(tmp) / "metrics.csv", newline="") as f:
            rates = [float(r["perf/images_per_s"]) for r in csv.DictReader(f) if r.get("perf/images_per_s")]
    seconds = batch * steps / rates[-1]
    return {
        "distilled_images_per_s": rates[-1],
        "generated_images_per_s": m["generator_steps"] / 2 * batch / seconds,
        "generator_steps_per_epoch": m["generator_steps"] / 2,
    }


def bench_generator(device: torch.device, warmup: int, iters: int, threads: int, quick: bool) -> dict[str, Any]:
    """Generated-and-distilled images per second of the data-free stage at DAFL's reference settings (digits
    presets, DAFL generator width 128): the reference-style loop (``ReferenceDAFL``) against vitkd's stage
    (joint synthesizer) and its fast synthesizer, same models, batch and machine, in this one run."""
    print("data-free generator step ...", flush=True)
    p = PRESETS["digits"]
    batch = 128 if quick else 512
    kw = dict(img_size=p["img_size"], in_chans=p["in_chans"], num_classes=p["num_classes"])
    teacher = create_model(p["teacher"], **kw)
    out: dict[str, Any] = {
        "batch": batch,
        "generator": "dafl width 128, final BN",
        "teacher": p["teacher"],
        "student": p["student"],
    }
    torch.manual_seed(0)
    generator = DAFLGenerator(p["img_size"], p["in_chans"], 100, width=128, final_bn=True)
    ref = ReferenceDAFL(generator, teacher, create_model(p["student"], **kw), batch, 100)
    t = timed(ref.step, device, warmup, iters)
    out["reference"] = {**rate(t, batch), "generated_images_per_s": batch / t["median_s"]}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "teacher.pt"
        torch.save(teacher.state_dict(), ckpt)
        steps = 4 if quick else 8
        out["vitkd_joint"] = generator_stage_rate(ckpt, p["teacher"], [], steps, batch, threads)
        out["vitkd_fast"] = generator_stage_rate(ckpt, p["teacher"], FAST_ARGS, steps * 5 // 2, batch, threads)
    ref_rate = out["reference"]["images_per_s"]
    out["speedup_joint"] = out["vitkd_joint"]["distilled_images_per_s"] / ref_rate
    out["speedup_fast"] = out["vitkd_fast"]["distilled_images_per_s"] / ref_rate
    out["fast_over_joint"] = out["vitkd_fast"]["distilled_images_per_s"] / out["vitkd_joint"]["distilled_images_per_s"]
    return out
