"""``make docs``: the result tables of README.md and docs/*.md, generated from the committed results JSON.

    python -m vitkd.demos.tables            # rewrite every generated table in place
    python -m vitkd.demos.tables --check    # exit 1, naming the stale pages, when a table differs from its JSON

A generated table sits between two markers, each on a line of its own; the first names the table and the
results JSON it is made from, relative to the repository root::

    <!-- table: generator-sweep benchmarks/results/generator-sweep/<file>.json -->
    | teacher | generator steps | ... |
    <!-- /table -->

Everything between the markers is replaced by ``TABLES[name](json)``; the rest of the page is left as it is.
Numbers are only ever read from the JSON, never typed into a page.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from vitkd.errors import OneLineParser, VitkdInputError, demo_main

PAGES = ("README.md", "docs/*.md")
MARKER = re.compile(
    r"^<!-- table: (?P<name>[\w-]+) (?P<source>\S+) -->\n(?P<body>.*?)^<!-- /table -->", re.DOTALL | re.MULTILINE
)
OPEN = re.compile(r"^<!-- table:", re.MULTILINE)


def md_table(header: Sequence[str], rows: Iterable[Sequence[str]], right: Sequence[int] = ()) -> str:
    """A Markdown table; columns whose index is in ``right`` are right-aligned."""
    rule = "|".join("---:" if i in right else "---" for i in range(len(header)))
    lines = ["| " + " | ".join(header) + " |", f"|{rule}|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def pct_spread(mean: float, std: float, seeds: int) -> str:
    """Percent, with ± the sample std when there are several seeds."""
    return f"{100 * mean:.2f} ± {100 * std:.2f}" if seeds > 1 else f"{100 * mean:.2f}"


def frac(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def rate(x: float) -> str:
    return f"{x:,.0f}"


def ratio(x: float) -> str:
    return f"{x:.2f}×"


# -- wild-data selection: the Fashion-MNIST benchmark -------------------------------------------------------
def _kept(r: dict) -> str:
    return f"{r['num_keep']:,} ({r['kept_size']})" if r.get("num_keep") is not None else "–"


def bench_wild(res: dict) -> str:
    """Every row of the benchmark (the same table as ``python -m vitkd.demos.bench_wild --markdown``)."""
    rows = [
        (
            r["run"],
            _kept(r),
            pct_spread(r["test_acc_mean"], r["test_acc_std"], r["seeds"]),
            str(r["seeds"]),
            frac(r.get("precision")),
            frac(r.get("recall")),
            frac(r.get("precision_max")),
            frac(r.get("value_auroc")),
        )
        for r in res["rows"]
    ]
    header = ("run", "kept", "test acc (%), mean ± std", "seeds", "precision", "recall", "precision max", "V AUROC")
    return md_table(header, rows, right=(1, 3, 4, 5, 6, 7))


def bench_wild_short(res: dict) -> str:
    """The original-data rows and the selections at k1 (the pool's in-distribution count)."""
    rows = [
        (
            r["run"],
            _kept(r),
            pct_spread(r["test_acc_mean"], r["test_acc_std"], r["seeds"]),
            frac(r.get("precision")),
            frac(r.get("value_auroc")),
        )
        for r in res["rows"]
        if r.get("kept_size") in (None, "k1")
    ]
    return md_table(("run", "kept", "student test acc (%)", "precision", "V AUROC"), rows, right=(1, 3, 4))


def fusion_grid(res: dict) -> str:
    """The 15 term subsets of ``vitkd_fusion``: the criterion that chose one, then the pool-tag diagnosis."""
    tags = {tuple(sorted(r["weights"])): r for r in res["fusion_grid_on_pool_tags"]["rows"]}
    grid = sorted(res["fusion_choice"]["grid"], key=lambda g: -g["kept_share"])
    rows = []
    for g in grid:
        terms = tuple(sorted(k for k, w in g["weights"].items() if w))
        t = tags[terms]
        rows.append((", ".join(terms), f"{g['kept_share']:.3f}", frac(t["precision_k1"]), frac(t["auroc"])))
    num_val = res["fusion_choice"]["num_val"]
    header = (
        "terms (weight 1 each)",
        f"kept share of the {num_val:,} val images (the criterion)",
        "precision at k1 (pool tags; diagnosis only)",
        "AUROC (pool tags)",
    )
    return md_table(header, rows, right=(1, 2, 3))


# -- data-free generators -------------------------------------------------------------------------------------
TEACHERS = {"vit": "ViT", "cnn": "LeNet-5 CNN control"}


def generator_sweep(res: dict) -> str:
    """DAFL at its reference settings, per teacher and generator-step budget."""
    rows = []
    for r in sorted(res["rows"], key=lambda r: (r["teacher"] != "vit", r["generator_steps"])):
        t = res["teachers"][r["teacher"]]
        rows.append(
            (
                f"{TEACHERS.get(r['teacher'], r['teacher'])} ({pct(t['test_acc'])}%)",
                f"{r['generator_steps']:,}",
                str(r["seeds"]),
                pct_spread(r["test_acc_mean"], r["test_acc_std"], r["seeds"]),
                frac(r["final_val_agree_train_mode"]),
                frac(r["final_val_agree_eval_mode"]),
                f"{r['s_per_generator_step']:.2f}",
            )
        )
    header = (
        "teacher (test acc)",
        "generator steps",
        "seeds",
        "student test acc (%)",
        "val/agree, G train mode",
        "val/agree, G eval mode",
        "s / step",
    )
    return md_table(header, rows, right=(1, 2, 6))


def generator_variants(res: dict) -> str:
    """The transformer-generator designs, compared on the labelled validation split; the chosen one in bold."""
    rows = []
    for r in res["rows"]:
        name = f"**{r['variant']} (chosen)**" if r["variant"] == res["chosen"] else r["variant"]
        rows.append((name, r["what"], pct(r["labelled_val_acc_mean"]), pct(r["test_acc_mean"])))
    return md_table(("variant", "what", "labelled val (%)", "test (%)"), rows, right=(2, 3))


def generator_throughput(res: dict) -> str:
    """Distilled images/s of one DAFL step: reference-style loop, vitkd's joint and fast synthesizers."""
    g = res["generator"]
    ref = g["reference"]["images_per_s"]
    rows = [
        ("reference-style DAFL (`benchmarks.reference.ReferenceDAFL`)", rate(ref), ratio(1.0)),
        (
            "vitkd, joint synthesizer (the stage through the CLI)",
            rate(g["vitkd_joint"]["distilled_images_per_s"]),
            ratio(g["speedup_joint"]),
        ),
        ("vitkd, fast synthesizer", rate(g["vitkd_fast"]["distilled_images_per_s"]), ratio(g["speedup_fast"])),
    ]
    return md_table(("loop", "distilled images/s", "vs reference"), rows, right=(1, 2))


# -- speed: make bench ------------------------------------------------------------------------------------------
def _target(res: dict, key: str) -> str:
    t = res.get("targets", {}).get(key)
    if not t or "met" not in t:
        return ""
    if "fraction" in key:  # a share of the machine's peak
        return f"≥ {100 * t['target']:.0f}% of peak ({'met' if t['met'] else 'missed'})"
    bound = f"≤ {t['target_max']}×" if "target_max" in t else f"≥ {t['target']}×"
    return f"{bound} ({'met' if t['met'] else 'missed'})"


PRECISIONS = {
    "bf16_true_compiled": "bf16-true + compile",
    "bf16_true": "bf16-true",
    "bf16": "bf16 autocast",
    "fp32": "fp32",
}


def _variants(s: dict, batch: int) -> str:
    return " / ".join(
        f"{rate(s[f'vitkd_{k}_b{batch}']['images_per_s'])} {label}"
        for k, label in PRECISIONS.items()
        if f"vitkd_{k}_b{batch}" in s
    )


def bench_speed(res: dict) -> str:
    """The headline figures of one ``make bench`` run: selector, distillation step and large selections."""
    rows = []
    for name, s in res.get("selector", {}).items():
        b = s["vitkd_batch"]
        head = name == res["headline_preset"]
        # results before the peak-share targets judged the selector's ratio
        target = _target(res, "selector_speedup_ratio") or _target(res, "selector_fraction_of_peak") if head else ""
        rows.append(
            (
                f"selector, {name} presets, batch {b}",
                _variants(s, b),
                rate(s["reference"]["images_per_s"]),
                ratio(s["speedup_ratio"]),
                target,
            )
        )
    for name, d in res.get("distill", {}).items():
        head = name == res["headline_preset"]
        ref = rate(d["reference"]["images_per_s"])
        rows.append(
            (
                f"distillation step, {name} presets, batch {d['batch']}, teacher-output cache amortised",
                rate(d["vitkd_best"]["images_per_s"]),
                ref,
                ratio(d["speedup_ratio"]),
                _target(res, "distill_speedup_ratio") if head else "",
            )
        )
        cached = max(("fp32", "bf16"), key=lambda k: d[f"vitkd_{k}_cached_teacher"]["images_per_s"])
        rows.append(
            (
                f"the same, cache warm ({cached})",
                rate(d[f"vitkd_{cached}_cached_teacher"]["images_per_s"]),
                ref,
                ratio(d["speedup_ratio_cached_teacher"]),
                "",
            )
        )
        rows.append(
            (
                f"the same, teacher run every step ({d['teacher_every_step_best_config'].split(',')[0]})",
                rate(d["vitkd_teacher_every_step_best"]["images_per_s"]),
                ref,
                ratio(d["speedup_ratio_teacher_every_step"]),
                " ".join(
                    filter(
                        None,
                        (
                            _target(res, "distill_speedup_ratio_teacher_every_step"),
                            _target(res, "distill_every_step_fraction_of_peak"),
                        ),
                    )
                )
                if head
                else "",
            )
        )
    sc = res.get("scale", {})
    for n in ("100000", "1000000"):
        if n in sc:
            rows.append(
                (
                    f"selection through the CLI, {int(n):,} wild images, peak RSS {sc[n]['peak_rss_mb']:,.0f} MB",
                    rate(sc[n]["images_per_s"]),
                    "",
                    "",
                    "",
                )
            )
    if "memory_ratio_1m_over_100k" in sc:
        rows.append(
            (
                "peak RSS, 1M over 100k images",
                "",
                "",
                ratio(sc["memory_ratio_1m_over_100k"]),
                _target(res, "scale_memory_ratio_1m_over_100k"),
            )
        )
    return md_table(("figure", "vitkd img/s", "reference img/s", "ratio", "target"), rows, right=(2, 3))


def bench_scale(res: dict) -> str:
    """Every selection the scale benchmark ran through the CLI: its size, extra arguments, speed and memory."""
    sc = res["scale"]
    rows = [
        (
            f"{int(k.split('_')[0]):,}",
            f"`{sc[k]['args']}`" if sc[k].get("args") else "(the config's)",
            rate(sc[k]["images_per_s"]),
            f"{sc[k]['wall_s']:,.0f}",
            f"{sc[k]['peak_rss_mb']:,.0f}",
        )
        for k in sorted((k for k in sc if k.split("_")[0].isdigit()), key=lambda k: (int(k.split("_")[0]), k))
    ]
    return md_table(("wild images", "arguments", "images/s", "wall s", "peak RSS (MB)"), rows, right=(0, 2, 3, 4))


def bench_peak(res: dict) -> str:
    """The measured matmul peaks and the share of the peak each loop reaches at the precision it runs at (results
    before that was recorded: the share of the bf16 peak)."""
    peaks = " / ".join(f"{res['peak'][k]['flop_per_s'] / 1e9:,.0f}" for k in ("bf16", "fp32"))
    rows = [("bf16 / fp32 matmul peak (GFLOP/s)", peaks, "")]

    def share(f: dict, key: str) -> str:
        if f"{key}_fraction_of_peak" not in f:
            return pct(f[f"{key}_fraction_of_bf16_peak"]) + "%"
        return f"{pct(f[f'{key}_fraction_of_peak'])}% ({f[f'{key}_peak_precision']})"

    for name, f in res.get("flops", {}).items():
        per = "the peak at its precision" if "selector_vitkd_fraction_of_peak" in f else "the bf16 peak"
        for what in ("selector", "distill"):
            rows.append(
                (
                    f"{what}, {name} presets: share of {per}",
                    share(f, f"{what}_vitkd"),
                    share(f, f"{what}_reference"),
                )
            )
    return md_table(("figure", "vitkd", "reference"), rows, right=(1, 2))


def bench_digits(res: dict) -> str:
    """The digits-demo levers: the teacher's forward in bf16, the distillation step's precisions, the memory cache."""
    d = res["distill"]["digits"]
    fp32, bf16 = d["vitkd_fp32"]["images_per_s"], d["vitkd_bf16"]["images_per_s"]
    rows = [
        (
            f"frozen teacher forward, batch {d['batch']}",
            rate(d["teacher_forward_fp32"]["images_per_s"]),
            rate(d["teacher_forward_bf16"]["images_per_s"]),
            ratio(d["teacher_forward_bf16"]["images_per_s"] / d["teacher_forward_fp32"]["images_per_s"]),
        ),
        ("distillation step, teacher every step (student fp32 / all bf16)", rate(fp32), rate(bf16), ratio(bf16 / fp32)),
    ]
    if "vitkd_fp32_teacher_bf16" in d:
        tb = d["vitkd_fp32_teacher_bf16"]["images_per_s"]
        rows.append(
            (
                "distillation step, fp32 student, teacher alone in bf16 (`teacher_bf16`)",
                rate(fp32),
                rate(tb),
                ratio(tb / fp32),
            )
        )
    st = res.get("stream")
    if st:
        plain, mem = st["plain"]["images_per_s_per_epoch"], st["memory_cache"]["images_per_s_per_epoch"]
        rows.append(
            (
                f"shard stream, {st['samples']:,} samples, epoch 2 (tar + PNG / `memory_cache`)",
                rate(plain[1]),
                rate(mem[1]),
                ratio(st["speedup_epoch_2_on"]),
            )
        )
    return md_table(("figure", "img/s without the lever", "img/s with it", "ratio"), rows, right=(1, 2, 3))


# -- the digits demo --------------------------------------------------------------------------------------------
def _acc(r: dict) -> str:
    return (
        f"{pct(r['test_acc_mean'])} (1 run)"
        if r["seeds"] == 1
        else pct_spread(r["test_acc_mean"], r["test_acc_std"], r["seeds"])
    )


def digits_demo(res: dict) -> str:
    """Every row of ``make demo``: the data each student used, per-seed accuracies, and what bounds a selection."""
    rows = []
    for r in res["rows"]:
        seeds = ", ".join(pct(a) for a in r.get("test_accs", [])) or "–"
        kept = f" ({r['num_kept']:,} kept)" if r.get("num_kept") is not None else ""
        rows.append(
            (
                r["run"],
                r["data"] + kept,
                f"{r['params']:,}",
                seeds,
                _acc(r),
                frac(r.get("precision")),
                frac(r.get("precision_max")),
                frac(r.get("value_auroc")),
            )
        )
    header = (
        "run",
        "data used",
        "params",
        "test acc (%) per seed",
        "mean ± std",
        "precision",
        "precision max",
        "V AUROC",
    )
    return md_table(header, rows, right=(2, 5, 6, 7))


def digits_demo_short(res: dict) -> str:
    """The demo's rows: the data each run trains on, its test accuracy and its selection's precision."""
    rows = [(r["run"], r["data"], _acc(r), frac(r.get("precision"))) for r in res["rows"]]
    return md_table(("run", "data the student trains on", "test acc (%)", "selection precision"), rows, right=(3,))


def _map(r: dict, key: str) -> str:
    spread = f" ± {r[key + '_std']:.3f}" if r.get("seeds", 1) > 1 else " (1 run)"
    return f"{r[key]:.3f}{spread}"


def detection_demo(res: dict) -> str:
    """``make demo-detection``: each row's test mAP and mAP@50 (mean ± sample std over its seeds) and cost."""
    rows = [
        (
            r["run"],
            r["what"],
            _map(r, "map"),
            _map(r, "map50"),
            f"{r['params'] / 1e6:.2f}M",
            f"{r['gflops']:.3f}",
            rate(r["images_per_s"]),
        )
        for r in res["rows"]
    ]
    header = ("run", "what it learns from", "test mAP", "test mAP@50", "params", "GFLOPs", "images/s")
    return md_table(header, rows, right=(2, 3, 4, 5, 6))


TABLES: dict[str, Callable[[dict], str]] = {
    "detection-demo": detection_demo,
    "digits-demo": digits_demo,
    "digits-demo-short": digits_demo_short,
    "bench-wild": bench_wild,
    "bench-wild-short": bench_wild_short,
    "fusion-grid": fusion_grid,
    "generator-sweep": generator_sweep,
    "generator-variants": generator_variants,
    "generator-throughput": generator_throughput,
    "bench-speed": bench_speed,
    "bench-scale": bench_scale,
    "bench-peak": bench_peak,
    "bench-digits": bench_digits,
}


# -- the pages ----------------------------------------------------------------------------------------------------
def pages(root: Path) -> list[Path]:
    """README.md and docs/*.md under ``root``, in a fixed order."""
    return sorted(p for pattern in PAGES for p in root.glob(pattern))


def render(text: str, root: Path, where: str) -> str:
    """``text`` with every generated table rewritten from its JSON (``where`` names the page in errors)."""
    found = MARKER.findall(text)
    if len(found) != len(OPEN.findall(text)):
        raise VitkdInputError(
            f"{where}: a '<!-- table: NAME SOURCE -->' marker lacks its name, its JSON or its '<!-- /table -->'"
        )

    def table(m: re.Match) -> str:
        name, source = m["name"], m["source"]
        if name not in TABLES:
            raise VitkdInputError(f"{where}: unknown table {name!r}; use one of {', '.join(TABLES)}")
        path = root / source
        try:
            res = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise VitkdInputError(
                f"{where}: table {name} reads {source}, which is not readable JSON ({err}); commit it or fix the marker"
            ) from None
        try:
            body = TABLES[name](res)
        except (KeyError, TypeError) as err:
            raise VitkdInputError(
                f"{where}: table {name}: {source} lacks the field {err}; pass a results JSON of that kind"
            ) from None
        return f"<!-- table: {name} {source} -->\n{body}\n<!-- /table -->"

    return MARKER.sub(table, text)


def update(root: Path, check: bool = False) -> list[str]:
    """Rewrite (with ``check``: only compare) every page's generated tables; return the stale pages, relative
    to ``root``."""
    stale = []
    for page in pages(root):
        rel = page.relative_to(root).as_posix()
        text = page.read_text()
        new = render(text, root, rel)
        if new != text:
            stale.append(rel)
            if not check:
                page.write_text(new)
    return stale


def main(argv: list[str] | None = None) -> None:
    p = OneLineParser(prog="python -m vitkd.demos.tables", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--check", action="store_true", help="change nothing; exit 1 when a page's table differs from its JSON"
    )
    p.add_argument(
        "--root", type=Path, default=Path("."), help="the repository root (README.md, docs/, benchmarks/results/)"
    )
    a = p.parse_args(argv)
    if not (a.root / "README.md").is_file():
        raise VitkdInputError(f"--root {a.root}: no README.md there; run from the repository root or pass --root")
    stale = update(a.root, check=a.check)
    if a.check and stale:
        sys.exit(f"vitkd: stale generated tables in {', '.join(stale)}: run `python -m vitkd.demos.tables` (make docs)")
    if not a.check:
        print(f"rewrote {', '.join(stale)}" if stale else "every generated table is up to date")


if __name__ == "__main__":
    demo_main(main)
