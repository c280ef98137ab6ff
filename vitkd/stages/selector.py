"""Wild-data selection by the teacher's attention probe and confidence (Wang et al., "Attention Probe: Vision Transformer Distillation in the Wild", arXiv 2102.05958, §2.2).

Streams wild shards, scores every sample with V = Σ λa·V_a + λn·V_n (Eqs. 4–6), keeps the ``num_keep``
lowest, and writes ``scores.csv`` and the kept samples as ``selected/shard-%06d.tar`` carrying the
teacher's pseudo-label in ``cls``. ``strategy="random"`` keeps a uniform random subset of the same size
(the random-wild baseline); λa = [] gives DFND's confidence-only selection. ``strategy="fusion"`` (vitkd's own,
not the paper's) ranks by ``vitkd.selection.scoring.zscore_fusion`` of V_n, V_a, the teacher's stability V_s and its
energy; ``strategy="oracle"`` keeps the ``positive_sources`` first (by their ``src`` tags, then by V): the upper
bound of any selection, for benchmarks only. ``class_balance=True`` (off by
default, not the paper's method) keeps the lowest V per teacher-predicted class, k // C each, then fills up
with the lowest V overall.

At scale: each rank scores its share of the shards (one shard per batch stream, so a sample's score does
not depend on the number of ranks) and saves every finished shard's scores to ``score_parts/`` at once,
so an interrupted selection resumes without rescoring finished shards. Rank 0 then merges the parts into
the global top-k holding at most k candidates plus one shard in memory, and writes the outputs.
"""
from __future__ import annotations

import csv
import hashlib
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from data_modules import shards
from vitkd.errors import VitkdInputError
from vitkd.io import atomic_path, write_json
from vitkd.models import AttentionProbe
from vitkd.selection.scoring import STABILITY_VIEWS, attention_value, confidence_value, energy_value, fusion_columns, selection_value, stability_value, zscore_fusion
from vitkd.selection.metrics import score_auroc, source_precision
from vitkd.stages.base import Stage


ORACLE_OFFSET = 1e9  # added to V outside the positive sources: larger than any V, so they rank after every positive


class AttentionProbeSelector(Stage):
    """Scores wild samples with the frozen teacher and keeps the best ``num_keep``.

    Args:
        teacher_ckpt: the trained teacher (vitkd checkpoint, or state dict with ``teacher_arch``).
        num_keep: how many samples to keep.
        probe_blocks: 0-based blocks whose attention probe enters V_a (paper: 4th and 8th of 12 → [3, 7]).
        probe_head: ``mean`` or ``max`` over heads, or a head index (the authors' code uses head 0).
        lambda_a: weight of each probe block's V_a (same length as ``probe_blocks``).
        lambda_n: weight of the confidence term V_n.
        strategy: ``value`` (Eq. 6), ``random`` (uniform subset of the same size, a baseline), ``fusion``
            (z-scored weighted sum of score columns, ``fusion_weights``) or ``oracle`` (positive sources first).
        positive_sources: ``src`` tags counted as in-distribution when measuring selection precision.
        seed: seed of the random strategy.
        shard_size: samples per written ``selected/shard-%06d.tar``.
        compile: score through ``torch.compile`` with inductor's weight freezing (one compilation per batch shape,
            ~10 s each for the paper's pair). With ``--trainer.precision bf16-true`` the fastest scoring measured on the 2-core CPU for
            the paper's pair (``make bench``). Scores differ from eager within the precision's rounding, so
            resuming a selection with it switched rescores.
        class_balance: keep the ``num_keep // num_classes`` lowest-V samples of each teacher-predicted class, then
            fill the remaining places (classes with fewer samples, the remainder) with the lowest V not yet kept
            (``value`` strategy only; off by default): confident-first selection collapses onto a few teacher classes.
        extra_scores: also score the teacher's stability V_s under ``stability_views`` and its energy
            (``vitkd.selection.scoring.stability_value``, ``energy_value``; columns ``vs`` and ``energy``); one more
            teacher forward per view.
        stability_views: the views of V_s, from ``vitkd.selection.scoring.STABILITY_VIEWS`` (``hflip``, ``shift``).
        fusion_weights: weight of each z-scored column for ``strategy: fusion``: ``vn``, ``va`` (the mean of
            the probed blocks' V_a), ``vs``, ``energy``; lower fused value = kept.
    """

    def __init__(
        self,
        teacher_ckpt: str,
        num_keep: int,
        teacher_arch: str | None = None,
        img_size: int = 16,
        in_chans: int = 1,
        num_classes: int = 10,
        probe_blocks: list[int] = [3, 7],
        probe_head: str | int = "mean",
        lambda_a: list[float] = [0.05, 0.05],
        lambda_n: float = 0.9,
        strategy: Literal["value", "random", "fusion", "oracle"] = "value",
        positive_sources: list[str] = ["digit"],
        seed: int = 0,
        shard_size: int = 2000,
        compile: bool = False,
        class_balance: bool = False,
        extra_scores: bool = False,
        stability_views: list[str] = ["hflip", "shift"],
        fusion_weights: dict[str, float] | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        if num_keep <= 0:
            raise VitkdInputError(f"num_keep {num_keep} must be positive: pass --model.num_keep N")
        if len(lambda_a) != len(probe_blocks):
            raise VitkdInputError(f"lambda_a has {len(lambda_a)} weights for {len(probe_blocks)} probe_blocks: give one weight per block")
        unknown = sorted(set(stability_views) - set(STABILITY_VIEWS))
        if unknown:
            raise VitkdInputError(f"stability_views {unknown} unknown: use some of {sorted(STABILITY_VIEWS)}")
        if strategy == "fusion":
            needs = {"vn", "va", "vs", "energy"} if extra_scores else {"vn", "va"}
            bad = sorted(set(fusion_weights or {}) - needs)
            if not fusion_weights or bad or not any(fusion_weights.values()):
                raise VitkdInputError(
                    f"strategy fusion needs --model.init_args.fusion_weights with nonzero weights of {sorted(needs)} (got {fusion_weights})"
                    + ("; vs and energy need extra_scores true" if bad and not extra_scores else "")
                )
            if "va" in fusion_weights and fusion_weights["va"] and not probe_blocks:
                raise VitkdInputError("fusion weight va needs probe_blocks: name the blocks whose V_a enters, or drop va")
        if class_balance and strategy not in ("value", "fusion"):
            raise VitkdInputError(f"class_balance applies to strategy value only, not {strategy}: drop --model.init_args.class_balance")
        self.load_frozen_teacher(teacher_ckpt, teacher_arch)
        self.probe = AttentionProbe(self.teacher, probe_blocks, probe_head) if probe_blocks else None
        self._pending: dict[str, list[dict[str, np.ndarray]]] = {}
        self._parts: ScoreParts | None = None
        self._score = self._compiled_score if compile else self.score
        self._compiled = torch.compile(self.score, dynamic=False) if compile else None  # a shard's short last batch: one more shape

    def _compiled_score(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        # freezing: inductor folds the frozen teacher's weights in as constants and prepacks them for the CPU's
        # matmul kernels (inference only). Read when a shape is compiled, so it is set around every call
        # (``torch.compile(options={"freezing": True})`` measured no effect).
        from torch._inductor import config as inductor_config

        with inductor_config.patch(freezing=True):
            return self._compiled(images)

    @property
    def model(self):
        return self.teacher

    def configure_callbacks(self):
        # the stage defaults (the selection report) without a checkpoint: nothing here is trained
        return [cb for cb in super().configure_callbacks() if not isinstance(cb, ModelCheckpoint)]

    # -- scoring (every rank) -----------------------------------------------------------------
    def score(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """V_a per probed block (Eq. 4), V_n (Eq. 5), V (Eq. 6) and the teacher's prediction for a batch."""
        logits = self.teacher(images)
        vn = confidence_value(logits)
        va = [attention_value(r) for r in self.probe.rows().values()] if self.probe else []
        cols = {f"va_blk{b}": a for b, a in zip(self.probe.blocks if self.probe else [], va)}
        cols.update(vn=vn, value=selection_value(va, vn, self.hparams.lambda_a, self.hparams.lambda_n), pred=logits.argmax(dim=1))
        if self.hparams.get("extra_scores"):
            views = [self.teacher(STABILITY_VIEWS[v](images)) for v in self.hparams.stability_views]
            cols.update(vs=stability_value(logits, views), energy=energy_value(logits))
        return cols

    def predict_step(self, batch, batch_idx):
        if len(batch["key"]):
            cols = {k: v.cpu().numpy() if k == "pred" else v.float().cpu().numpy() for k, v in self._score(batch["image"]).items()}
            cols.update(key=np.array(batch["key"]), src=np.array(batch["src"]), label=np.array(batch["cls"], dtype=np.int64))
            self._pending.setdefault(batch["url"], []).append(cols)
        if batch["last"]:
            chunks = self._pending.pop(batch["url"], [])
            skipped = batch.get("skipped", {})
            self._parts.save(batch["url"], chunks, skipped)
            warn_skipped(batch["url"], skipped, sum(len(c["key"]) for c in chunks), (self._pool_counts or {}).get(batch["url"]))

    def check_run_dir(self, trainer, datamodule, run_dir: Path, ckpt_path: str | None, overwrite: bool) -> None:
        """Before anything is written: saved scores in ``run_dir`` computed differently are refused, unless
        ``overwrite``, which removes them; scores computed the same way are kept and reused (so a rerun with
        another ``num_keep`` only re-selects)."""
        super().check_run_dir(trainer, datamodule, run_dir, ckpt_path, overwrite)
        self.check_pool(datamodule.wild_shards())
        # rank 0 alone: it is the one that removes old outputs on --overwrite (another rank reading them then could
        # race it) and that checks the fingerprint again before scoring
        if trainer.is_global_zero and (run_dir / "score_parts" / "fingerprint.json").is_file():
            parts = ScoreParts(run_dir / "score_parts", datamodule.wild_shards(), self._fingerprint(trainer))
            if not overwrite:
                parts.check()
            elif parts.matches():
                self.reused_outputs = ("score_parts",)

    _pool_counts: dict[str, int] | None = None

    def check_pool(self, urls: list[str]) -> None:
        """Before any sample is scored: the pool's size, from its ``meta.json`` or the tar headers
        (``shards.shard_counts``; remote shards without a meta.json are counted only when scored), holds
        ``num_keep`` samples and is not empty."""
        counts = self._pool_counts = shards.shard_counts(urls)
        if counts is None:
            return
        n, k = sum(counts.values()), self.hparams.num_keep
        if n == 0:
            raise VitkdInputError(f"the wild pool {urls[0]}{' ...' if len(urls) > 1 else ''} holds no samples (by its meta.json or tar headers): check --data.init_args.wild_urls")
        if k > n:
            raise VitkdInputError(
                f"num_keep {k} is larger than the wild pool ({n} samples in {len(urls)} shards, counted from their meta.json or tar headers "
                "before scoring): lower --model.num_keep"
            )

    def execute(self, trainer, datamodule, ckpt_path=None) -> dict[str, Any]:
        run_dir = Path(trainer.default_root_dir)
        urls = datamodule.wild_shards()
        self._parts = ScoreParts(run_dir / "score_parts", urls, self._fingerprint(trainer))
        if trainer.is_global_zero:
            self._parts.prepare()
        trainer.strategy.barrier("vitkd-score-parts")
        todo = [u for u in shards.shard_order(urls, trainer.global_rank, trainer.world_size) if not self._parts.done(u)]
        self._pending = {}
        with torch.inference_mode():
            trainer.predict(self, dataloaders=datamodule.scoring_loader(todo), return_predictions=False)
        trainer.strategy.barrier("vitkd-scored")
        scored_now = int(trainer.strategy.reduce(torch.tensor(float(len(todo)), device=self.device), reduce_op="sum"))
        metrics: dict[str, Any] = {}
        if trainer.is_global_zero:
            metrics = {**self._select(run_dir, urls), "shards_scored_this_run": scored_now, "world_size": trainer.world_size}
            self._report(trainer, run_dir, datamodule)
        trainer.strategy.barrier("vitkd-selected")
        return metrics

    def _fingerprint(self, trainer) -> dict[str, Any]:
        """What the saved scores depend on: resuming with any of it changed would mix incomparable scores."""
        hp = self.hparams
        ckpt = Path(hp.teacher_ckpt)
        stat = ckpt.stat()
        return {
            "teacher_ckpt": str(ckpt.resolve()), "teacher_size": stat.st_size, "teacher_mtime": int(stat.st_mtime),
            "probe_blocks": list(hp.probe_blocks), "probe_head": hp.probe_head, "lambda_a": list(hp.lambda_a), "lambda_n": hp.lambda_n,
            "img_size": hp.img_size, "in_chans": hp.in_chans, "precision": str(trainer.precision),
            **({"compile": True} if hp.get("compile") else {}),  # absent when off: parts scored before the switch existed resume
            **({"extra_scores": list(hp.stability_views)} if hp.get("extra_scores") else {}),
        }

    # -- selection (rank 0) -------------------------------------------------------------------
    def _select(self, run_dir: Path, urls: list[str]) -> dict[str, Any]:
        parts = self._parts
        n, k = parts.num_scored(), self.hparams.num_keep
        if k > n:
            raise VitkdInputError(f"num_keep {k} is larger than the wild pool ({n} samples scored): lower --model.num_keep")
        self._stats = self._column_stats() if self.hparams.strategy == "fusion" else {}
        kept = self._choose(n, k)  # part index -> sorted row indices
        tallies = self._write_scores(run_dir / "scores.csv", kept)
        written = self._write_selected(run_dir / "selected", kept)
        return self._metrics(kept, run_dir, written, *tallies)

    def _choose(self, n: int, k: int) -> dict[int, np.ndarray]:
        """Global top-k over the parts, holding at most k candidates plus one part in memory. Ties in V are
        broken by position (shard order, then order in the shard), so any number of ranks gives the same set.
        With ``class_balance`` also the q = k // C lowest of each teacher-predicted class (at most k more
        candidates); the places those leave free are the lowest non-chosen of the global top-k, which holds
        them all since at most k − r of its k candidates are chosen when r places are free."""
        parts = self._parts
        if self.hparams.strategy == "random":
            pos = np.sort(np.random.default_rng(self.hparams.seed).choice(n, size=k, replace=False))
            kept, offset = {}, 0
            for i in range(len(parts.urls)):
                m = parts.size(i)
                sel = pos[(pos >= offset) & (pos < offset + m)] - offset
                if len(sel):
                    kept[i] = sel
                offset += m
            return kept
        q = k // self.hparams.num_classes if self.hparams.get("class_balance") else 0
        best_v, best_id = np.empty(0, np.float64), np.empty(0, np.int64)
        cls_v, cls_id, cls_c = np.empty(0, np.float64), np.empty(0, np.int64), np.empty(0, np.int64)
        for i in range(len(parts.urls)):
            cols = self._load(i)
            v = cols["value"].astype(np.float64)
            ids = (np.int64(i) << 32) | np.arange(len(v), dtype=np.int64)
            best_v, best_id = np.concatenate([best_v, v]), np.concatenate([best_id, ids])
            if len(best_v) > k:
                order = np.lexsort((best_id, best_v))[:k]
                best_v, best_id = best_v[order], best_id[order]
            if q:
                cls_v, cls_id = np.concatenate([cls_v, v]), np.concatenate([cls_id, ids])
                cls_c = np.concatenate([cls_c, cols["pred"].astype(np.int64)])
                order = np.lexsort((cls_id, cls_v, cls_c))  # by class, then V, then position
                c = cls_c[order]
                rank = np.arange(len(c)) - np.searchsorted(c, c, side="left")  # place within its class
                order = order[rank < q]
                cls_v, cls_id, cls_c = cls_v[order], cls_id[order], cls_c[order]
        chosen = best_id
        if q:
            ranked = best_id[np.lexsort((best_id, best_v))]
            fill = ranked[~np.isin(ranked, cls_id)][: k - len(cls_id)]
            chosen = np.concatenate([cls_id, fill])
        kept = {}
        for i in np.unique(chosen >> 32):
            kept[int(i)] = np.sort(chosen[(chosen >> 32) == i] & 0xFFFFFFFF)
        return kept

    def _load(self, i: int) -> dict[str, np.ndarray]:
        """Part ``i``'s columns, with ``value`` the ranking value of the strategy (V for ``value``; the fused
        value for ``fusion``; V behind every positive source for ``oracle``)."""
        cols = self._parts.load(i)
        if len(cols["key"]) and self.hparams.strategy == "fusion":
            cols["value"] = zscore_fusion(fusion_columns(cols), self.hparams.fusion_weights, self._stats)
        elif len(cols["key"]) and self.hparams.strategy == "oracle":
            outside = ~np.isin(cols["src"], list(self.hparams.positive_sources))
            cols["value"] = cols["value"].astype(np.float64) + ORACLE_OFFSET * outside
        return cols

    def _column_stats(self) -> dict[str, tuple[float, float]]:
        """Mean and standard deviation over the whole pool of each column ``fusion`` weighs (one pass)."""
        sums: dict[str, np.ndarray] = {}
        for i in range(len(self._parts.urls)):
            cols = self._parts.load(i)
            if not len(cols["key"]):
                continue
            for c, v in fusion_columns(cols).items():
                sums[c] = sums.get(c, np.zeros(3)) + np.array([len(v), v.sum(), (v * v).sum()])
        missing = sorted(set(self.hparams.fusion_weights) - set(sums))
        if missing:
            raise VitkdInputError(f"the saved scores have no {missing} column: rescore with --model.init_args.extra_scores true (a new --run_dir or --overwrite true)")
        out = {}
        for c, (n, s1, s2) in sums.items():
            mu = s1 / n
            out[c] = (float(mu), float(np.sqrt(max(s2 / n - mu * mu, 0.0))))
        return out

    def _rows(self, kept: dict[int, np.ndarray], only_kept: bool = False) -> Iterator[tuple[int, dict[str, np.ndarray], np.ndarray]]:
        """Each part's columns with its ``selected`` mask, in shard order (only parts with kept rows if asked)."""
        for i in sorted(kept) if only_kept else range(len(self._parts.urls)):
            cols = self._load(i)
            mask = np.zeros(len(cols["key"]), dtype=bool)
            mask[kept.get(i, np.empty(0, np.int64))] = True
            yield i, cols, mask

    def _write_scores(self, path: Path, kept: dict[int, np.ndarray]) -> tuple[Counter, Counter, Counter, Counter, dict, Counter]:
        """``scores.csv``; the same pass over the parts counts samples scored and kept per source, kept per
        teacher-predicted class, the damaged data skipped, and the samples carrying ``cls`` the teacher reads
        right, and measures how well each score ranks the positive sources first (``score_auroc``), for
        ``metrics.json``."""
        va = [f"va_blk{b}" for b in self.hparams.probe_blocks]
        scored, kept_src, skipped, kept_pred = Counter(), Counter(), Counter(), Counter()
        self._skipped_by_shard: dict[str, dict[str, Any]] = {}
        labelled = Counter()  # samples carrying ``cls``, and those the teacher reads right, all and kept
        names_f = (*va, "vn", *(("vs", "energy") if self.hparams.get("extra_scores") else ()), "value")
        columns: dict[str, list[np.ndarray]] = {c: [] for c in names_f}  # float32: 4 bytes a score
        codes, names = [], {}  # src as ints: 4 bytes a sample
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["key", *names_f, "pred", "selected", "src", "cls"])
            for i, cols, mask in self._rows(kept):
                # only samples of the positive sources: their cls is one of the teacher's classes (a wild set's own
                # labels, e.g. EMNIST's letters or ImageNet's classes, are another label space)
                has = (cols["label"] >= 0) & (cols["label"] < self.hparams.num_classes) & np.isin(cols["src"], list(self.hparams.positive_sources))
                right = cols["label"] == cols["pred"]
                labelled.update(scored=int(has.sum()), scored_right=int((has & right).sum()), kept=int((has & mask).sum()), kept_right=int((has & right & mask).sum()))
                scored.update(cols["src"].tolist())
                kept_src.update(cols["src"][mask].tolist())
                kept_pred.update(cols["pred"][mask].tolist())
                self._tally_skipped(skipped, i, len(cols["key"]))
                for c in columns:
                    if c in cols:
                        columns[c].append(cols[c].astype(np.float32))
                tags, inverse = np.unique(cols["src"], return_inverse=True)  # one lookup per tag, not per sample
                codes.append(np.array([names.setdefault(str(t), len(names)) for t in tags], dtype=np.int32)[inverse])
                floats = [cols.get(c, np.empty(0)) for c in names_f]
                for j in range(len(mask)):
                    label = int(cols["label"][j])
                    w.writerow([cols["key"][j], *(f"{c[j]:.7g}" for c in floats), int(cols["pred"][j]), int(mask[j]), cols["src"][j], label if label >= 0 else ""])
        src = np.concatenate(codes) if codes else np.empty(0, np.int32)
        auroc = score_auroc({c: np.concatenate(v) for c, v in columns.items() if v}, src, names, self.hparams.positive_sources)
        return scored, kept_src, skipped, kept_pred, auroc, labelled

    def _write_selected(self, out_dir: Path, kept: dict[int, np.ndarray]) -> int:
        """Second pass over the shards holding kept samples: their image bytes, the pseudo-label in ``cls``."""
        urls = self._parts.urls

        def samples():
            for i, cols, mask in self._rows(kept, only_kept=True):
                preds = dict(zip(cols["key"][mask].tolist(), cols["pred"][mask].tolist()))
                for s in shards.raw_samples([urls[i]], skips=shards.SkipCounter(), split_by_worker=False):
                    key = s["__key__"]
                    if key not in preds:
                        continue
                    out = {"__key__": key, "cls": str(preds[key]).encode()}
                    for ext in shards.IMAGE_EXTS:
                        if ext in s:
                            out[ext] = s[ext]
                    if "src" in s:
                        out["src"] = s["src"]
                    yield out

        written = shards.write_shards(samples(), out_dir, pattern="shard-%06d.tar", maxcount=self.hparams.shard_size, meta={"source": urls})
        return len(written)

    def _metrics(
        self, kept: dict[int, np.ndarray], run_dir: Path, n_sel: int, scored: Counter, kept_src: Counter, skipped: Counter, kept_pred: Counter,
        auroc: dict[str, dict[str, float]], labelled: Counter,
    ) -> dict[str, Any]:
        num_kept = sum(len(v) for v in kept.values())
        out: dict[str, Any] = {
            "num_scored": sum(scored.values()),
            "num_kept": num_kept,
            "num_shards": len(self._parts.urls),
            "selected_urls": shards.shard_url(run_dir / "selected", n_sel, "shard"),
            "strategy": self.hparams.strategy,
            "class_balance": bool(self.hparams.get("class_balance")),
            "kept_per_class": [kept_pred.get(c, 0) for c in range(self.hparams.num_classes)],
            "damaged_shards": skipped.get("damaged_shards", 0),
            "corrupt_images": skipped.get("corrupt_images", 0),
            "skipped_samples": skipped.get("skipped_samples", 0),
            "skipped_by_shard": self._skipped_by_shard,
        }
        if labelled["scored"]:  # positive-source samples that carry ``cls``: how often the teacher's pseudo-label is right
            out["labelled_scored"], out["labelled_kept"] = labelled["scored"], labelled["kept"]
            out["teacher_acc_labelled"] = labelled["scored_right"] / labelled["scored"]
            if labelled["kept"]:
                out["pseudo_label_acc"] = labelled["kept_right"] / labelled["kept"]
        figures = source_precision(scored, kept_src, self.hparams.positive_sources)
        if figures:
            out.update(figures)
            if auroc:
                out["score_auroc"] = auroc
                if self.hparams.strategy in ("value", "fusion"):  # a random subset does not rank by V
                    out["value_auroc"] = auroc["value"]["all"]
        return out

    def _tally_skipped(self, totals: Counter, i: int, n_scored: int) -> None:
        """Part ``i``'s damaged data into ``totals`` and ``_skipped_by_shard`` (only shards with something skipped)."""
        info = self._parts.skipped(i)
        url = self._parts.urls[i]
        expected = (self._pool_counts or {}).get(url)
        lost = skipped_count(info, n_scored, expected)
        totals.update(damaged_shards=int(info.get("damaged_shards", 0)), corrupt_images=int(info.get("corrupt_images", 0)), skipped_samples=lost)
        if lost or info.get("damaged_shards") or info.get("corrupt_images"):
            self._skipped_by_shard[url] = {
                "scored": n_scored, "skipped": lost, "damaged": bool(info.get("damaged_shards")), "corrupt_images": int(info.get("corrupt_images", 0)),
                "causes": list(info.get("causes", [])),
            }

    def _report(self, trainer, run_dir: Path, datamodule) -> None:
        """Callbacks with an ``on_selection_end`` hook (e.g. the selection report) run once the outputs exist."""
        for cb in trainer.callbacks:
            hook = getattr(cb, "on_selection_end", None)
            if hook is not None:
                hook(trainer, self, run_dir, datamodule=datamodule)


def skipped_count(info: dict[str, Any], n_scored: int, expected: int | None) -> int:
    """Samples of a shard not scored: those its meta.json or headers list (``expected``) or that were read,
    less those scored."""
    return max(int(expected or 0), int(info.get("read", n_scored)), n_scored) - n_scored


def warn_skipped(url: str, info: dict[str, Any], n_scored: int, expected: int | None) -> None:
    """One line on stderr for a shard with damaged data: the file, the cause, what was scored and skipped."""
    lost = skipped_count(info, n_scored, expected)
    if not (lost or info.get("damaged_shards") or info.get("corrupt_images")):
        return
    what = "damaged shard" if info.get("damaged_shards") else "shard with bad images"
    causes = "; ".join(info.get("causes", [])) or "unknown"
    print(f"vitkd: warning: {what} {url} ({causes}): {n_scored} samples scored, {lost} skipped", file=sys.stderr, flush=True)


class ScoreParts:
    """Per-shard score files ``part-%06d.npz`` (index in the pool's shard list), written atomically as each
    shard finishes; ``fingerprint.json`` records what the scores depend on, so a resumed selection only
    reuses scores computed the same way."""

    def __init__(self, folder: Path, urls: list[str], fingerprint: dict[str, Any]):
        self.folder, self.urls = folder, urls
        self.fingerprint = {**fingerprint, "pool": hashlib.sha1("\n".join(urls).encode()).hexdigest()}
        self._index = {u: i for i, u in enumerate(urls)}
        self._sizes: dict[int, int] = {}

    def matches(self) -> bool:
        """Scores already in the folder (if any) were computed the same way."""
        path = self.folder / "fingerprint.json"
        return not path.exists() or json.loads(path.read_text()) == self.fingerprint

    def check(self) -> None:
        """Scores already in the folder must have been computed the same way."""
        if not self.matches():
            old = json.loads((self.folder / "fingerprint.json").read_text())
            changed = sorted(k for k in {*old, *self.fingerprint} if old.get(k) != self.fingerprint.get(k))
            raise VitkdInputError(
                f"{self.folder} holds scores computed differently ({', '.join(changed)} changed): use a new --run_dir, or --overwrite true to rescore"
            )

    def prepare(self) -> None:
        self.check()
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / "fingerprint.json"
        if not path.exists():
            write_json(path, self.fingerprint)

    def path(self, i: int) -> Path:
        return self.folder / f"part-{i:06d}.npz"

    def done(self, url: str) -> bool:
        return self.path(self._index[url]).is_file()

    def save(self, url: str, chunks: list[dict[str, np.ndarray]], skipped: dict[str, int]) -> None:
        cols = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]} if chunks else {}
        with atomic_path(self.path(self._index[url])) as tmp, open(tmp, "wb") as f:
            np.savez(f, url=np.array(url), skipped=np.array(json.dumps(skipped)), **cols)

    def load(self, i: int) -> dict[str, np.ndarray]:
        with np.load(self.path(i)) as z:
            if str(z["url"]) != self.urls[i]:
                raise VitkdInputError(f"{self.path(i)} holds scores of {z['url']}, not {self.urls[i]}: use a new --run_dir")
            cols = {k: z[k] for k in z.files if k not in ("url", "skipped")}
        if "key" not in cols:  # a shard with no readable sample
            cols = {"key": np.empty(0, str), "src": np.empty(0, str), "value": np.empty(0), "vn": np.empty(0), "pred": np.empty(0, np.int64)}
        if "label" not in cols:  # parts scored before labels were kept: no sample counts as labelled
            cols["label"] = np.full(len(cols["key"]), -1, dtype=np.int64)
        self._sizes[i] = len(cols["key"])
        return cols

    def skipped(self, i: int) -> dict[str, int]:
        with np.load(self.path(i)) as z:
            return json.loads(str(z["skipped"]))

    def size(self, i: int) -> int:
        """Samples scored in part ``i`` (reads its keys only: npz members load one at a time)."""
        if i not in self._sizes:
            with np.load(self.path(i)) as z:
                self._sizes[i] = len(z["key"]) if "key" in z.files else 0
        return self._sizes[i]

    def num_scored(self) -> int:
        missing = [u for u in self.urls if not self.done(u)]
        if missing:
            raise VitkdInputError(f"no scores for {len(missing)} shards (e.g. {missing[0]}): rerun the same command to resume the selection")
        return sum(self.size(i) for i in range(len(self.urls)))
