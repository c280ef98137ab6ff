"""``make demo-detection``: a DETR teacher (trained once, ``make detection-teacher``) distilled into a lighter DETR
student on the embedded aerial set, each student variant over 3 seeds, then a table and a picture.

Variants (``VARIANTS``; configs in ``experiments/detection/``), all at the same student and budget:

- ``student_scratch``: labels only (the baseline);
- ``student_distilled``: labels + (D1)–(D3), the student's queries matched to the teacher's confident ones;
- ``student_shared_query``: labels + (D5)–(D7), KD-DETR's shared queries asked of both models;
- ``student_pseudo_gt`` (not in the default run: ``--variants``): the labelled training images with their
  labels unused: the teacher's confident boxes are the ground truth, + (D1)–(D3) + (D5)–(D7);
- ``student_data_free``: unlabeled images only (an unlabeled pool of the same kind, never annotated) with the
  teacher's outputs as the only targets, as ``student_pseudo_gt``.

Writes ``runs/demo-detection/<variant>/seed<N>/`` and ``runs/demo-detection/summary.json``: rows ``teacher``
and one per variant with mean and sample std over the seeds of ``map`` and ``map50`` (test split, each run's
checkpoint chosen on val/map), ``params``, ``gflops``, ``images_per_s``; the goal checks in ``checks``; and
``boxes.png``, test images with the ground truth, the teacher's and the students' boxes side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path

import torch

from data_modules.aerial import CLASSES, AerialDataModule
from vitkd.demos.runs import machine, mean_std, results_file, run_fit, run_many
from vitkd.detection.box_ops import normalized_to_pixel_xyxy
from vitkd.detection.detr import postprocess
from vitkd.detection.draw import draw_detections
from vitkd.errors import OneLineParser, demo_main, positive_int
from vitkd.io import write_json
from vitkd.stages.detection import load_detr

CONFIGS = Path("experiments/detection")
SEEDS = (0, 1, 2)
SHOW = ("test/map", "test/map50")
VARIANTS: dict[str, tuple[str, str]] = {
    "student_scratch": ("student_scratch.yaml", "labels only"),
    "student_distilled": ("distill.yaml", "labels + (D1)-(D3): student queries matched to the teacher's"),
    "student_shared_query": ("distill_shared_query.yaml", "labels + (D5)-(D7): shared queries (KD-DETR)"),
    "student_pseudo_gt": ("distill_pseudo_gt.yaml", "labelled images, labels unused: teacher targets only"),
    "student_data_free": ("distill_data_free.yaml", "unlabeled images only: teacher targets only"),
}
LABELLED = ("student_distilled", "student_shared_query")  # the distillations that use labels
DEFAULT_VARIANTS = ("student_scratch", "student_distilled", "student_shared_query", "student_data_free")
# the longest runs start first, so the last to finish is a short one and no core waits long (the shared-query
# terms run the teacher's decoder every step; the data-free variant has them too)
LONGEST_FIRST = (
    "student_data_free",
    "student_shared_query",
    "student_pseudo_gt",
    "student_distilled",
    "student_scratch",
)


def train_teacher(teacher_dir: Path, retrain: bool, threads: int) -> tuple[dict, bool]:
    """The teacher's run (``experiments/detection/teacher.yaml``) on every core, trained unless a finished one
    is there; its metrics and whether it was reused."""
    done = teacher_dir / "metrics.json"
    if done.is_file() and not retrain:
        print(f"  {teacher_dir}: reused (make detection-teacher trained it; --retrain_teacher trains it again)")
        return json.loads(done.read_text()), True
    t0 = time.time()
    metrics = run_fit(CONFIGS / "teacher.yaml", teacher_dir, "--torch_threads", str(threads), show=SHOW)
    summary = {"teacher": row("teacher", [metrics]), "machine": machine(), "seconds": round(time.time() - t0)}
    write_json(teacher_dir / "summary.json", summary)
    return metrics, False


def row(name: str, runs: list[dict]) -> dict:
    """One table row: mean and sample std over the seeds' runs."""
    out: dict = {"run": name, "seeds": len(runs)}
    for key, metric in (("map", "test/map"), ("map50", "test/map50"), ("best_val_map", "best_val/map")):
        out[key], out[f"{key}_std"] = mean_std([m[metric] for m in runs])
    out["map_per_seed"] = [m["test/map"] for m in runs]
    for key in ("params", "gflops"):
        out[key] = runs[0][key]
    out["images_per_s"] = mean_std([m["images_per_s"] for m in runs])[0]
    out["epochs"] = runs[0].get("epochs")
    return out


def table(rows: list[dict]) -> str:
    head = f"{'run':<21} {'mAP':>15} {'mAP@50':>15} {'params':>9} {'GFLOPs':>7} {'images/s':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['run']:<21} {r['map']:>7.4f} ± {r['map_std']:.4f} {r['map50']:>7.4f} ± {r['map50_std']:.4f} "
            f"{r['params']:>9} {r['gflops']:>7.4f} {r['images_per_s']:>9.0f}"
        )
    return "\n".join(lines)


def checks(rows: dict[str, dict]) -> dict:
    """The issue's goals, measured: teacher mAP; the labelled distillation chosen on validation mAP against
    scratch; the data-free student against it."""
    scratch = rows["student_scratch"]
    best = max((v for v in LABELLED if v in rows), key=lambda v: rows[v]["best_val_map"])
    out = {
        "teacher_map": rows["teacher"]["map"],
        "teacher_map_at_least_0.40": rows["teacher"]["map"] >= 0.40,
        "distilled_chosen_on_val": best,
        "distilled_minus_scratch": rows[best]["map"] - scratch["map"],
        "distilled_at_least_scratch_plus_0.03": rows[best]["map"] - scratch["map"] >= 0.03,
    }
    if "student_data_free" in rows:
        ratio = rows["student_data_free"]["map"] / max(rows[best]["map"], 1e-9)
        out.update({"data_free_over_distilled": ratio, "data_free_at_least_0.8": ratio >= 0.8})
    return out


@torch.no_grad()
def picture(path: Path, teacher_ckpt: Path, students: dict[str, Path], data: AerialDataModule, n: int = 6) -> Path:
    """``n`` test images of ``data``: ground truth, teacher and each student's boxes (score ≥ 0.5) side by side."""
    ds = data.dataset("test")
    images = torch.stack([ds[i][0] for i in range(n)])
    size = images.shape[-1]
    gts = [ds[i][1] for i in range(n)]
    columns = [("ground truth", [{**t, "boxes": normalized_to_pixel_xyxy(t["boxes"], size, size)} for t in gts])]
    for title, ckpt in [("teacher", teacher_ckpt), *students.items()]:
        model, _ = load_detr(ckpt, size, images.shape[1], len(CLASSES))
        columns.append((title, postprocess(model(images), size)))
    return draw_detections(path, images, columns, CLASSES)


def main(argv: list[str] | None = None) -> None:
    p = OneLineParser(
        prog="python -m vitkd.demos.detection",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description=__doc__,
    )
    p.add_argument("--out", default="runs/demo-detection", help="output folder (its earlier runs are replaced)")
    p.add_argument("--teacher_dir", default="runs/detection-teacher", help="the teacher's run (trained once)")
    p.add_argument("--teacher_only", action="store_true", help="train (or find) the teacher, then stop")
    p.add_argument("--retrain_teacher", action="store_true", help="train the teacher again even if it is there")
    p.add_argument("--reuse_teacher", action="store_true", help=argparse.SUPPRESS)  # the default now; kept one release
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=list(VARIANTS), help="student rows")
    p.add_argument("--seeds", type=positive_int, default=len(SEEDS), help="seeds per student variant")
    p.add_argument(
        "--jobs", type=positive_int, default=min(2, os.cpu_count() or 1), help="student runs at a time (one per core)"
    )
    p.add_argument("--results", default=None, help="also record the table under this folder (<machine>-<date>.json)")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="arguments passed to every student run")
    a = p.parse_args(argv)
    if a.reuse_teacher:
        warnings.warn(
            "--reuse_teacher is the default now (a finished teacher is reused); drop it", FutureWarning, stacklevel=2
        )
    out, teacher_dir = Path(a.out), Path(a.teacher_dir)
    t0 = time.time()
    print("[1/3] teacher", flush=True)
    teacher, reused = train_teacher(teacher_dir, a.retrain_teacher, os.cpu_count() or 1)
    teacher_s = round(time.time() - t0)
    if a.teacher_only:
        print(table([row("teacher", [teacher])]))
        return
    teacher_ckpt = teacher_dir / "checkpoints" / "best.ckpt"
    print(f"[2/3] {len(a.variants)} student variants x {a.seeds} seeds", flush=True)
    t1 = time.time()
    jobs = []
    for name in sorted(a.variants, key=LONGEST_FIRST.index):
        cfg = VARIANTS[name][0]
        tk = [] if name == "student_scratch" else ["--model.init_args.teacher_ckpt", str(teacher_ckpt)]
        for seed in SEEDS[: a.seeds] if a.seeds <= len(SEEDS) else range(a.seeds):
            jobs.append(
                (name, (CONFIGS / cfg, out / name / f"seed{seed}", "--seed_everything", str(seed), *tk, *a.extra))
            )
    done = run_many([job for _, job in jobs], a.jobs, SHOW)
    by_variant: dict[str, list[dict]] = {}
    for (name, _), m in zip(jobs, done):
        by_variant.setdefault(name, []).append(m)
    rows = [row("teacher", [teacher])] + [row(name, by_variant[name]) for name in a.variants]
    for r in rows:
        r["what"] = VARIANTS[r["run"]][1] if r["run"] in VARIANTS else "DETR teacher, labels, trained once"
    students_s = round(time.time() - t1)
    print("[3/3] picture", flush=True)
    by_name = {r["run"]: r for r in rows}
    goal = checks(by_name) if "student_scratch" in by_name and any(v in by_name for v in LABELLED) else {}
    shown_runs = ["student_scratch", goal.get("distilled_chosen_on_val"), "student_data_free"]
    shown = {
        n.removeprefix("student_"): out / n / "seed0" / "checkpoints" / "best.ckpt" for n in shown_runs if n in by_name
    }
    pic = picture(out / "boxes.png", teacher_ckpt, shown, AerialDataModule())
    summary = {
        "rows": rows,
        "checks": goal,
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "seconds": round(time.time() - t0),
        "seconds_students": students_s,
        "seconds_teacher": teacher_s,
        "teacher_reused": reused,
        "picture": str(pic),
    }
    write_json(out / "summary.json", summary)
    if a.results:
        write_json(results_file(Path(a.results), summary), summary)
    print(table(rows))
    print(json.dumps(summary["checks"], indent=1))
    print(f"demo finished in {summary['seconds']}s (students {students_s}s); table in {out / 'summary.json'}")


if __name__ == "__main__":
    demo_main(main)
