"""Wild-data selection by the teacher's attention probe and confidence (Wang et al., "Attention Probe: Vision
Transformer Distillation in the Wild", arXiv 2102.05958, §2.2).

Streams wild shards, scores every sample with V = Σ λa·V_a + λn·V_n (Eqs. 4–6), keeps the ``num_keep``
lowest, and writes ``scores.csv`` and the kept samples as ``selected/shard-%06d.tar`` carrying the
teacher's pseudo-label in ``cls``. ``strategy="random"`` keeps a uniform random subset of the same size
(the random-wild baseline); λa = [] gives DFND's confidence-only selection. ``strategy="fusion"`` (vitkd's own,
not the paper's) ranks by ``vitkd.selection.scoring.zscore_fusion`` of V_n, V_a, the teacher's stability V_s and its
energy; ``strategy="oracle"`` keeps the ``positive_sources`` first (by their ``src`` tags, then by V): the upper
bound of any selection, for benchmarks only. ``class_balance=True`` (off by default, not the paper's method)
keeps the lowest V per teacher-predicted class, k // C each, then fills up with the lowest V overall.

At scale: each rank scores its share of the shards (one shard per batch stream, so a sample's score does
not depend on the number of ranks) and saves every finished shard's scores to ``score_parts/`` at once
(``vitkd.selection.parts``), so an interrupted selection resumes without rescoring finished shards. Rank 0
then merges the parts into the global top-k (``vitkd.selection.topk``) holding at most k candidates plus one
shard in memory, writes the outputs (``vitkd.selection.outputs``) and hands the callbacks a
``vitkd.selection.result.SelectionResult`` through their ``on_selection_end`` hook.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks.attention_maps import first_images
from data_modules import shards
from data_modules.transforms import to_tensor
from vitkd.data_contract import ScoringData
from vitkd.errors import VitkdInputError
from vitkd.selection.args import check_selection_args
from vitkd.selection.examples import ExampleGatherer, ExampleRequest
from vitkd.selection.outputs import selected_samples, selection_metrics, write_scores
from vitkd.selection.parts import (
    ScoreParts,
    check_pool_size,
    score_fingerprint,
    warn_skipped,
)
from vitkd.selection.ranking import RankedParts
from vitkd.selection.result import SelectionResult
from vitkd.selection.scorer import ProbeScorer
from vitkd.selection.topk import choose
from vitkd.stages.base import Stage


class AttentionProbeSelector(Stage):
    """Scores wild samples with the frozen teacher and keeps the best ``num_keep``.

    Args:
        teacher_ckpt: the trained teacher (vitkd checkpoint, or state dict with ``teacher_arch``).
        num_keep: how many samples to keep.
        probe_blocks: 0-based blocks whose attention probe enters V_a (paper: 4th and 8th of 12 → [3, 7]), in any
            order, each once; the ``va_blk<B>`` columns come in block order.
        probe_head: ``mean`` or ``max`` over heads, or a head index (the authors' code uses head 0).
        lambda_a: weight of each probe block's V_a (same length and order as ``probe_blocks``).
        lambda_n: weight of the confidence term V_n.
        strategy: ``value`` (Eq. 6), ``random`` (uniform subset of the same size, a baseline), ``fusion``
            (z-scored weighted sum of score columns, ``fusion_weights``) or ``oracle`` (positive sources first).
        positive_sources: ``src`` tags counted as in-distribution when measuring selection precision.
        seed: seed of the random strategy.
        shard_size: samples per written ``selected/shard-%06d.tar``.
        compile: score through ``torch.compile`` with inductor's weight freezing (one compilation per batch
            shape). With ``--trainer.precision bf16-true`` the fastest CPU scoring of the paper's pair
            (``make bench``). Scores differ from eager within the precision's rounding, so resuming a selection
            with it switched rescores.
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

    data_contract = ScoringData

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
        check_selection_args(
            num_keep, probe_blocks, lambda_a, stability_views, strategy, fusion_weights, extra_scores, class_balance
        )
        self.load_frozen_teacher(teacher_ckpt, teacher_arch)
        views = stability_views if extra_scores else None
        self.scorer = ProbeScorer(self.teacher, probe_blocks, probe_head, lambda_a, lambda_n, views)
        self.probe = self.scorer.probe
        self._pending: dict[str, list[dict[str, np.ndarray]]] = {}
        self._parts: ScoreParts | None = None
        self._score = self._compiled_score if compile else self.score
        # a shard's short last batch: one more shape
        self._compiled = torch.compile(self.score, dynamic=False) if compile else None

    def _compiled_score(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        # freezing: inductor folds the frozen teacher's weights in as constants and prepacks them for the CPU's
        # matmul kernels (inference only). Read when a shape is compiled, so it is set around every call
        # (``torch.compile(options={"freezing": True})`` had no effect).
        from torch._inductor import config as inductor_config

        with inductor_config.patch(freezing=True):
            return self._compiled(images)

    @property
    def model(self):
        return self.teacher

    def configure_callbacks(self):
        # the stage defaults (the selection report) without a checkpoint: nothing here is trained
        return [cb for cb in super().configure_callbacks() if not isinstance(cb, ModelCheckpoint)]

    def score(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The teacher's scores of a batch (``vitkd.selection.scorer.ProbeScorer``)."""
        return self.scorer(images)

    def predict_step(self, batch, batch_idx):
        if len(batch["key"]):
            scores = self._score(batch["image"])
            cols = {k: v.cpu().numpy() if k == "pred" else v.float().cpu().numpy() for k, v in scores.items()}
            cols.update(key=np.array(batch["key"]), src=np.array(batch["src"]))
            cols.update(label=np.array(batch["cls"], dtype=np.int64))
            self._pending.setdefault(batch["url"], []).append(cols)
        if batch["last"]:
            chunks = self._pending.pop(batch["url"], [])
            skipped = batch.get("skipped", {})
            self._parts.save(batch["url"], chunks, skipped)
            n_scored = sum(len(c["key"]) for c in chunks)
            warn_skipped(batch["url"], skipped, n_scored, (self._pool_counts or {}).get(batch["url"]))

    def check_run_dir(self, trainer, datamodule, run_dir: Path, ckpt_path: str | None, overwrite: bool) -> None:
        """Before anything is written: saved scores in ``run_dir`` computed differently are refused, unless
        ``overwrite``, which removes them; scores computed the same way are kept and reused (so a rerun with
        another ``num_keep`` only re-selects). The pool's size (``shards.shard_counts``) must hold ``num_keep``."""
        super().check_run_dir(trainer, datamodule, run_dir, ckpt_path, overwrite)
        self._pool_counts = shards.shard_counts(datamodule.wild_shards())
        check_pool_size(self._pool_counts, datamodule.wild_shards(), self.hparams.num_keep)
        # rank 0 alone: it is the one that removes old outputs on --overwrite (another rank reading them then could
        # race it) and that checks the fingerprint again before scoring
        if trainer.is_global_zero and (run_dir / "score_parts" / "fingerprint.json").is_file():
            parts = ScoreParts(run_dir / "score_parts", datamodule.wild_shards(), self._fingerprint(trainer))
            if not overwrite:
                parts.check()
            elif parts.matches():
                self.reused_outputs = ("score_parts",)

    _pool_counts: dict[str, int] | None = None

    def _fingerprint(self, trainer) -> dict[str, Any]:
        return score_fingerprint(self.hparams, self.scorer.blocks, self.scorer.lambda_a, str(trainer.precision))

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
            hooks = [cb for cb in trainer.callbacks if hasattr(cb, "on_selection_end")]
            request = ExampleRequest.merge(getattr(cb, "selection_examples", None) for cb in hooks)
            metrics, result = self._select(run_dir, datamodule, request)
            metrics.update(shards_scored_this_run=scored_now, world_size=trainer.world_size)
            for cb in hooks:  # e.g. the selection report, once the outputs exist
                cb.on_selection_end(trainer, self, result)
        trainer.strategy.barrier("vitkd-selected")
        return metrics

    # -- selection (rank 0) -------------------------------------------------------------------
    def _select(self, run_dir: Path, dm, request: ExampleRequest | None) -> tuple[dict[str, Any], SelectionResult]:
        """The kept set, ``scores.csv``, ``selected/`` and ``metrics.json``'s figures, and what the callbacks get:
        the tallies and the teacher's outputs for the examples they asked for."""
        hp, urls = self.hparams, self._parts.urls
        n, k = self._parts.num_scored(), hp.num_keep
        if k > n:
            raise VitkdInputError(
                f"num_keep {k} is larger than the wild pool ({n} samples scored): lower --model.num_keep"
            )
        ranked = RankedParts(self._parts, hp.strategy, hp.positive_sources, hp.fusion_weights)
        per_class = k // hp.num_classes if hp.get("class_balance") else 0
        kept = choose(ranked, k, hp.seed if hp.strategy == "random" else None, per_class)
        tallies = write_scores(
            run_dir / "scores.csv",
            ranked,
            kept,
            self.scorer.names(),
            hp.positive_sources,
            hp.num_classes,
            self._pool_counts,
        )
        gather = ExampleGatherer(request, self._decode) if request else None
        samples = selected_samples(ranked, kept, _read_shard, (*shards.IMAGE_EXTS, "src"), gather)
        out = run_dir / "selected"
        written = shards.write_shards(
            samples, out, pattern="shard-%06d.tar", maxcount=hp.shard_size, meta={"source": urls}
        )  # atomic: the folder appears whole
        metrics = selection_metrics(
            tallies,
            len(urls),
            shards.shard_url(out, len(written), "shard"),
            hp.strategy,
            bool(hp.get("class_balance")),
            hp.num_classes,
            hp.positive_sources,
        )
        examples = {}
        if gather is not None:
            examples = gather.features(self.teacher, original_images(dm, request, hp.in_chans, hp.img_size))
        return metrics, SelectionResult(run_dir, tuple(hp.positive_sources), tallies, examples)

    def _decode(self, sample: dict) -> torch.Tensor | None:
        image = shards.decode_or_skip(sample, shards.SkipCounter())
        return None if image is None else to_tensor(image, self.hparams.in_chans, self.hparams.img_size)


def _read_shard(url: str):
    return shards.raw_samples([url], skips=shards.SkipCounter(), split_by_worker=False)


def original_images(dm, request: ExampleRequest, in_chans: int, img_size: int) -> torch.Tensor | None:
    """``request.per_group`` original training images: a random subset of ``original_split("train")``, else the
    first ones of the datamodule's training stream (a data set that lives in shards); None without either."""
    try:
        x, _ = dm.original_split("train")
    except (NotImplementedError, AttributeError, VitkdInputError):
        if not getattr(dm, "train_urls", None):
            return None
        return first_images(dm.train_dataloader().dataset, request.per_group)
    rng = np.random.default_rng(request.seed)
    idx = np.sort(rng.choice(len(x), size=min(request.per_group, len(x)), replace=False))
    return torch.stack([to_tensor(x[i], in_chans, img_size) for i in idx])
