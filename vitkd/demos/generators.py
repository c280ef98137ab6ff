"""``make demo-generator``: the data-free routes from one teacher, 3 seeds each.

Rows: ``dafl`` (DAFL's generator and L_G), ``transformer_gan`` (vitkd's transformer-augmented generator,
L_G = L_adv + λ·L_attention), ``hybrid`` (the transformer GAN with half of each student batch from the
attention-probe selection; digits only), ``fast`` (Fast-DFKD's meta-synthesizer on DAFL's generator).

``--teacher digits`` (default) uses the demo's digits teacher (``runs/demo/teacher``, trained if missing,
and its selection ``runs/demo/select_ap`` for the hybrid); ``--teacher fashion`` the Fashion-MNIST
benchmark's teacher (``runs/bench-wild/teacher``, from ``make bench-wild-teacher``) with the benchmark's
student preset. Writes every run under ``--out`` and ``summary.json`` (per row: ``test_acc_mean``,
``test_acc_std``, ``seeds``, generator steps, images generated, wall time), ``generators.png`` (a grid of
each generator's images beside real ones) and each run's ``samples/epochNNN.png``. Checkpoints are chosen
on ``val/agree`` (held-out generated images), never on test.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from data_modules.digits import DigitsDataModule
from data_modules.fashion import FashionMNISTDataModule
from vitkd.demos.runs import mean_std, run_fit
from vitkd.errors import OneLineParser, VitkdInputError, demo_main, positive_int
from vitkd.io import atomic_path, write_json
from vitkd.plotting import pyplot

CONFIGS = Path("experiments/generator")
ROUTES = [
    # row, config, data the student trains on
    ("dafl", "dafl.yaml", "DAFL generator"),
    ("transformer_gan", "transformer_gan.yaml", "transformer-GAN generator"),
    ("hybrid", "hybrid.yaml", "transformer-GAN + selected wild (1:1)"),
    ("fast", "fast.yaml", "Fast-DFKD meta-synthesizer (DAFL generator)"),
]
# per teacher: its checkpoint, and the arguments that fit the configs (written for digits) to it
TEACHERS = {
    "digits": dict(ckpt="runs/demo/teacher/checkpoints/best.ckpt", args=[]),
    "fashion": dict(
        ckpt="runs/bench-wild/teacher/checkpoints/best.ckpt",
        args=[
            "--model.init_args.arch",
            "fashion_student_convstem_28",
            "--model.init_args.img_size",
            "28",
            "--model.init_args.patch_pairs",
            "[[1, 1], [3, 2], [5, 3]]",
            "--data.class_path",
            "data_modules.FashionMNISTDataModule",
            "--data.init_args.img_size",
            "28",
            "--data.init_args.val_limit",
            "500",
        ],
    ),
}
SHOW = ("test/acc", "best_val/agree", "labelled_val/acc")


def row_summary(name: str, data: str, runs: list[dict], walls: list[float]) -> dict:
    accs = [m["test/acc"] for m in runs]
    mean, std = mean_std(accs)
    m0 = runs[0]
    steps = m0.get("generator_steps", 0)
    batch = m0.get("batch_size", 0)
    out = {
        "run": name,
        "data": data,
        "params": m0.get("params"),
        "generator_params": m0.get("generator_params"),
        "synthesizer": m0.get("synthesizer"),
        "test_acc_mean": mean,
        "test_acc_std": std,
        "test_accs": accs,
        "seeds": len(accs),
        "generator_steps": steps,
        "images_generated": steps * batch,
        "student_images": m0.get("student_images"),
        "wall_s_mean": sum(walls) / len(walls),
        "wall_s": walls,
        "best_val_agree_mean": mean_std([m["best_val/agree"] for m in runs])[0],
    }
    if all("labelled_val/acc" in m for m in runs):
        out["labelled_val_acc_mean"] = mean_std([m["labelled_val/acc"] for m in runs])[0]
    if out["wall_s_mean"] and out["student_images"]:
        out["distilled_images_per_s"] = out["student_images"] / out["wall_s_mean"]
    return out


def table(rows: list[dict]) -> str:
    head = f"{'run':<16} {'data used':<44} {'gen steps':>9} {'wall s':>7}  {'test acc (%)':>14}"
    lines = [head, "-" * len(head)]
    for r in rows:
        acc = f"{100 * r['test_acc_mean']:.2f} ± {100 * r['test_acc_std']:.2f}"
        steps = f"{r['generator_steps']:>9}" if r.get("generator_steps") is not None else f"{'-':>9}"
        wall = f"{r['wall_s_mean']:>7.0f}" if r.get("wall_s_mean") else f"{'-':>7}"
        lines.append(f"{r['run']:<16} {r.get('data', ''):<44} {steps} {wall}  {acc:>14}")
    return "\n".join(lines)


def last_grid(run_dir: Path) -> Path | None:
    grids = sorted((run_dir / "samples").glob("epoch*.png"))
    return grids[-1] if grids else None


def real_images(teacher: str, n: int = 64):
    """The first ``n`` training images of the teacher's data in [0, 1] (for the figure only)."""
    import torch

    dm = DigitsDataModule(img_size=16) if teacher == "digits" else FashionMNISTDataModule(img_size=28)
    ds = dm._original("train")
    x = torch.stack([ds[i][0] for i in range(n)])
    return x * 0.5 + 0.5


def figure(out: Path, teacher: str, grids: list[tuple[str, Path]]) -> Path:
    """One figure: real images, then each generator's last sample grid (seed 0)."""
    plt = pyplot()
    from torchvision.utils import make_grid

    panels = [("real (train split)", make_grid(real_images(teacher), nrow=8).permute(1, 2, 0).numpy())]
    panels += [(name, plt.imread(str(path))) for name, path in grids]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6))
    for ax, (title, img) in zip(axes, panels):
        ax.imshow(img, cmap="gray")
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    fig.suptitle(f"data-free generators vs real images ({teacher} teacher)")
    fig.tight_layout()
    path = out / "generators.png"
    with atomic_path(path) as tmp:
        fig.savefig(str(tmp), format="png", dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    p = OneLineParser(
        prog="python -m vitkd.demos.generators",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--teacher", choices=sorted(TEACHERS), default="digits", help="whose data-free routes to run")
    p.add_argument(
        "--out",
        default=None,
        help="output folder (default runs/demo-generator, runs/demo-generator-fashion; earlier runs are replaced)",
    )
    p.add_argument(
        "--demo", default="runs/demo", help="the skeleton demo's run directory (digits teacher, selection, summary)"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of each student run")
    p.add_argument(
        "--routes",
        nargs="+",
        choices=[r[0] for r in ROUTES],
        default=None,
        help="rows to run (default all that fit the teacher)",
    )
    p.add_argument("--workers", type=positive_int, default=2, help="runs at a time (each on one torch thread)")
    a = p.parse_args(argv)
    t0 = time.time()
    out = Path(a.out or ("runs/demo-generator" if a.teacher == "digits" else f"runs/demo-generator-{a.teacher}"))
    demo = Path(a.demo)
    spec = TEACHERS[a.teacher]
    teacher = Path(spec["ckpt"])
    extra = [
        "--model.init_args.teacher_ckpt",
        str(teacher),
        "--model.init_args.labelled_val",
        "true",
        "--torch_threads",
        "1",
        *spec["args"],
    ]
    routes = [r for r in ROUTES if a.routes is None or r[0] in a.routes]
    if a.teacher == "digits":
        if not teacher.is_file():
            print(f"[setup] training the digits teacher ({demo / 'teacher'})", flush=True)
            run_fit("experiments/digits/teacher.yaml", demo / "teacher", show=("test/acc",))
    elif not teacher.is_file():
        raise VitkdInputError(f"the Fashion-MNIST teacher {teacher} is missing: run make bench-wild-teacher first")
    hybrid_args: list[str] = []
    if any(r[0] == "hybrid" for r in routes):
        if a.teacher != "digits":  # the hybrid's selection is the skeleton demo's, of the digits pool
            routes = [r for r in routes if r[0] != "hybrid"]
            print("[hybrid] skipped: its wild selection exists for the digits teacher only", flush=True)
        else:
            selected = demo / "select_ap" / "selected" / "meta.json"
            if not selected.is_file():
                print(f"[setup] attention-probe selection ({demo / 'select_ap'})", flush=True)
                run_fit(
                    "experiments/digits/select.yaml", demo / "select_ap", "--model.init_args.teacher_ckpt", str(teacher)
                )
            shards = json.loads(selected.read_text()).get("shards") or 2
            hybrid_args = [
                "--data.init_args.train_urls",
                str(demo / "select_ap" / "selected" / f"shard-{{000000..{shards - 1:06d}}}.tar"),
            ]

    jobs, index = [], []
    for name, cfg, _ in routes:
        for seed in a.seeds:
            more = hybrid_args if name == "hybrid" else []
            jobs.append((CONFIGS / cfg, out / name / f"seed{seed}", "--seed_everything", str(seed), *extra, *more))
            index.append(name)
    print(f"[{a.teacher}] {len(jobs)} runs, {a.workers} at a time", flush=True)

    def timed(job):
        s = time.time()
        m = run_fit(*job, show=SHOW)
        return m, time.time() - s

    with ThreadPoolExecutor(max_workers=a.workers) as pool:
        results = list(pool.map(timed, jobs))
    rows = []
    for name, _, data in routes:
        got = [r for r, n in zip(results, index) if n == name]
        rows.append(row_summary(name, data, [m for m, _ in got], [w for _, w in got]))
    grids = [
        (name, g)
        for name, _, _ in routes
        if name != "hybrid" and (g := last_grid(out / name / f"seed{a.seeds[0]}")) is not None
    ]
    fig = figure(out, a.teacher, grids)
    summary = {
        "teacher": a.teacher,
        "teacher_ckpt": str(teacher),
        "rows": rows,
        "wall_s": time.time() - t0,
        "workers": a.workers,
        "figure": str(fig),
    }
    write_json(out / "summary.json", summary)
    shown = list(rows)
    skeleton = demo / "summary.json"
    if a.teacher == "digits" and skeleton.is_file():
        ref = {r["run"]: r for r in json.loads(skeleton.read_text())}
        shown += [ref[k] for k in ("kd_original", "attention_probe") if k in ref]
    print(table(shown))
    print(f"demo-generator finished in {time.time() - t0:.0f}s; table in {out / 'summary.json'}, figure {fig}")


if __name__ == "__main__":
    demo_main(main)  # a failed run ends the demo with one line
