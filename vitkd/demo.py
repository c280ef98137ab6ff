"""``make demo``: teacher → selections → students (3 seeds each) on the embedded default, then a table.

Writes every run under ``runs/demo/`` and the comparison as ``runs/demo/summary.json``: a list of rows
with ``run``, ``data``, ``params``, ``test_acc_mean``, ``test_acc_std`` and, for runs on a selection,
the selection's ``precision``. Each checkpoint is chosen on its validation split, never on test.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from vitkd.errors import OneLineParser, positive_int
from vitkd.io import write_json
from vitkd.runs import demo_main, run_many

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
    head = f"{'run':<16} {'data used':<32} {'params':>8}  {'test acc (%)':>16}  {'precision':>9}  {'(max)':>6}  {'V AUROC':>7}"
    lines = [head, "-" * len(head)]

    def fmt(r: dict, key: str, width: int) -> str:
        return f"{r[key]:>{width}.3f}" if r.get(key) is not None else f"{'-':>{width}}"

    for r in rows:
        acc = f"{100 * r['test_acc_mean']:.2f} ± {100 * r['test_acc_std']:.2f}"
        lines.append(
            f"{r['run']:<16} {r['data']:<32} {r['params']:>8}  {acc:>16}  {fmt(r, 'precision', 9)}  {fmt(r, 'precision_max', 6)}  {fmt(r, 'value_auroc', 7)}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = OneLineParser(prog="python -m vitkd.demo", formatter_class=argparse.ArgumentDefaultsHelpFormatter, description=__doc__)
    p.add_argument("--out", default="runs/demo", help="output folder (its earlier runs are replaced)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of each student run")
    p.add_argument("--jobs", type=positive_int, default=min(2, os.cpu_count() or 1), help="runs at a time (2: one per core here)")
    a = p.parse_args(argv)
    out = Path(a.out)
    t0 = time.time()
    teacher_ckpt = out / "teacher" / "checkpoints" / "best.ckpt"
    common = ["--model.init_args.teacher_ckpt", str(teacher_ckpt)]

    def student_jobs(names: list[str], selections: dict) -> list[tuple]:
        jobs = []
        for name, cfg, _, sel in STUDENTS:
            if name not in names:
                continue
            extra = list(common) if cfg != "scratch.yaml" else []
            if sel is not None:
                extra += ["--data.init_args.train_urls", selections[sel]["selected_urls"]]
            jobs += [(name, (CONFIGS / cfg, out / name / f"seed{seed}", "--seed_everything", str(seed), *extra)) for seed in a.seeds]
        return jobs

    # the scratch students need no teacher: they run beside it, on the core the teacher leaves idle
    print("[1/3] teacher (and the scratch students beside it)", flush=True)
    first = student_jobs(["scratch"], {})
    done = run_many([(CONFIGS / "teacher.yaml", out / "teacher"), *(j for _, j in first)], a.jobs, SHOW)
    teacher, results = done[0], {name: [] for name, *_ in STUDENTS}
    results["scratch"] = done[1:]
    rows = [{"run": "teacher", "data": "original (labels)", "params": teacher["params"], "test_acc_mean": teacher["test/acc"], "test_acc_std": 0.0, "seeds": 1}]

    print("[2/3] selections", flush=True)
    names = list(SELECTIONS)
    selections = dict(zip(names, run_many([(CONFIGS / SELECTIONS[n], out / n, *common) for n in names], a.jobs, SHOW)))

    print("[3/3] students", flush=True)
    # the longest runs first, so the last minutes are not spent on one run while a core idles
    rest = student_jobs([s[0] for s in STUDENTS if s[0] != "scratch"], selections)[::-1]
    for (name, _), metrics in zip(rest, run_many([j for _, j in rest], a.jobs, SHOW)):
        results[name].insert(0, metrics)  # ``rest`` is in reverse seed order

    for name, _, data, sel in STUDENTS:
        ms = results[name]
        accs = [m["test/acc"] for m in ms]
        row = {
            "run": name,
            "data": data,
            "params": ms[0]["params"],
            "test_acc_mean": statistics.fmean(accs),
            "test_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "test_accs": accs,
            "seeds": len(accs),
        }
        if sel is not None:
            # precision_max and value_auroc: what bounds the precision; pseudo_label_acc: how often the teacher's
            # label of a kept digit is its digit
            for key in ("precision", "precision_max", "value_auroc", "pseudo_label_acc"):
                row[key] = selections[sel].get(key)
            row["num_kept"] = selections[sel]["num_kept"]
        rows.append(row)

    write_json(out / "summary.json", rows)
    print(table(rows))
    print(f"demo finished in {time.time() - t0:.0f}s with {a.jobs} runs at a time; table in {out / 'summary.json'}")


if __name__ == "__main__":
    demo_main(main)
