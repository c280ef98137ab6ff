"""``make generator-sweep``: DAFL at its reference settings over generator-step budgets, with a CNN-teacher control.

Tells budget from bug. Every point is ``experiments/generator/dafl_reference.yaml`` (the authors' MNIST
settings: width 128 + final BN, batch 512, Adam lr 0.2 for G, Adam 2e-3 and KL at T = 1 for the student)
at ``--epochs`` × 120 generator steps, from the digits ViT teacher (``runs/demo/teacher``) and from a
LeNet-5 teacher trained on the same digits (``experiments/generator/cnn_teacher.yaml``), with the same
ViT student. Per point: test accuracy of the checkpoint chosen on ``val/agree``, and the validation curves
with the generator's batch norms in train mode (``val/agree``) and in eval mode (``val/agree_eval``).

Runs live in ``runs/generator-sweep/<teacher>_<epochs>ep/seed<k>``; a point whose ``metrics.json`` exists is
read, not rerun. Writes ``runs/generator-sweep/summary.json`` and
``benchmarks/results/generator-sweep/<machine>-<date>.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import re
import time
from pathlib import Path

from vitkd.demos import tables
from vitkd.demos.runs import machine, mean_std, results_file, run_fit
from vitkd.errors import OneLineParser, demo_main
from vitkd.io import write_json

CONFIG = "experiments/generator/dafl_reference.yaml"
STEPS_PER_EPOCH = 120  # the reference's iterations per epoch
TEACHERS = {
    "vit": ("runs/demo/teacher", "experiments/digits/teacher.yaml"),
    "cnn": ("runs/generator-sweep/cnn_teacher", "experiments/generator/cnn_teacher.yaml"),
}
DEFAULT_POINTS = ["vit:2:0", "vit:2:1", "vit:2:2", "vit:20:0", "cnn:2:0", "cnn:10:0"]


def curves(run_dir: Path) -> dict[str, list[float]]:
    """Per-epoch validation figures of a run, from its ``metrics.csv``."""
    out: dict[str, list[float]] = {"val/agree": [], "val/agree_eval": []}
    with open(run_dir / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            for k in out:
                if row.get(k):
                    out[k].append(float(row[k]))
    return out


def point(teacher: str, epochs: int, seed: int, root: Path, threads: int) -> dict:
    run_dir = root / f"{teacher}_{epochs}ep" / f"seed{seed}"
    ckpt = Path(TEACHERS[teacher][0]) / "checkpoints" / "best.ckpt"
    wall_file = run_dir.parent / f"seed{seed}.wall.json"
    if not (run_dir / "metrics.json").is_file():
        t0 = time.time()
        run_fit(
            CONFIG,
            run_dir,
            "--model.init_args.teacher_ckpt",
            str(ckpt),
            "--trainer.max_epochs",
            str(epochs),
            "--seed_everything",
            str(seed),
            "--torch_threads",
            str(threads),
            show=("test/acc", "best_val/agree"),
        )
        write_json(wall_file, {"wall_s": time.time() - t0})
    m = json.loads((run_dir / "metrics.json").read_text())
    c = curves(run_dir)
    wall = json.loads(wall_file.read_text())["wall_s"] if wall_file.is_file() else None
    steps = epochs * STEPS_PER_EPOCH  # trained (runs before the counter kept the totals reported the best checkpoint's)
    return {
        "teacher": teacher,
        "epochs": epochs,
        "generator_steps": steps,
        "seed": seed,
        "test_acc": m["test/acc"],
        "best_val_agree": m.get("best_val/agree"),
        "val_agree_train_mode": c["val/agree"],
        "val_agree_eval_mode": c["val/agree_eval"],
        "final_val_agree_train_mode": c["val/agree"][-1] if c["val/agree"] else None,
        "final_val_agree_eval_mode": c["val/agree_eval"][-1] if c["val/agree_eval"] else None,
        "wall_s": wall,
        "s_per_generator_step": wall / steps if wall else None,
        "run_dir": str(run_dir),
    }


def ensure_teacher(name: str, threads: int) -> dict:
    run_dir, config = (Path(p) for p in TEACHERS[name])
    if not (run_dir / "metrics.json").is_file():
        run_fit(config, run_dir, "--torch_threads", str(threads), show=("test/acc",))
    m = json.loads((run_dir / "metrics.json").read_text())
    return {
        "arch": m.get("arch"),
        "test_acc": m["test/acc"],
        "val_acc": m.get("best_val/acc"),
        "params": m.get("params"),
    }


def grouped(points: list[dict]) -> list[dict]:
    rows = {}
    for p in points:
        rows.setdefault((p["teacher"], p["generator_steps"]), []).append(p)
    out = []
    for (teacher, steps), ps in sorted(rows.items()):
        mean, std = mean_std([p["test_acc"] for p in ps])
        out.append(
            {
                "teacher": teacher,
                "generator_steps": steps,
                "seeds": len(ps),
                "test_acc_mean": mean,
                "test_acc_std": std,
                "final_val_agree_train_mode": mean_std([p["final_val_agree_train_mode"] for p in ps])[0],
                "final_val_agree_eval_mode": mean_std([p["final_val_agree_eval_mode"] for p in ps])[0],
                "s_per_generator_step": mean_std(
                    [p["s_per_generator_step"] for p in ps if p["s_per_generator_step"]] or [0.0]
                )[0],
            }
        )
    return out


def markdown(rows: list[dict], teachers: dict) -> str:
    """The sweep as the Markdown table the docs show."""
    return tables.generator_sweep({"rows": rows, "teachers": teachers})


def parse_point(text: str) -> tuple[str, int, int]:
    m = re.fullmatch(r"(vit|cnn):(\d+):(\d+)", text)
    if not m:
        raise argparse.ArgumentTypeError(
            f"point {text!r} is not TEACHER:EPOCHS:SEED (e.g. vit:20:0; TEACHER vit or cnn)"
        )
    return m.group(1), int(m.group(2)), int(m.group(3))


def main(argv: list[str] | None = None) -> dict:

    p = OneLineParser(
        prog="python -m vitkd.demos.generator_sweep",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument(
        "--points",
        nargs="+",
        type=parse_point,
        default=[parse_point(s) for s in DEFAULT_POINTS],
        help="TEACHER:EPOCHS:SEED points (an epoch is 120 generator steps; vit:200:0 is the 24,000-step point)",
    )
    p.add_argument("--root", default="runs/generator-sweep")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--results", default="benchmarks/results/generator-sweep")
    a = p.parse_args(argv)
    root = Path(a.root)
    teachers = {t: ensure_teacher(t, a.threads) for t in sorted({t for t, _, _ in a.points})}
    points = [point(t, e, s, root, a.threads) for t, e, s in a.points]
    rows = grouped(points)
    res = {
        "machine": machine(),
        "date": dt.date.today().isoformat(),
        "config": CONFIG,
        "teachers": teachers,
        "rows": rows,
        "points": points,
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "validation_mode": "train: the generator's batch norms use batch statistics during validation, as in training "
        "(DAFL never uses eval mode); eval mode is logged beside it",
        "estimate_24000_steps_h": {
            r["teacher"]: 24_000 * r["s_per_generator_step"] / 3600 for r in rows if r["s_per_generator_step"]
        },
    }
    write_json(root / "summary.json", res)
    write_json(results_file(a.results, res), res)
    print(markdown(rows, teachers))
    return res


if __name__ == "__main__":
    demo_main(main)
