"""Wild-data selection by the teacher's attention probe and confidence (``attention-probe.txt`` §2.2).

Streams wild shards, scores every sample with V = Σ λa·V_a + λn·V_n (Eqs. 4–6), keeps the ``num_keep``
lowest, and writes ``scores.csv`` and the kept samples as ``selected/shard-%06d.tar`` carrying the
teacher's pseudo-label in ``cls``. ``strategy="random"`` keeps a uniform random subset of the same size
(the random-wild baseline); λa = [] gives DFND's confidence-only selection.
"""
from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from data_modules import shards
from vitkd.errors import VitkdInputError
from vitkd.io import atomic_path, write_json
from vitkd.models import AttentionProbe
from vitkd.scoring import attention_value, confidence_value, selection_value
from vitkd.stages.base import Stage


class AttentionProbeSelector(Stage):
    """Scores wild samples with the frozen teacher and keeps the best ``num_keep``.

    Args:
        teacher_ckpt: the trained teacher (vitkd checkpoint, or state dict with ``teacher_arch``).
        num_keep: how many samples to keep.
        probe_blocks: 0-based blocks whose attention probe enters V_a (paper: 4th and 8th of 12 → [3, 7]).
        probe_head: ``mean`` or ``max`` over heads, or a head index (the authors' code uses head 0).
        lambda_a: weight of each probe block's V_a (same length as ``probe_blocks``).
        lambda_n: weight of the confidence term V_n.
        strategy: ``value`` (Eq. 6) or ``random`` (uniform subset of the same size, a baseline).
        positive_sources: ``src`` tags counted as in-distribution when measuring selection precision.
        seed: seed of the random strategy.
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
        strategy: Literal["value", "random"] = "value",
        positive_sources: list[str] = ["digit"],
        seed: int = 0,
        shard_size: int = 2000,
    ):
        super().__init__()
        self.save_hyperparameters()
        if num_keep <= 0:
            raise VitkdInputError(f"num_keep {num_keep} must be positive: pass --model.num_keep N")
        if len(lambda_a) != len(probe_blocks):
            raise VitkdInputError(f"lambda_a has {len(lambda_a)} weights for {len(probe_blocks)} probe_blocks: give one weight per block")
        self.load_frozen_teacher(teacher_ckpt, teacher_arch)
        self.probe = AttentionProbe(self.teacher, probe_blocks, probe_head) if probe_blocks else None
        self._rows: list[dict[str, Any]] = []

    @property
    def model(self):
        return self.teacher

    def predict_step(self, batch, batch_idx):
        logits = self.teacher(batch["image"])
        vn = confidence_value(logits)
        va = [attention_value(r) for r in self.probe.rows().values()] if self.probe else []
        value = selection_value(va, vn, self.hparams.lambda_a, self.hparams.lambda_n)
        cols = {"vn": vn, "value": value, "pred": logits.argmax(dim=1)}
        cols.update({f"va_blk{b}": a for b, a in zip(self.probe.blocks if self.probe else [], va)})
        cols = {k: v.float().cpu().numpy() if k != "pred" else v.cpu().numpy() for k, v in cols.items()}
        for i, key in enumerate(batch["key"]):
            self._rows.append({"key": key, "src": batch["src"][i], **{k: v[i].item() for k, v in cols.items()}})

    def execute(self, trainer, datamodule, ckpt_path=None) -> dict[str, Any]:
        if trainer.world_size > 1:
            raise VitkdInputError("selection runs on one process in this version: launch it with --trainer.devices 1 --trainer.num_nodes 1")
        self._rows = []
        with torch.inference_mode():
            trainer.predict(self, datamodule=datamodule, return_predictions=False)
        run_dir = Path(trainer.default_root_dir)
        kept = self._choose()
        self._write_scores(run_dir / "scores.csv", kept)
        urls = shards.expand_urls(datamodule.wild_urls or datamodule.embedded_wild_urls())
        self._write_selected(run_dir / "selected", urls, kept)
        return self._metrics(kept, run_dir)

    def _choose(self) -> set[str]:
        n, k = len(self._rows), self.hparams.num_keep
        if k > n:
            raise VitkdInputError(f"num_keep {k} is larger than the wild pool ({n} samples scored): lower --model.num_keep")
        if self.hparams.strategy == "random":
            idx = np.random.default_rng(self.hparams.seed).choice(n, size=k, replace=False)
        else:
            values = np.array([r["value"] for r in self._rows])
            idx = np.argsort(values, kind="stable")[:k]
        return {self._rows[i]["key"] for i in idx}

    def _write_scores(self, path: Path, kept: set[str]) -> None:
        fields = ["key", *[c for c in self._rows[0] if c.startswith("va_blk")], "vn", "value", "pred", "selected", "src"]
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            w.writeheader()
            for r in self._rows:
                w.writerow({**r, "selected": int(r["key"] in kept)})

    def _write_selected(self, out_dir: Path, urls: list[str], kept: set[str]) -> None:
        """Second pass over the shards: copy the kept samples' image bytes with the pseudo-label in ``cls``."""
        preds = {r["key"]: int(r["pred"]) for r in self._rows if r["key"] in kept}

        def samples():
            for s in shards.raw_samples(urls):
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

        written = shards.write_shards(samples(), out_dir, pattern="shard-%06d.tar", maxcount=self.hparams.shard_size)
        write_json(out_dir / "meta.json", {"num_samples": len(preds), "shards": len(written), "source": [str(u) for u in urls]})

    def _metrics(self, kept: set[str], run_dir: Path) -> dict[str, Any]:
        scored = Counter(r["src"] for r in self._rows)
        kept_src = Counter(r["src"] for r in self._rows if r["key"] in kept)
        n_sel = len(list((run_dir / "selected").glob("*.tar")))
        out: dict[str, Any] = {
            "num_scored": len(self._rows),
            "num_kept": len(kept),
            "selected_urls": shards.shard_url(run_dir / "selected", n_sel, "shard"),
            "strategy": self.hparams.strategy,
        }
        if any(scored.keys() - {""}):
            pos = set(self.hparams.positive_sources)
            out["precision"] = sum(v for s, v in kept_src.items() if s in pos) / max(1, len(kept))
            out["recall"] = sum(v for s, v in kept_src.items() if s in pos) / max(1, sum(v for s, v in scored.items() if s in pos))
            out["scored_by_source"] = dict(scored)
            out["kept_by_source"] = dict(kept_src)
        return out

