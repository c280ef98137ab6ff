"""``make bench-wild``: the real-data benchmark. Fashion-MNIST teacher → selections of a real wild pool at
two kept sizes → students (3 seeds each) → table, plot and ``summary.json``.

Rows (``runs/bench-wild/summary.json``, a list): ``teacher``; ``scratch`` and ``kd_original`` on the original
training split; and for each selection at k1 (the pool's in-distribution images) and k2 = 2·k1: ``random``,
``dfnd`` (V_n alone), ``attention_probe`` (the paper's V and λ), ``va_only`` (V_a alone), ``oracle``
(in-distribution ``src`` first: the upper bound of any selection) and ``vitkd_fusion`` (vitkd's own: z-scored
V_n, V_a, stability and energy, weights chosen on the first 1,000 validation images, never on test). Every
student has one arch, one loss (``experiments/fashion/student.yaml``: the paper's Eq. 10 for every selection) and
one budget; checkpoints are chosen on validation. The teacher is trained once and reused (its time is reported
apart from the benchmark's). ``--quick``: one seed, the pool's first shards, a fifth of the students' budget, the
same rows.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from data_modules.fashion import (
    SELECT_VAL,
    find_fashion_dir,
    num_test_images,
    write_val_shards,
)
from data_modules.fashion_pool import add_size_args, pool_dir
from data_modules.shards import expand_urls, raw_samples, read_str, shard_url
from vitkd.demos import tables
from vitkd.demos.runs import cell, machine, mean_std, run_fit, run_graph, run_logged
from vitkd.errors import OneLineParser, VitkdInputError, demo_main, positive_int
from vitkd.io import write_json
from vitkd.plotting import pyplot
from vitkd.selection.scoring import fusion_columns, zscore_fusion

CONFIGS = Path("experiments/fashion")
# run name → (selection config, run whose saved scores it reuses: the same scores, selected another way)
SELECTIONS = {
    "random": ("select_random.yaml", None),
    "dfnd": ("select_dfnd.yaml", None),
    "attention_probe": ("select.yaml", None),
    "va_only": ("select_va.yaml", None),
    "oracle": ("select_oracle.yaml", "attention_probe"),
    "vitkd_fusion": ("select_fusion.yaml", "attention_probe"),
}
ORIGINAL = [
    ("scratch", "scratch.yaml", "original (labels)"),
    ("kd_original", "kd_original.yaml", "original (labels) + teacher"),
]
FUSION_TERMS = ("vn", "va", "vs", "energy")
SHOW = ("test/acc", "precision", "num_kept")
QUICK_SHARDS = 5  # --quick scores the pool's first shards only
QUICK_ARGS = [
    "--trainer.max_epochs",
    "2",
    "--data.init_args.epoch_samples",
    "10000",
]  # --quick: a fifth of the students' budget


def fusion_grid() -> list[dict[str, float]]:
    """The settings ``vitkd_fusion`` chooses among: every non-empty subset of its terms, each weighed 1."""
    return [
        {t: 1.0 for t in subset}
        for n in range(1, len(FUSION_TERMS) + 1)
        for subset in itertools.combinations(FUSION_TERMS, n)
    ]


def kept_share(pool: dict[str, np.ndarray], val: dict[str, np.ndarray], weights: dict[str, float], k: int) -> float:
    """Share of the labelled validation images whose fused value (z-scored by the pool's statistics) is at
    most the pool's k-th lowest: how many in-distribution images the rule would keep beside the pool."""
    stats = {c: (float(pool[c].mean()), float(pool[c].std())) for c in weights}
    v_pool, v_val = zscore_fusion(pool, weights, stats), zscore_fusion(val, weights, stats)
    threshold = np.partition(v_pool, k - 1)[k - 1]
    return float((v_val <= threshold).mean())


def choose_fusion(pool: dict[str, np.ndarray], val: dict[str, np.ndarray], k: int) -> dict:
    """The grid setting with the largest ``kept_share`` (the first listed, i.e. the fewest terms, on ties)."""
    shares = [(kept_share(pool, val, w, k), w) for w in fusion_grid()]
    best = max(shares, key=lambda s: s[0])  # max keeps the first of equal shares
    return {"weights": best[1], "kept_share": best[0], "grid": [{"weights": w, "kept_share": s} for s, w in shares]}


def score_columns(parts: Path) -> dict[str, np.ndarray]:
    """A selection's saved scores (``score_parts/part-*.npz``) as the fusion's columns, over all its parts."""
    cols: dict[str, list[np.ndarray]] = {}
    for path in sorted(parts.glob("part-*.npz")):
        with np.load(path) as z:
            if "key" not in z.files:
                continue
            for c, v in fusion_columns({f: z[f] for f in z.files}).items():
                cols.setdefault(c, []).append(v)
    if not cols:
        raise VitkdInputError(f"no saved scores in {parts}: rerun the benchmark (its selections write them)")
    return {c: np.concatenate(v) for c, v in cols.items()}


def bench_jobs(
    out: Path,
    seeds: list[int],
    pool_urls: Callable[[], dict],
    common: list[str],
    teacher_args: list[str],
    val_shards: Callable[[Path], str],
    fit: Callable = run_fit,
    teacher_dir: Path | None = None,
    selections: list[str] | None = None,
) -> dict:
    """The benchmark's runs as jobs for ``run_graph`` (name → (jobs it waits for, job)). ``pool_urls()``
    returns ``{"urls": brace URL, "k1": in-distribution images}``; ``val_shards(folder)`` writes the labelled
    validation images the fusion weights are chosen on and returns their URL; ``common`` goes to every run.
    ``teacher_dir``: the teacher's run (default ``out/teacher``), trained there if it holds none;
    ``selections``: the selection rows to run (default all; a reused row's source runs too)."""
    teacher_dir = teacher_dir or out / "teacher"
    chosen = needed_selections(selections)
    teacher_ckpt = teacher_dir / "checkpoints" / "best.ckpt"
    tea = ["--model.init_args.teacher_ckpt", str(teacher_ckpt)]

    def teacher(_: dict) -> dict:
        metrics = teacher_dir / "metrics.json"
        if teacher_ckpt.is_file() and metrics.is_file():
            print(f"  teacher: reused {teacher_ckpt}", flush=True)
            return {**json.loads(metrics.read_text()), "reused": True}
        t0 = time.time()
        m = fit(CONFIGS / "teacher.yaml", teacher_dir, *common, *teacher_args, show=("test/acc", "best_val/acc"))
        return {**m, "reused": False, "train_s": time.time() - t0}

    def select(name: str, k: str) -> Callable:
        config, reuse = SELECTIONS[name]

        def job(inputs: dict) -> dict:
            run_dir = out / "select" / f"{name}-{k}"
            source = out / "select" / (f"{name}-k1" if k == "k2" else f"{reuse}-k1" if reuse else "")
            if (k == "k2" or reuse) and not (run_dir / "score_parts").is_dir():  # the same scores, selected again
                shutil.copytree(source / "score_parts", run_dir / "score_parts")
            pool = inputs["pool"]
            extra = [
                "--data.init_args.wild_urls",
                pool["urls"],
                "--model.init_args.num_keep",
                str(pool["k1"] * (2 if k == "k2" else 1)),
                *tea,
            ]
            if name == "vitkd_fusion":
                extra += ["--model.init_args.fusion_weights", json.dumps(inputs["choose_fusion"]["weights"])]
            t0 = time.time()
            return {**fit(CONFIGS / config, run_dir, *common, *extra, show=SHOW), "select_s": time.time() - t0}

        return job

    def select_val(inputs: dict) -> dict:
        url = val_shards(out / "select" / "val-images")
        run_dir = out / "select" / "val-scores"
        fit(
            CONFIGS / "select.yaml",
            run_dir,
            *common,
            "--data.init_args.wild_urls",
            url,
            "--model.init_args.num_keep",
            "1",
            *tea,
            show=(),
        )
        return {"run_dir": str(run_dir)}

    def choose(inputs: dict) -> dict:
        pool = score_columns(out / "select" / "attention_probe-k1" / "score_parts")
        val = score_columns(Path(inputs["select_val"]["run_dir"]) / "score_parts")
        choice = {**choose_fusion(pool, val, inputs["pool"]["k1"]), "num_val": len(val["vn"])}
        write_json(out / "select" / "fusion_choice.json", choice)
        print(
            f"  fusion weights chosen on {choice['num_val']} validation images: {choice['weights']} "
            f"(kept share {choice['kept_share']:.3f})",
            flush=True,
        )
        return choice

    def student(config: str, run_dir: Path, *extra: str, sel: str | None = None) -> Callable:
        def job(inputs: dict) -> dict:
            urls = ["--data.init_args.train_urls", inputs[sel]["selected_urls"]] if sel else []
            return fit(CONFIGS / config, run_dir, *common, *extra, *urls, show=SHOW)

        return job

    jobs: dict[str, tuple[tuple[str, ...], Callable]] = {"teacher": ((), teacher), "pool": ((), lambda _: pool_urls())}
    for name, (_, reuse) in ((n, SELECTIONS[n]) for n in chosen):
        after = (
            "teacher",
            "pool",
            *((f"select/{reuse}/k1",) if reuse else ()),
            *(("choose_fusion",) if name == "vitkd_fusion" else ()),
        )
        jobs[f"select/{name}/k1"] = (after, select(name, "k1"))
    if "vitkd_fusion" in chosen:
        jobs["select_val"] = (("teacher",), select_val)
        jobs["choose_fusion"] = (("select/attention_probe/k1", "select_val", "pool"), choose)
    for name in chosen:
        jobs[f"select/{name}/k2"] = (
            (f"select/{name}/k1", "pool", *(("choose_fusion",) if name == "vitkd_fusion" else ())),
            select(name, "k2"),
        )
    for name in chosen:
        for k in ("k1", "k2"):
            for seed in seeds:
                run_dir = out / name / k / f"seed{seed}"
                jobs[f"{name}/{k}/seed{seed}"] = (
                    ("teacher", f"select/{name}/{k}"),
                    student("student.yaml", run_dir, "--seed_everything", str(seed), *tea, sel=f"select/{name}/{k}"),
                )
    for name, config, _ in ORIGINAL:
        for seed in seeds:
            extra = ["--seed_everything", str(seed), *(tea if name != "scratch" else [])]
            jobs[f"{name}/seed{seed}"] = (
                (() if name == "scratch" else ("teacher",)),
                student(config, out / name / f"seed{seed}", *extra),
            )
    return jobs


def needed_selections(selections: list[str] | None) -> list[str]:
    """The selection rows to run, in ``SELECTIONS`` order, with the rows whose scores they reuse."""
    if selections is None:
        return list(SELECTIONS)
    unknown = sorted(set(selections) - set(SELECTIONS))
    if unknown:
        raise VitkdInputError(f"--selections {unknown} unknown: use some of {', '.join(SELECTIONS)}")
    want = set(selections) | {SELECTIONS[n][1] for n in selections if SELECTIONS[n][1]}
    return [n for n in SELECTIONS if n in want]


def summary_rows(done: dict, seeds: list[int], num_test: int, selections: list[str] | None = None) -> list[dict]:
    """The table's rows: test accuracy mean ± sample std over the seeds; for selections, what measures them."""
    t = done["teacher"]
    rows = [
        {
            "run": "teacher",
            "num_keep": None,
            "data": "original (labels)",
            "params": t["params"],
            "test_acc_mean": t["test/acc"],
            "test_acc_std": 0.0,
            "seeds": 1,
            "num_test": num_test,
            "best_val_acc": t.get("best_val/acc"),
        }
    ]
    for name, _, data in ORIGINAL:
        accs = [done[f"{name}/seed{s}"]["test/acc"] for s in seeds]
        mean, std = mean_std(accs)
        rows.append(
            {
                "run": name,
                "num_keep": None,
                "data": data,
                "params": done[f"{name}/seed{seeds[0]}"]["params"],
                "test_acc_mean": mean,
                "test_acc_std": std,
                "test_accs": accs,
                "seeds": len(accs),
                "num_test": num_test,
            }
        )
    for name in selections or SELECTIONS:
        for k in ("k1", "k2"):
            sel = done[f"select/{name}/{k}"]
            accs = [done[f"{name}/{k}/seed{s}"]["test/acc"] for s in seeds]
            mean, std = mean_std(accs)
            row = {
                "run": name,
                "num_keep": sel["num_kept"],
                "kept_size": k,
                "data": "wild, selected",
                "params": done[f"{name}/{k}/seed{seeds[0]}"]["params"],
                "test_acc_mean": mean,
                "test_acc_std": std,
                "test_accs": accs,
                "seeds": len(accs),
                "num_test": num_test,
            }
            for key in (
                "precision",
                "recall",
                "precision_max",
                "precision_random",
                "value_auroc",
                "pseudo_label_acc",
                "kept_by_source",
                "select_s",
            ):
                if sel.get(key) is not None:
                    row[key] = sel[key]
            rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    head = (
        f"{'run':<16} {'kept':>6}  {'test acc (%)':>15}  {'precision':>9}  {'recall':>6}  {'(max)':>6}  {'V AUROC':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        acc = f"{100 * r['test_acc_mean']:.2f} ± {100 * r['test_acc_std']:.2f}"
        kept = str(r["num_keep"]) if r.get("num_keep") is not None else "-"
        lines.append(
            f"{r['run']:<16} {kept:>6}  {acc:>15}  {cell(r, 'precision', 9)}  {cell(r, 'recall', 6)}  "
            f"{cell(r, 'precision_max', 6)}  {cell(r, 'value_auroc', 7)}"
        )
    return "\n".join(lines)


def markdown(rows: list[dict]) -> str:
    """The summary as a Markdown table (the one the docs show, generated from the results JSON)."""
    return tables.bench_wild({"rows": rows})


def precision_at_k(
    scores_csv: Path, positive: str, strategy_random: bool, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Precision of the first k samples of a selection's ranking (by its ``value`` column, ties by position;
    a random selection's ranking is a random order), at 50 evenly spaced k."""
    import pandas as pd

    df = pd.read_csv(scores_csv, usecols=["value", "src"])
    pos = (df["src"].astype(str) == positive).to_numpy()
    order = (
        np.random.default_rng(seed).permutation(len(pos))
        if strategy_random
        else np.argsort(df["value"].to_numpy(), kind="stable")
    )
    hits = np.cumsum(pos[order])
    ks = np.unique(np.linspace(1, len(pos), 50).astype(int))
    return ks, hits[ks - 1] / ks


def plot(rows: list[dict], out: Path, positive: str = "fashion") -> Path:
    """Student accuracy against kept size per selection (original-data rows as lines) beside precision@k."""
    plt = pyplot()

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in SELECTIONS:
        rs = sorted((r for r in rows if r["run"] == name), key=lambda r: r["num_keep"])
        a.errorbar(
            [r["num_keep"] for r in rs],
            [100 * r["test_acc_mean"] for r in rs],
            yerr=[100 * r["test_acc_std"] for r in rs],
            marker="o",
            capsize=3,
            label=name,
        )
        csv = out / "select" / f"{name}-k2" / "scores.csv"
        if csv.is_file():
            ks, prec = precision_at_k(csv, positive, name == "random")
            b.plot(ks, prec, label=name)
    for r in rows:
        if r["run"] in ("scratch", "kd_original"):
            a.axhline(
                100 * r["test_acc_mean"],
                ls="--",
                lw=1,
                color="grey" if r["run"] == "scratch" else "black",
                label=r["run"],
            )
    k1 = min((r["num_keep"] for r in rows if r.get("kept_size") == "k1"), default=None)
    if k1:
        b.axvline(k1, ls=":", color="grey")
    a.set(
        xlabel="kept wild images",
        ylabel="student test accuracy (%)",
        title="students by selection (mean ± std over seeds)",
    )
    b.set(xlabel="k (first k of the ranking)", ylabel=f"precision ({positive} share)", title="precision@k")
    a.legend(fontsize=7)
    b.legend(fontsize=7)
    fig.tight_layout()
    path = out / "bench_wild.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    p = OneLineParser(
        prog="python -m vitkd.demos.bench_wild",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description=__doc__,
    )
    p.add_argument(
        "--out",
        default=None,
        help="output folder, its earlier runs replaced (default runs/bench-wild; --quick: runs/bench-wild-quick)",
    )
    p.add_argument(
        "--teacher_dir",
        default=None,
        help="the teacher's run, reused; trained there first if it holds none "
        "(default runs/bench-wild/teacher, OUT/teacher with --out)",
    )
    p.add_argument(
        "--markdown",
        metavar="SUMMARY",
        default=None,
        help="print the Markdown table of a summary.json (or a committed results JSON) and exit",
    )
    p.add_argument(
        "--selections", nargs="+", default=None, help=f"selection rows to run (default all: {' '.join(SELECTIONS)})"
    )
    p.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="seeds of each student (default 0 1 2; --quick: 0)"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"one seed, the pool's first {QUICK_SHARDS} shards and a fifth of the students' budget "
        f"({' '.join(QUICK_ARGS)})",
    )
    p.add_argument("--jobs", type=positive_int, default=min(2, os.cpu_count() or 1), help="runs at a time")
    p.add_argument("--data_dir", default="data", help="where the wild pool is written (make data-fashion)")
    p.add_argument(
        "--val_limit",
        type=positive_int,
        default=SELECT_VAL,
        help="labelled validation images on which vitkd_fusion's weights are chosen",
    )
    p.add_argument(
        "--common",
        default="",
        help="options added to every run (e.g. a shorter budget for a test), one shell-quoted string",
    )
    p.add_argument("--teacher_args", default="", help="options added to the teacher's run when it is trained")
    add_size_args(p)
    a = p.parse_args(argv)
    if a.markdown:
        try:
            data = json.loads(Path(a.markdown).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise VitkdInputError(
                f"--markdown {a.markdown}: cannot read it as JSON ({err}); pass a bench-wild summary.json"
            ) from None
        print(markdown(data["rows"] if isinstance(data, dict) else data))
        return
    seeds = list(dict.fromkeys(a.seeds or ([0] if a.quick else [0, 1, 2])))
    out = Path(a.out or ("runs/bench-wild-quick" if a.quick else "runs/bench-wild"))
    teacher_dir = (
        Path(a.teacher_dir) if a.teacher_dir else out / "teacher" if a.out else Path("runs/bench-wild/teacher")
    )
    common = (QUICK_ARGS if a.quick else []) + shlex.split(a.common)  # the user's options come last and win
    selections = needed_selections(a.selections)
    sizes = ["--wild_max", str(a.wild_max), "--val_per_class", str(a.val_per_class)]
    common += [f"--data.init_args.{k[2:]}" if i % 2 == 0 else k for i, k in enumerate(sizes)]
    find_fashion_dir()  # a missing data set is named before anything runs
    out.mkdir(parents=True, exist_ok=True)

    def pool() -> dict:
        t0 = time.time()
        run_logged(
            [
                sys.executable,
                "-m",
                "data_modules.fashion_pool",
                "--data_dir",
                a.data_dir,
                *sizes,
                "--ood_scale",
                str(a.ood_scale),
            ],
            out / "pool.log",
            "writing the wild pool",
        )
        meta_path = (
            pool_dir(a.data_dir, 0, {"wild_max": a.wild_max, "val_per_class": a.val_per_class}, a.ood_scale)
            / "meta.json"
        )
        meta = json.loads(meta_path.read_text())
        shards = min(meta["shards"], QUICK_SHARDS) if a.quick else meta["shards"]
        urls = shard_url(meta_path.parent, shards, "wild")
        k1 = meta["sources"]["fashion"] if not a.quick else _count_source(meta_path.parent, shards, "fashion")
        print(f"  wild pool: {time.time() - t0:.0f}s, {urls}, k1 = {k1}", flush=True)
        return {"urls": urls, "k1": k1}

    t0 = time.time()
    print(
        f"teacher, wild pool, {len(SELECTIONS)} selections x 2 kept sizes, students x {len(seeds)} seeds; "
        f"{a.jobs} at a time",
        flush=True,
    )

    def val(folder: Path) -> str:
        return write_val_shards(folder, a.val_limit, a.wild_max, a.val_per_class)

    done = run_graph(
        bench_jobs(
            out, seeds, pool, common, shlex.split(a.teacher_args), val, teacher_dir=teacher_dir, selections=selections
        ),
        a.jobs,
    )
    teacher_s = done["teacher"].get("train_s", 0.0)
    rows = summary_rows(done, seeds, num_test_images(), selections)
    wall = time.time() - t0 - teacher_s
    meta = {
        "machine": machine(),
        "wall_s": wall,
        "teacher_train_s": teacher_s or None,
        "teacher_reused": done["teacher"]["reused"],
        "seeds": seeds,
        "quick": a.quick,
        "fusion_choice": done.get("choose_fusion", {}).get("weights"),
        "pool": done["pool"],
        "teacher_dir": str(teacher_dir),
    }
    write_json(out / "summary.json", rows)
    write_json(out / "run_info.json", meta)
    # one file to commit under benchmarks/results/: the machine, the date, the rows
    write_json(
        out / "results.json", {"benchmark": "bench-wild", "date": time.strftime("%Y-%m-%d"), **meta, "rows": rows}
    )
    print(table(rows))
    print(f"plot: {plot(rows, out)}")
    teacher_note = "reused" if meta["teacher_reused"] else f"trained in {teacher_s:.0f}s, not counted"
    print(
        f"bench-wild finished in {wall:.0f}s on {meta['machine']} (teacher {teacher_note}); "
        f"table in {out / 'summary.json'}"
    )


def _count_source(folder: Path, shards: int, src: str) -> int:
    """Samples tagged ``src`` in the first ``shards`` shards of a pool (read from the tar members)."""
    return sum(
        1
        for s in raw_samples(expand_urls(shard_url(folder, shards, "wild")), split_by_worker=False)
        if read_str(s) == src
    )


if __name__ == "__main__":
    demo_main(main)
