"""What a selection kept: score histograms, precision per source and the teacher's view (Fig. 3).

``SelectionReport.on_selection_end(trainer, pl_module, result)`` is called by the selector once
``run_dir/scores.csv`` and ``run_dir/selected/`` are written, with a ``vitkd.selection.result.SelectionResult``:
the tallies and score columns of the pass that wrote ``scores.csv``, and the teacher's outputs for the examples
the report asks for in ``selection_examples``. It reads nothing back from disk and writes ``run_dir/report/``:

* ``scores.png`` — histograms of each ``va_blk<B>`` column, ``vn`` and ``value`` (Eqs. 4–6) for kept and
  rejected samples (all rows; only the bin counts are plotted);
* ``sources.png`` — per ``src`` tag, the fraction kept and the make-up of the kept set (when tags exist);
* ``embedding.png`` — a 2-D t-SNE (or PCA) of the teacher's softmax outputs for kept, rejected and original
  training samples, as Attention Probe, arXiv 2102.05958, Fig. 3 (a subsample: ``per_group`` of each; wild images
  from the first ``max_scan`` samples of the pool, original ones from the selector's datamodule);
* ``selection.json`` — counts, keep rate and share of the kept set per source; precision, recall,
  ``precision_max`` and ``precision_random`` against the selector's ``positive_sources`` (none when it names
  none), as in ``metrics.json``; mean scores kept vs rejected.

The figures are also sent to W&B/TensorBoard when those loggers are on (rank 0 only).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from callbacks._images import log_image, save_png
from vitkd.io import atomic_dir, write_json
from vitkd.plotting import figure_to_array, pyplot
from vitkd.selection.examples import ExampleRequest
from vitkd.selection.metrics import source_precision
from vitkd.selection.result import SelectionResult

SCORE_PREFIXES = ("va_blk", "vn", "value")


def score_columns(columns: Mapping[str, np.ndarray]) -> list[str]:
    """The score columns the report shows (each ``va_blk<B>``, ``vn``, ``value``), in the order given."""
    return [c for c in columns if c.startswith(SCORE_PREFIXES)]


def source_summary(scored: Mapping[str, int], kept: Mapping[str, int], positive_sources: list[str]) -> dict[str, Any]:
    """Per-source counts (samples ``scored`` and ``kept`` per ``src`` tag, ``""`` = untagged), keep rate and share
    of the kept set; precision, recall and their bounds against ``positive_sources``
    (``vitkd.selection.metrics.source_precision``, the figures of ``metrics.json``)."""
    out: dict[str, Any] = {"num_scored": int(sum(scored.values())), "num_kept": int(sum(kept.values()))}
    names = sorted(s for s, n in scored.items() if n)
    if not any(names):
        return out
    scored_n = {s: int(scored[s]) for s in names}
    kept_n = {s: int(kept.get(s, 0)) for s in names}
    pos = set(positive_sources)
    out["positive_sources"] = sorted(pos)
    out["by_source"] = {
        s: {
            "scored": scored_n[s],
            "kept": kept_n[s],
            "keep_rate": kept_n[s] / max(1, scored_n[s]),
            "share_of_kept": kept_n[s] / max(1, out["num_kept"]),
            "positive": s in pos,
        }
        for s in names
    }
    figures = source_precision(scored_n, kept_n, positive_sources)
    # by_source has the counts
    out.update({k: v for k, v in figures.items() if k not in ("scored_by_source", "kept_by_source")})
    return out


def _mean(v: np.ndarray) -> float | None:
    """Mean of the scores ``v`` (float64), NaN left out; None for no sample."""
    return float(np.nanmean(v, dtype=np.float64)) if len(v) else None


def plot_histograms(columns: Mapping[str, np.ndarray], selected: np.ndarray, bins: int = 60) -> np.ndarray:
    """One panel per score column (``score_columns``): density histograms of kept vs rejected (shared bins)."""
    plt = pyplot()
    cols = score_columns(columns)
    kept = np.asarray(selected, dtype=bool)
    fig, axes = plt.subplots(1, len(cols), figsize=(3.4 * len(cols), 2.9), squeeze=False, dpi=100)
    for ax, c in zip(axes[0], cols):
        v = np.asarray(columns[c])
        finite = np.isfinite(v)
        lo, hi = (float(v[finite].min()), float(v[finite].max())) if finite.any() else (0.0, 1.0)
        edges = np.linspace(lo, hi if hi > lo else lo + 1e-6, bins + 1)
        for mask, label, color in ((kept, "kept", "tab:blue"), (~kept, "rejected", "tab:red")):
            counts, _ = np.histogram(v[mask & finite], bins=edges)
            dens = counts / max(1, counts.sum()) / np.diff(edges)
            ax.stairs(dens, edges, fill=True, alpha=0.35, color=color, label=f"{label} ({int(mask.sum())})")
            ax.stairs(dens, edges, color=color)
        if c == "value" and kept.any() and (~kept).any():
            ax.axvline(float(v[kept].max()), color="k", lw=0.8, ls="--", label="threshold")
        ax.set_title(c, fontsize=9)
        ax.set_ylabel("density", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    fig.suptitle("selection scores: kept vs rejected (low value = kept)", fontsize=9)
    fig.tight_layout()
    return figure_to_array(fig)


def plot_sources(summary: dict[str, Any]) -> np.ndarray:
    """Keep rate per source and the make-up of the kept set; positive sources in blue."""
    plt = pyplot()
    by = summary["by_source"]
    names = list(by)
    colors = ["tab:blue" if by[s]["positive"] else "tab:gray" for s in names]
    fig, axes = plt.subplots(1, 2, figsize=(max(6.0, 1.3 * len(names) + 3), 3.0), dpi=100)
    panels = (
        (axes[0], "keep_rate", "fraction of each source kept"),
        (axes[1], "share_of_kept", "make-up of the kept set"),
    )
    for ax, field, title in panels:
        vals = [by[s][field] for s in names]
        bars = ax.bar(names, vals, color=colors)
        for b, s in zip(bars, names):
            ax.annotate(
                f"{by[s]['kept']}/{by[s]['scored']}" if field == "keep_rate" else f"{by[s][field]:.2f}",
                (b.get_x() + b.get_width() / 2, b.get_height()),
                ha="center",
                va="bottom",
                fontsize=7,
            )
        ax.set_ylim(0, 1.08)
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
    if "precision" in summary:
        title = (
            f"precision {summary['precision']:.3f} of at most {summary['precision_max']:.3f} "
            f"(positive: {', '.join(summary['positive_sources'])}), recall {summary['recall']:.3f}"
        )
    else:
        title = "no positive source named: precision not measured"
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return figure_to_array(fig)


def embed_2d(features: np.ndarray, method: str, seed: int) -> np.ndarray:
    """2-D embedding of (N, D) features: t-SNE (sklearn, PCA init) or PCA."""
    if method == "tsne" and len(features) > 5:
        from sklearn.manifold import TSNE

        perplexity = float(min(30.0, (len(features) - 1) / 3))
        return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(features)
    from sklearn.decomposition import PCA

    return PCA(2, random_state=seed).fit_transform(features)


def plot_embedding(points: dict[str, np.ndarray], method: str, features: str) -> np.ndarray:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.0, 4.4), dpi=100)
    style = {"original": ("tab:green", "o"), "rejected": ("tab:red", "x"), "kept": ("tab:blue", ".")}
    for name in ("original", "rejected", "kept"):
        if name in points and len(points[name]):
            color, marker = style[name]
            p = points[name]
            label = f"{name} ({len(p)})"
            ax.scatter(p[:, 0], p[:, 1], s=9, c=color, marker=marker, alpha=0.6, linewidths=0.6, label=label)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=8, markerscale=2)
    ax.set_title(f"{'t-SNE' if method == 'tsne' else 'PCA'} of the teacher's {features} outputs", fontsize=9)
    fig.tight_layout()
    return figure_to_array(fig)


class SelectionReport(Callback):
    """The selection report (see the module docstring); the selector calls ``on_selection_end``.

    Args:
        enabled: False switches the report off.
        per_group: embedding points per group (kept, rejected, original); the paper's Fig. 3 uses 1,500 images.
        embedding: ``tsne`` (as in the paper) or ``pca`` (faster).
        features: the teacher output embedded: ``softmax`` (as in the paper) or ``pooled`` (pre-logit features).
        max_scan: wild samples read (from the start of the stream) to find kept and rejected ones.
        bins: histogram bins.
        seed: of the subsamples and the embedding.
    """

    def __init__(
        self,
        enabled: bool = True,
        per_group: int = 500,
        embedding: Literal["tsne", "pca"] = "tsne",
        features: Literal["softmax", "pooled"] = "softmax",
        max_scan: int = 5000,
        bins: int = 60,
        seed: int = 0,
    ):
        self.enabled, self.per_group, self.embedding, self.features = enabled, per_group, embedding, features
        self.max_scan, self.bins, self.seed = max_scan, bins, seed

    @property
    def selection_examples(self) -> ExampleRequest | None:
        """The examples the embedding needs from the selector (none when it is off)."""
        if not self.enabled or self.per_group <= 0:
            return None
        return ExampleRequest(self.per_group, self.max_scan, (self.features,), self.seed)

    @rank_zero_only
    def on_selection_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        result: SelectionResult,
    ) -> dict[str, Any]:
        """Write ``result.run_dir/report/`` from what the selector hands over; returns ``selection.json``'s content."""
        if not self.enabled:
            return {}
        tallies = result.tallies
        summary = source_summary(tallies.scored, tallies.kept, list(result.positive_sources))
        kept = np.asarray(tallies.selected, dtype=bool)
        summary["scores"] = {
            c: {"kept_mean": _mean(tallies.columns[c][kept]), "rejected_mean": _mean(tallies.columns[c][~kept])}
            for c in score_columns(tallies.columns)
        }
        figures = {"scores": plot_histograms(tallies.columns, kept, self.bins)}
        if "by_source" in summary:
            figures["sources"] = plot_sources(summary)
        if self.per_group > 0:
            points = self.embedding_points(result)
            if points:
                counts = {k: len(v) for k, v in points.items()}
                summary["embedding"] = {"method": self.embedding, "features": self.features, "points": counts}
                figures["embedding"] = plot_embedding(points, self.embedding, self.features)
        with atomic_dir(result.run_dir / "report") as tmp:
            for name, image in figures.items():
                save_png(image, tmp / f"{name}.png")
            write_json(tmp / "selection.json", summary)
        for name, image in figures.items():
            log_image(trainer, f"selection/{name}", image, step=trainer.global_step)
        return summary

    # -- Fig. 3 ---------------------------------------------------------------------------------
    def embedding_points(self, result: SelectionResult) -> dict[str, np.ndarray]:
        """2-D points of the teacher's outputs for up to ``per_group`` kept, rejected and original samples."""
        if self.features not in result.examples:
            rank_zero_warn(
                f"SelectionReport: the selection holds no {self.features} outputs of the teacher, "
                "the embedding is skipped"
            )
            return {}
        feats = {k: v[: self.per_group] for k, v in result.examples[self.features].items() if len(v)}
        if not feats:
            return {}
        xy = embed_2d(np.concatenate(list(feats.values())), self.embedding, self.seed)
        out, i = {}, 0
        for k, f in feats.items():
            out[k] = xy[i : i + len(f)]
            i += len(f)
        return out
