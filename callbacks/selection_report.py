"""What a selection kept: score histograms, precision per source and the teacher's view (Fig. 3).

``SelectionReport.on_selection_end(trainer, pl_module, run_dir, datamodule=None)`` is called by the selector
once ``run_dir/scores.csv`` and ``run_dir/selected/`` are written. It writes ``run_dir/report/``:

* ``scores.png`` — histograms of each ``va_blk<B>`` column, ``vn`` and ``value`` (Eqs. 4–6) for kept and
  rejected samples (all rows; only the bin counts are plotted);
* ``sources.png`` — per ``src`` tag, the fraction kept and the make-up of the kept set (when tags exist);
* ``embedding.png`` — a 2-D t-SNE (or PCA) of the teacher's softmax outputs for kept, rejected and original
  training samples, as Attention Probe, arXiv 2102.05958, Fig. 3 (a subsample: ``per_group`` of each; wild images
  from the first ``max_scan`` samples of the pool, original ones from the datamodule when given);
* ``selection.json`` — counts, keep rate and share of the kept set per source; precision, recall,
  ``precision_max`` and ``precision_random`` against the selector's ``positive_sources`` (none when it names
  none), as in ``metrics.json``; mean scores kept vs rejected.

The figures are also sent to W&B/TensorBoard when those loggers are on (rank 0 only).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from callbacks._images import figure_to_array, log_image, save_png
from vitkd.errors import VitkdInputError
from vitkd.io import atomic_dir, write_json
from vitkd.selection.metrics import source_precision

SCORE_PREFIXES = ("va_blk", "vn", "value")


def read_scores(path: Path):
    """``scores.csv`` without its key column: float32 scores, int8 ``selected``, categorical ``src``."""
    import pandas as pd

    if not path.is_file():
        raise VitkdInputError(f"selection report: {path} does not exist: run the selector first (it writes scores.csv)")
    df = pd.read_csv(path, usecols=lambda c: c != "key", dtype={"src": "category"})
    if "src" in df:  # an empty tag reads as NaN
        if "" not in df["src"].cat.categories:
            df["src"] = df["src"].cat.add_categories("")
        df["src"] = df["src"].fillna("")
    for c in df.columns:
        if c.startswith(SCORE_PREFIXES):
            df[c] = df[c].astype(np.float32)
    df["selected"] = df["selected"].astype(np.int8)
    return df


def score_columns(df) -> list[str]:
    return [c for c in df.columns if c.startswith(SCORE_PREFIXES)]


def source_summary(df, positive_sources: list[str]) -> dict[str, Any]:
    """Per-source counts, keep rate and share of the kept set; precision, recall and their bounds against
    ``positive_sources`` (``vitkd.selection.metrics.source_precision``, the figures of ``metrics.json``)."""
    kept = df["selected"].to_numpy() == 1
    out: dict[str, Any] = {"num_scored": int(len(df)), "num_kept": int(kept.sum())}
    src = df["src"].astype(str).to_numpy() if "src" in df else np.array([""] * len(df))
    if not (src != "").any():
        return out
    names, inverse = np.unique(src, return_inverse=True)
    scored = dict(zip(names.tolist(), np.bincount(inverse, minlength=len(names)).tolist()))
    kept_n = dict(zip(names.tolist(), np.bincount(inverse[kept], minlength=len(names)).tolist()))
    pos = set(positive_sources)
    out["positive_sources"] = sorted(pos)
    out["by_source"] = {
        s: {
            "scored": scored[s],
            "kept": kept_n[s],
            "keep_rate": kept_n[s] / max(1, scored[s]),
            "share_of_kept": kept_n[s] / max(1, out["num_kept"]),
            "positive": s in pos,
        }
        for s in names.tolist()
    }
    figures = source_precision(scored, kept_n, positive_sources)
    out.update({k: v for k, v in figures.items() if k not in ("scored_by_source", "kept_by_source")})  # by_source has them
    return out


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_histograms(df, bins: int = 60) -> np.ndarray:
    """One panel per score column: density histograms of kept vs rejected (shared bins)."""
    plt = _plt()
    cols = score_columns(df)
    kept = df["selected"].to_numpy() == 1
    fig, axes = plt.subplots(1, len(cols), figsize=(3.4 * len(cols), 2.9), squeeze=False, dpi=100)
    for ax, c in zip(axes[0], cols):
        v = df[c].to_numpy()
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
    plt = _plt()
    by = summary["by_source"]
    names = list(by)
    colors = ["tab:blue" if by[s]["positive"] else "tab:gray" for s in names]
    fig, axes = plt.subplots(1, 2, figsize=(max(6.0, 1.3 * len(names) + 3), 3.0), dpi=100)
    for ax, field, title in ((axes[0], "keep_rate", "fraction of each source kept"), (axes[1], "share_of_kept", "make-up of the kept set")):
        vals = [by[s][field] for s in names]
        bars = ax.bar(names, vals, color=colors)
        for b, s in zip(bars, names):
            ax.annotate(f"{by[s]['kept']}/{by[s]['scored']}" if field == "keep_rate" else f"{by[s][field]:.2f}",
                        (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=7)
        ax.set_ylim(0, 1.08)
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
    if "precision" in summary:
        title = f"precision {summary['precision']:.3f} of at most {summary['precision_max']:.3f} (positive: {', '.join(summary['positive_sources'])}), recall {summary['recall']:.3f}"
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
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.0, 4.4), dpi=100)
    style = {"original": ("tab:green", "o"), "rejected": ("tab:red", "x"), "kept": ("tab:blue", ".")}
    for name in ("original", "rejected", "kept"):
        if name in points and len(points[name]):
            color, marker = style[name]
            p = points[name]
            ax.scatter(p[:, 0], p[:, 1], s=9, c=color, marker=marker, alpha=0.6, linewidths=0.6, label=f"{name} ({len(p)})")
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

    @rank_zero_only
    def on_selection_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, run_dir: str | Path, datamodule=None) -> dict[str, Any]:
        """Write ``run_dir/report/`` from ``run_dir/scores.csv`` and the teacher; returns ``selection.json``'s
        content. ``datamodule`` (default ``trainer.datamodule``) gives the original images of the embedding."""
        if not self.enabled:
            return {}
        run_dir = Path(run_dir)
        df = read_scores(run_dir / "scores.csv")
        summary = source_summary(df, list(pl_module.hparams.get("positive_sources", [])))
        kept = df["selected"].to_numpy() == 1
        summary["scores"] = {
            c: {"kept_mean": float(df[c][kept].mean()) if kept.any() else None, "rejected_mean": float(df[c][~kept].mean()) if (~kept).any() else None}
            for c in score_columns(df)
        }
        figures = {"scores": plot_histograms(df, self.bins)}
        del df
        if "by_source" in summary:
            figures["sources"] = plot_sources(summary)
        if self.per_group > 0:
            dm = datamodule if datamodule is not None else getattr(trainer, "datamodule", None)
            points = self.teacher_points(pl_module, run_dir, dm)
            if points:
                summary["embedding"] = {"method": self.embedding, "features": self.features, "points": {k: len(v) for k, v in points.items()}}
                figures["embedding"] = plot_embedding(points, self.embedding, self.features)
        with atomic_dir(run_dir / "report") as tmp:
            for name, image in figures.items():
                save_png(image, tmp / f"{name}.png")
            write_json(tmp / "selection.json", summary)
        for name, image in figures.items():
            log_image(trainer, f"selection/{name}", image, step=trainer.global_step)
        return summary

    # -- Fig. 3 ---------------------------------------------------------------------------------
    def teacher_points(self, pl_module: pl.LightningModule, run_dir: Path, dm=None) -> dict[str, np.ndarray]:
        """2-D points of the teacher's outputs for up to ``per_group`` kept, rejected and original samples."""
        teacher = getattr(pl_module, "teacher", None) or getattr(pl_module, "model", None)
        if teacher is None:
            rank_zero_warn("SelectionReport: the stage has no teacher, the embedding is skipped")
            return {}
        hp = pl_module.hparams
        in_chans, img_size = hp.get("in_chans", 3), hp.get("img_size", 224)
        images = self.wild_images(run_dir, dm, in_chans, img_size)
        original = self.original_images(dm, in_chans, img_size) if dm is not None else None
        if original is not None:
            images["original"] = original
        if not images:
            return {}
        feats = {k: self.teacher_features(teacher, v) for k, v in images.items()}
        names = list(feats)
        xy = embed_2d(np.concatenate([feats[k] for k in names]), self.embedding, self.seed)
        out, i = {}, 0
        for k in names:
            out[k] = xy[i : i + len(feats[k])]
            i += len(feats[k])
        return out

    def wild_images(self, run_dir: Path, dm, in_chans: int, img_size: int) -> dict[str, torch.Tensor]:
        """Up to ``per_group`` kept and rejected wild images among the first ``max_scan`` samples of the pool
        (shards from the datamodule, else from ``selected/meta.json``), marked by ``scores.csv``."""
        import pandas as pd

        from data_modules import shards
        from data_modules.transforms import to_tensor

        if dm is not None and hasattr(dm, "wild_shards"):
            urls = dm.wild_shards()
        else:
            meta = run_dir / "selected" / "meta.json"
            urls = json.loads(meta.read_text()).get("source", []) if meta.is_file() else []
        if not urls:
            rank_zero_warn("SelectionReport: the wild pool's shards are unknown, kept/rejected points are skipped")
            return {}
        head = pd.read_csv(run_dir / "scores.csv", usecols=["key", "selected"], nrows=4 * self.max_scan, dtype={"key": str})
        flag = dict(zip(head["key"], head["selected"].astype(int)))
        groups: dict[str, list[torch.Tensor]] = {"kept": [], "rejected": []}
        skips = shards.SkipCounter()
        for seen, sample in enumerate(shards.raw_samples([str(u) for u in urls], skips=skips, split_by_worker=False)):
            if seen >= self.max_scan or min(len(v) for v in groups.values()) >= self.per_group:
                break
            f = flag.get(sample["__key__"])
            name = "kept" if f == 1 else "rejected" if f == 0 else None
            if name is None or len(groups[name]) >= self.per_group:
                continue
            image = shards.decode_or_skip(sample, skips)
            if image is not None:
                groups[name].append(to_tensor(image, in_chans, img_size))
        return {k: torch.stack(v) for k, v in groups.items() if v}

    def original_images(self, dm, in_chans: int, img_size: int) -> torch.Tensor | None:
        """``per_group`` original training images: a random subset of ``original_split("train")``, else the
        first ones of the datamodule's training stream (a data set that lives in shards)."""
        from callbacks.attention_maps import first_images
        from data_modules.transforms import to_tensor

        try:
            x, _ = dm.original_split("train")
        except (NotImplementedError, AttributeError, VitkdInputError):
            if not getattr(dm, "train_urls", None):
                return None
            return first_images(dm.train_dataloader().dataset, self.per_group)
        idx = np.sort(np.random.default_rng(self.seed).choice(len(x), size=min(self.per_group, len(x)), replace=False))
        return torch.stack([to_tensor(x[i], in_chans, img_size) for i in idx])

    @torch.inference_mode()
    def teacher_features(self, teacher: torch.nn.Module, x: torch.Tensor, batch: int = 256) -> np.ndarray:
        param = next(teacher.parameters())
        out = []
        for chunk in x.split(batch):
            chunk = chunk.to(param.device, param.dtype)
            if self.features == "pooled":
                f = teacher.forward_head(teacher.forward_features(chunk), pre_logits=True)
            else:
                f = teacher(chunk).float().softmax(dim=-1)
            out.append(f.float().cpu().numpy())
        return np.concatenate(out)
