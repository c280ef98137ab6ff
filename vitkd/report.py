"""Compare runs: ``python -m vitkd.report RUN_DIR... [--out DIR]``.

Finds every ``metrics.json`` under the given directories (recursively), groups ``seedN`` directories of one
run into one row (mean ± std over seeds), and writes to ``--out`` (default: ``<common parent of the
RUN_DIRs>/comparison``):

* ``report.md`` — the comparison table (Markdown); ``report.csv`` — the same rows with mean, std and the
  per-seed run directories;
* ``accuracy_vs_params.png`` — test accuracy against parameters (error bars: std over seeds);
* ``accuracy_vs_flops.png`` — test accuracy against GFLOPs per image (when runs recorded FLOPs);
* ``training_curves.png`` — validation metric against epoch and training loss against step, from each
  run's ``metrics.csv`` (one colour per row, one line per seed).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitkd.errors import OneLineParser, VitkdInputError
from vitkd.io import atomic_path, write_text
from vitkd.plotting import pyplot

SEED_DIR = re.compile(r"seed\d+")
# (metrics.json key, table header, format): the columns of the table, shown when some run has the key
COLUMNS = [
    ("test/acc", "test acc (%)", "pct"),
    ("best_val/acc", "best val acc (%)", "pct"),
    ("best_val/agree", "best val agree (%)", "pct"),
    ("params", "params", "int"),
    ("gflops", "GFLOPs", "g"),
    ("images_per_s", "images/s", "int"),
    ("precision", "precision", "f3"),
    ("recall", "recall", "f3"),
    ("precision_max", "precision max", "f3"),
    ("value_auroc", "V AUROC", "f3"),
    ("pseudo_label_acc", "pseudo-label acc", "f3"),
    ("num_kept", "kept", "int"),
    ("epochs", "epochs", "int"),
]
VAL_KEYS = ("val/acc", "val/agree")
LOSS_KEYS = ("train/loss", "train/loss_s")


@dataclass
class Row:
    """One compared run: a run directory, or its ``seedN`` directories together."""

    name: str
    runs: list[Path]
    metrics: list[dict[str, Any]]
    stage: str = ""
    values: dict[str, list[float]] = field(default_factory=dict)

    def mean(self, key: str) -> float | None:
        v = self.values.get(key)
        return statistics.fmean(v) if v else None

    def std(self, key: str) -> float | None:
        v = self.values.get(key)
        return statistics.stdev(v) if v and len(v) > 1 else (0.0 if v else None)


def find_runs(dirs: list[Path]) -> list[Path]:
    """Run directories (holding ``metrics.json``) under ``dirs``, sorted; files among ``dirs`` are skipped."""
    found: set[Path] = set()
    for d in dirs:
        if not d.exists():
            raise VitkdInputError(
                f"run directory {d} does not exist: pass directories written by `python -m vitkd.fit`"
            )
        if d.is_dir():
            found.update(p.parent for p in d.rglob("metrics.json"))
    if not found:
        raise VitkdInputError(
            f"no metrics.json under {', '.join(map(str, dirs))}: pass run directories written by `python -m vitkd.fit`"
        )
    return sorted(found)


def read_metrics(path: Path) -> dict[str, Any]:
    """A run's ``metrics.json``; one line naming the file when it is not a JSON object of figures."""
    try:
        metrics = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise VitkdInputError(f"{path} is not valid JSON ({err}): rerun that run, or leave its folder out") from None
    if not isinstance(metrics, dict):
        raise VitkdInputError(
            f"{path} is not a JSON object of figures: pass run directories written by `python -m vitkd.fit`"
        )
    return metrics


def common_parent(paths: list[Path]) -> Path:
    parts = [p.resolve().parts for p in paths]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    path = Path(*common) if common else Path(".").resolve()
    return path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path


def _stage(run: Path) -> str:
    cfg = run / "config.yaml"
    if not cfg.is_file():
        return ""
    import yaml

    try:
        model = (yaml.safe_load(cfg.read_text()) or {}).get("model") or {}
    except yaml.YAMLError:
        return ""
    return str(model.get("class_path", "")).rsplit(".", 1)[-1]


def collect(dirs: list[Path]) -> list[Row]:
    """Rows of the comparison, named relative to the common parent of ``dirs``; seed directories grouped."""
    runs = find_runs(dirs)
    base = common_parent([d for d in dirs if d.is_dir()]).resolve()
    groups: dict[Path, list[Path]] = {}
    for r in runs:
        key = r.parent if SEED_DIR.fullmatch(r.name) else r
        groups.setdefault(key, []).append(r)
    rows = []
    for key, members in groups.items():
        rel = key.resolve().relative_to(base) if key.resolve().is_relative_to(base) else key
        name = str(rel) if str(rel) != "." else key.name
        metrics = [read_metrics(m / "metrics.json") for m in members]
        row = Row(name=name, runs=members, metrics=metrics, stage=_stage(members[0]))
        for k, _, _ in COLUMNS:
            vals = [
                float(m[k]) for m in metrics if isinstance(m.get(k), (int, float)) and not isinstance(m.get(k), bool)
            ]
            if vals:
                row.values[k] = vals
        rows.append(row)
    return rows


def _fmt(mean: float | None, std: float | None, kind: str, n: int) -> str:
    if mean is None:
        return "–"
    if kind == "pct":
        return f"{100 * mean:.2f} ± {100 * std:.2f}" if n > 1 else f"{100 * mean:.2f}"
    if kind == "int":
        return f"{mean:,.0f}"
    if kind == "g":
        return f"{mean:.4g}"
    return f"{mean:.3f} ± {std:.3f}" if n > 1 and std else f"{mean:.3f}"


def markdown_table(rows: list[Row]) -> str:
    cols = [c for c in COLUMNS if any(c[0] in r.values for r in rows)]
    head = ["run", "stage", "seeds", *[h for _, h, _ in cols]]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * len(cols)) + "|"]
    for r in rows:
        cells = [r.name, r.stage or "–", str(len(r.runs))]
        cells += [_fmt(r.mean(k), r.std(k), kind, len(r.values.get(k, []))) for k, _, kind in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def csv_text(rows: list[Row]) -> str:
    cols = [c for c in COLUMNS if any(c[0] in r.values for r in rows)]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["run", "stage", "seeds", *[f"{k}_{s}" for k, _, _ in cols for s in ("mean", "std")], "run_dirs"])
    for r in rows:
        vals = []
        for k, _, _ in cols:
            m, s = r.mean(k), r.std(k)
            vals += ["" if m is None else repr(m), "" if s is None else repr(s)]
        w.writerow([r.name, r.stage, len(r.runs), *vals, ";".join(str(p) for p in r.runs)])
    return buf.getvalue()


# -- plots ------------------------------------------------------------------------------------------
def _save(fig, path: Path) -> Path:
    plt = pyplot()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def _human(v: float) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= scale:
            return f"{v / scale:.3g}{suffix}"
    return f"{v:.3g}"


def plot_accuracy(rows: list[Row], x_key: str, x_label: str, path: Path) -> Path | None:
    """Test accuracy (mean ± std over seeds) against ``x_key``; None when no row has both."""
    pts = [r for r in rows if r.mean("test/acc") is not None and r.mean(x_key) is not None]
    if not pts:
        return None
    plt = pyplot()
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig, ax = plt.subplots(figsize=(8.4, 4.4))
    colors = plt.get_cmap("tab10" if len(pts) <= 10 else "tab20")
    markers = "osD^vPX*<>"
    for i, r in enumerate(pts):
        ax.errorbar(
            r.mean(x_key),
            100 * r.mean("test/acc"),
            yerr=100 * (r.std("test/acc") or 0.0),
            fmt=markers[i % len(markers)],
            color=colors(i % colors.N),
            capsize=3,
            markersize=7,
            label=f"{r.name} (n={len(r.values['test/acc'])})",
        )
    xs = [r.mean(x_key) for r in pts]
    if min(xs) > 0 and max(xs) / min(xs) > 3:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: _human(v)))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(x_label)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"test accuracy against {x_label} (mean ± std over seeds)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return _save(fig, path)


def read_curves(run: Path) -> dict[str, tuple[str, list[float], list[float]]]:
    """From ``metrics.csv``: ``val`` = (key, epochs, validation metric), ``loss`` = (key, steps, training loss)."""
    path = run / "metrics.csv"
    if not path.is_file():
        return {}
    with path.open() as f:
        rows = list(csv.DictReader(f))
    header = set(rows[0]) if rows else set()
    out = {}
    for keys, x_key, name in ((VAL_KEYS, "epoch", "val"), (LOSS_KEYS, "step", "loss")):
        key = next((k for k in keys if k in header), None)
        if key is None:
            continue
        pts = [
            (float(r[x_key]), float(r[key]))
            for r in rows
            if r.get(key) not in (None, "") and r.get(x_key) not in (None, "")
        ]
        pts = [p for p in pts if math.isfinite(p[1])]
        if pts:
            out[name] = (key, [p[0] for p in pts], [p[1] for p in pts])
    return out


def plot_curves(rows: list[Row], path: Path) -> Path | None:
    """Validation metric per epoch and training loss per step: one colour per row, one line per seed."""
    curves = [(r, c) for r in rows for c in [read_curves(m) for m in r.runs] if c]
    if not curves:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    names = list(dict.fromkeys(r.name for r, _ in curves))
    colors = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    labelled: set[str] = set()
    keys: dict[str, set[str]] = {"val": set(), "loss": set()}
    for r, c in curves:
        color = colors(names.index(r.name) % colors.N)
        for name, ax in zip(("val", "loss"), axes):
            if name in c:
                key, x, y = c[name]
                keys[name].add(key)
                label = None if r.name in labelled else r.name
                labelled.add(r.name)
                ax.plot(x, y, color=color, lw=1.0, alpha=0.8, label=label, marker="." if len(x) < 30 else None)
    for ax, name, x_label, title in zip(
        axes, ("val", "loss"), ("epoch", "step"), ("validation (chooses the best checkpoint)", "training loss")
    ):
        ax.set_xlabel(x_label)
        ax.set_ylabel(" / ".join(sorted(keys[name])) or name)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    if axes[1].lines and all(y > 0 for ln in axes[1].lines for y in ln.get_ydata()):
        axes[1].set_yscale("log")
    handles = [h for ax in axes for h in ax.get_legend_handles_labels()[0]]
    labels = [lb for ax in axes for lb in ax.get_legend_handles_labels()[1]]
    fig.legend(handles, labels, loc="center right", fontsize=7)
    fig.tight_layout(rect=(0, 0, 0.83, 1))
    return _save(fig, path)


def report(dirs: list[Path], out: Path | None = None) -> dict[str, Path]:
    """Write the comparison of the runs under ``dirs`` into ``out``; returns the written files by name."""
    rows = collect(dirs)
    out = out if out is not None else common_parent([d for d in dirs if d.is_dir()]) / "comparison"
    if out.exists() and not out.is_dir():
        raise VitkdInputError(f"--out {out} is a file: pass a folder (it is created if missing)")
    written = {}
    listed = ", ".join(f"`{d}`" for d in dirs if d.is_dir())
    md = f"# Run comparison\n\nRuns under {listed}; mean ± std over `seedN` runs.\n\n" + markdown_table(rows)
    write_text(out / "report.md", md)
    written["report.md"] = out / "report.md"
    write_text(out / "report.csv", csv_text(rows))
    written["report.csv"] = out / "report.csv"
    for name, path in (
        ("accuracy_vs_params.png", plot_accuracy(rows, "params", "parameters", out / "accuracy_vs_params.png")),
        ("accuracy_vs_flops.png", plot_accuracy(rows, "gflops", "GFLOPs per image", out / "accuracy_vs_flops.png")),
        ("training_curves.png", plot_curves(rows, out / "training_curves.png")),
    ):
        if path is not None:
            written[name] = path
    return written


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(
        prog="python -m vitkd.report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("run_dirs", nargs="+", type=Path, help="run directories, or folders of them (searched recursively)")
    p.add_argument(
        "--out", type=Path, default=None, help="output folder (default: <common parent of RUN_DIRs>/comparison)"
    )
    a = p.parse_args(argv)
    try:
        written = report(a.run_dirs, a.out)
    except VitkdInputError as err:
        print(f"vitkd: error: {err}", file=sys.stderr)
        return 2
    print(Path(written["report.md"]).read_text())
    for path in written.values():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
