"""``make demo``: teacher → selections → students (3 seeds each) on the embedded default, then a table.

Writes every run under ``runs/demo/`` and the comparison as ``runs/demo/summary.json``: a list of rows
with ``run``, ``data``, ``params``, ``test_acc_mean``, ``test_acc_std`` and, for runs on a selection,
the selection's ``precision``. Each checkpoint is chosen on its validation split, never on test.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
from pathlib import Path
from typing import Callable

from vitkd.demos.runs import cell, machine, mean_std, results_file, run_fit, run_graph, run_logged
from vitkd.errors import OneLineParser, demo_main, positive_int
from vitkd.io import write_json

CONFIGS = Path("experiments/digits")
SELECTIONS = {"select_ap": "select.yaml", "select_dfnd": "select_dfnd.yaml", "select_random": "select_random.yaml"}
STUDENTS = [
    # run name, config, data it trains on, selection it uses
    ("scratch", "scratch.yaml", "original (labels)", None),
    ("kd_original", "kd_original.yaml", "original (labels) + teacher", None),
    ("dfnd", "dfnd.yaml", "wild, confidence-selected", "select_dfnd"),
    ("random_wild", "random_wild.yaml", "wild, random subset", "select_random"),
    ("attention_probe", "attention_probe.yaml", "wild, attention-probe-selected", "select_ap"),
]


SHOW = ("test/acc", "precision", "num_kept")


def table(rows: list[dict]) -> str:
    head = (
        f"{'run':<16} {'data used':<32} {'params':>8}  {'test acc (%)':>16}  "
        f"{'precision':>9}  {'(max)':>6}  {'V AUROC':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        acc = f"{100 * r['test_acc_mean']:.2f} ± {100 * r['test_acc_std']:.2f}"
        lines.append(
            f"{r['run']:<16} {r['data']:<32} {r['params']:>8}  {acc:>16}  "
            f"{cell(r, 'precision', 9)}  {cell(r, 'precision_max', 6)}  {cell(r, 'value_auroc', 7)}"
        )
    return "\n".join(lines)


def write_pool(out: Path) -> None:
    """The selections' embedded wild pool, in its own process (``python -m data_modules.digits``, with the
    pool options of ``select.yaml``; nothing when it exists)."""
    import yaml

    data = (yaml.safe_load((CONFIGS / "select.yaml").read_text()).get("data") or {}).get("init_args") or {}
    options = [f"--{k}={data[k]}" for k in ("data_dir", "wild_pool_size", "wild_pool_seed") if k in data]
    t0 = time.time()
    run_logged([sys.executable, "-m", "data_modules.digits", *options], out / "pool.log", "writing the wild pool")
    print(f"  wild pool: {time.time() - t0:.0f}s ({out / 'pool.log'})", flush=True)


def demo_jobs(out: Path, seeds: list[int], fit: Callable = run_fit, pool: Callable = write_pool) -> dict:
    """The demo's runs as jobs for ``run_graph``: name → (the jobs it waits for, the job).

    ``fit(config, run_dir, *args, show=...)`` runs one config and returns its metrics; ``pool(out)`` writes the
    wild pool. Among the jobs ready, the first listed starts first: the teacher is on every path, so it
    starts first, with the pool and then the scratch students (which need neither) on the other core; then
    the selections; then the long wild-data students, the short ones last to fill the gaps. The later seeds of
    a wild-data student wait for its first, whose teacher outputs they read (``teacher_cache_file``).
    """
    common = ["--model.init_args.teacher_ckpt", str(out / "teacher" / "checkpoints" / "best.ckpt")]

    def run(config: str, run_dir: Path, *extra: str, sel: str | None = None) -> Callable:
        def job(results: dict) -> dict:
            urls = ["--data.init_args.train_urls", results[sel]["selected_urls"]] if sel else []
            return fit(CONFIGS / config, run_dir, *extra, *urls, show=SHOW)

        return job

    jobs: dict[str, tuple[tuple[str, ...], Callable]] = {
        "teacher": ((), run("teacher.yaml", out / "teacher")),
        "pool": ((), lambda results: pool(out)),
    }
    for name, cfg in SELECTIONS.items():
        jobs[name] = (("teacher", "pool"), run(cfg, out / name, *common))
    for name, cfg, _, sel in reversed(STUDENTS):
        after = () if name == "scratch" else ("teacher",) if sel is None else ("teacher", sel)
        teacher = common if name != "scratch" else []
        if sel is not None:  # the seeds' views are the same (view_seed): the first seed's teacher outputs serve all
            teacher = [*teacher, "--model.init_args.teacher_cache_file", str(out / name / "teacher_outputs.pt")]
        for i, seed in enumerate(seeds):
            jobs[f"{name}/seed{seed}"] = (
                (*after, f"{name}/seed{seeds[0]}") if sel is not None and i else after,
                run(cfg, out / name / f"seed{seed}", "--seed_everything", str(seed), *teacher, sel=sel),
            )
    return jobs


def summary_rows(done: dict, seeds: list[int]) -> list[dict]:
    """The table's rows from the finished jobs' metrics: test accuracy mean ± sample std over the seeds, and
    for students on a selection what measures and bounds that selection."""
    teacher = done["teacher"]
    rows = [
        {
            "run": "teacher",
            "data": "original (labels)",
            "params": teacher["params"],
            "test_acc_mean": teacher["test/acc"],
            "test_acc_std": 0.0,
            "seeds": 1,
        }
    ]
    for name, _, data, sel in STUDENTS:
        ms = [done[f"{name}/seed{seed}"] for seed in seeds]
        accs = [m["test/acc"] for m in ms]
        mean, std = mean_std(accs)
        row = {
            "run": name,
            "data": data,
            "params": ms[0]["params"],
            "test_acc_mean": mean,
            "test_acc_std": std,
            "test_accs": accs,
            "seeds": len(accs),
        }
        if sel is not None:
            # precision_max and value_auroc: what bounds the precision; pseudo_label_acc: how often the teacher's
            # label of a kept digit is its digit
            for key in ("precision", "precision_max", "value_auroc", "pseudo_label_acc"):
                row[key] = done[sel].get(key)
            row["num_kept"] = done[sel]["num_kept"]
        rows.append(row)
    return rows


def record(rows: list[dict], wall_s: float, jobs: int, results: Path) -> Path:
    """The demo's rows with the machine, the date and the wall time, as ``results/<machine>-<date>.json``."""
    res = {
        "machine": machine(),
        "date": dt.date.today().isoformat(),
        "wall_s": round(wall_s),
        "jobs": jobs,
        "rows": rows,
    }
    path = results_file(results, res)
    write_json(path, res)
    return path


def main(argv: list[str] | None = None) -> None:
    p = OneLineParser(
        prog="python -m vitkd.demos.pipeline",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description=__doc__,
    )
    p.add_argument("--out", default="runs/demo", help="output folder (its earlier runs are replaced)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of each student run")
    p.add_argument(
        "--results",
        default=None,
        help="also write the table with the machine, date and wall time as DIR/<machine>-<date>.json "
        "(the committed results under benchmarks/results/demo/ are written so)",
    )
    p.add_argument(
        "--jobs", type=positive_int, default=min(2, os.cpu_count() or 1), help="runs at a time (2: one per core here)"
    )
    a = p.parse_args(argv)
    seeds = list(dict.fromkeys(a.seeds))  # a seed named twice is one run
    out = Path(a.out)
    t0 = time.time()
    print(
        f"teacher, wild pool, {len(SELECTIONS)} selections, {len(STUDENTS)} students x {len(seeds)} seeds; "
        f"{a.jobs} at a time",
        flush=True,
    )
    rows = summary_rows(run_graph(demo_jobs(out, seeds), a.jobs), seeds)
    write_json(out / "summary.json", rows)
    if a.results:
        print(f"results in {record(rows, time.time() - t0, a.jobs, Path(a.results))}")
    print(table(rows))
    print(f"demo finished in {time.time() - t0:.0f}s with {a.jobs} runs at a time; table in {out / 'summary.json'}")


if __name__ == "__main__":
    demo_main(main)
