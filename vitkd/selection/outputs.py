"""What a selection writes: ``scores.csv`` and its tallies, the kept samples for ``selected/``, and the figures
of ``metrics.json``.

``write_scores`` writes every scored sample's row in one pass over the score parts and counts on the way what
``metrics.json`` and the selection report show (``SelectionTallies``). ``selected_samples`` reads the shards
holding kept samples again for their image bytes, with the teacher's pseudo-label in ``cls``; the stage hands
them to the data layer's atomic shard writer (``data_modules.shards.write_shards``: the directory appears
whole or not at all).
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vitkd.io import atomic_path
from vitkd.selection.examples import ExampleGatherer
from vitkd.selection.metrics import score_auroc, source_precision
from vitkd.selection.parts import skipped_count
from vitkd.selection.ranking import RankedParts
from vitkd.selection.topk import Kept


@dataclass(frozen=True, eq=False)
class SelectionTallies:
    """The counts of the pass that writes ``scores.csv``.

    Attributes:
        scored: samples scored per ``src`` tag (``""`` = untagged).
        kept: samples kept per ``src`` tag.
        kept_per_class: samples kept per teacher-predicted class.
        skipped: damaged data over the pool (``damaged_shards``, ``corrupt_images``, ``skipped_samples``).
        skipped_by_shard: per shard with something skipped: scored, skipped, damaged, corrupt images, causes.
        labelled: samples of the positive sources carrying ``cls`` (``scored``, ``kept``) and those the teacher
            reads right (``scored_right``, ``kept_right``).
        auroc: ``vitkd.selection.metrics.score_auroc`` of each score column.
        columns: each score column of ``scores.csv`` (float32, every sample in shard order).
        selected: whether each sample is kept (the same order).
    """

    scored: Counter = field(default_factory=Counter)
    kept: Counter = field(default_factory=Counter)
    kept_per_class: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    skipped_by_shard: dict[str, dict[str, Any]] = field(default_factory=dict)
    labelled: Counter = field(default_factory=Counter)
    auroc: dict[str, dict[str, float]] = field(default_factory=dict)
    columns: dict[str, np.ndarray] = field(default_factory=dict)
    selected: np.ndarray = field(default_factory=lambda: np.empty(0, bool))

    @property
    def num_scored(self) -> int:
        return sum(self.scored.values())

    @property
    def num_kept(self) -> int:
        return sum(self.kept.values())


def part_rows(
    parts: RankedParts,
    kept: Kept,
    only_kept: bool = False,
) -> Iterator[tuple[int, dict[str, np.ndarray], np.ndarray]]:
    """Each part's columns with its ``selected`` mask, in shard order (only parts with kept rows if asked)."""
    for i in sorted(kept) if only_kept else range(len(parts.urls)):
        cols = parts.load(i)
        mask = np.zeros(len(cols["key"]), dtype=bool)
        mask[kept.get(i, np.empty(0, np.int64))] = True
        yield i, cols, mask


def _tally_skipped(
    totals: Counter,
    by_shard: dict,
    url: str,
    info: dict[str, Any],
    n_scored: int,
    expected: int | None,
) -> None:
    """A part's damaged data into ``totals`` and ``by_shard`` (only shards with something skipped)."""
    lost = skipped_count(info, n_scored, expected)
    damaged, corrupt = int(info.get("damaged_shards", 0)), int(info.get("corrupt_images", 0))
    totals.update(damaged_shards=damaged, corrupt_images=corrupt, skipped_samples=lost)
    if lost or damaged or corrupt:
        by_shard[url] = {
            "scored": n_scored,
            "skipped": lost,
            "damaged": bool(damaged),
            "corrupt_images": corrupt,
            "causes": list(info.get("causes", [])),
        }


def write_scores(
    path: Path,
    parts: RankedParts,
    kept: Kept,
    score_names: Sequence[str],
    positive_sources: Sequence[str],
    num_classes: int,
    pool_counts: dict[str, int] | None = None,
) -> SelectionTallies:
    """``scores.csv`` (key, the ``score_names`` columns, pred, selected, src, cls), written atomically; the
    same pass tallies samples scored and kept per source, kept per teacher-predicted class, the damaged data
    skipped (against ``pool_counts``, samples per shard before scoring), and the samples carrying ``cls`` the
    teacher reads right, and measures how well each score ranks the positive sources first (``score_auroc``)."""
    scored, kept_src, skipped, kept_pred, labelled = Counter(), Counter(), Counter(), Counter(), Counter()
    by_shard: dict[str, dict[str, Any]] = {}
    columns: dict[str, list[np.ndarray]] = {c: [] for c in score_names}  # float32: 4 bytes a score
    codes, names, masks = [], {}, []  # src as ints: 4 bytes a sample
    positive = list(positive_sources)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["key", *score_names, "pred", "selected", "src", "cls"])
        for i, cols, mask in part_rows(parts, kept):
            # only samples of the positive sources: their cls is one of the teacher's classes (a wild set's own
            # labels, e.g. EMNIST's letters or ImageNet's classes, are another label space)
            has = (cols["label"] >= 0) & (cols["label"] < num_classes) & np.isin(cols["src"], positive)
            right = cols["label"] == cols["pred"]
            labelled.update(
                scored=int(has.sum()),
                scored_right=int((has & right).sum()),
                kept=int((has & mask).sum()),
                kept_right=int((has & right & mask).sum()),
            )
            scored.update(cols["src"].tolist())
            kept_src.update(cols["src"][mask].tolist())
            kept_pred.update(cols["pred"][mask].tolist())
            url = parts.urls[i]
            _tally_skipped(skipped, by_shard, url, parts.skipped(i), len(cols["key"]), (pool_counts or {}).get(url))
            masks.append(mask)
            for c in columns:
                if c in cols:
                    columns[c].append(cols[c].astype(np.float32))
            tags, inverse = np.unique(cols["src"], return_inverse=True)  # one lookup per tag, not per sample
            codes.append(np.array([names.setdefault(str(t), len(names)) for t in tags], dtype=np.int32)[inverse])
            floats = [cols.get(c, np.empty(0)) for c in score_names]
            for j in range(len(mask)):
                label = int(cols["label"][j])
                w.writerow(
                    [
                        cols["key"][j],
                        *(f"{c[j]:.7g}" for c in floats),
                        int(cols["pred"][j]),
                        int(mask[j]),
                        cols["src"][j],
                        label if label >= 0 else "",
                    ]
                )
    src = np.concatenate(codes) if codes else np.empty(0, np.int32)
    full = {c: np.concatenate(v) for c, v in columns.items() if v}
    return SelectionTallies(
        scored=scored,
        kept=kept_src,
        kept_per_class=kept_pred,
        skipped=skipped,
        skipped_by_shard=by_shard,
        labelled=labelled,
        auroc=score_auroc(full, src, names, positive),
        columns=full,
        selected=np.concatenate(masks) if masks else np.empty(0, bool),
    )


def selected_samples(
    parts: RankedParts,
    kept: Kept,
    read_shard: Callable[[str], Iterable[dict]],
    fields: Sequence[str],
    examples: ExampleGatherer | None = None,
) -> Iterator[dict]:
    """The kept samples of each shard in pool order (``read_shard(url)`` gives its raw samples): ``__key__``,
    the pseudo-label in ``cls`` and the raw ``fields`` present (image bytes, ``src``). Every sample read on the
    way is offered to ``examples``, and shards without kept samples are read too while it wants more."""
    for i, cols, mask in part_rows(parts, kept):
        if i not in kept and (examples is None or not examples.wants_more):
            continue
        preds = dict(zip(cols["key"][mask].tolist(), cols["pred"][mask].tolist()))
        scored = set(cols["key"].tolist()) if examples is not None else set()
        for s in read_shard(parts.urls[i]):
            key = s["__key__"]
            if examples is not None:
                examples.offer(s, key in preds if key in scored else None)
            if key not in preds:
                continue
            yield {"__key__": key, "cls": str(preds[key]).encode(), **{f: s[f] for f in fields if f in s}}


def selection_metrics(
    tallies: SelectionTallies,
    num_shards: int,
    selected_urls: str,
    strategy: str,
    class_balance: bool,
    num_classes: int,
    positive_sources: Sequence[str],
) -> dict[str, Any]:
    """The selection's figures for ``metrics.json``."""
    skipped, labelled = tallies.skipped, tallies.labelled
    out: dict[str, Any] = {
        "num_scored": tallies.num_scored,
        "num_kept": tallies.num_kept,
        "num_shards": num_shards,
        "selected_urls": selected_urls,
        "strategy": strategy,
        "class_balance": class_balance,
        "kept_per_class": [tallies.kept_per_class.get(c, 0) for c in range(num_classes)],
        "damaged_shards": skipped.get("damaged_shards", 0),
        "corrupt_images": skipped.get("corrupt_images", 0),
        "skipped_samples": skipped.get("skipped_samples", 0),
        "skipped_by_shard": tallies.skipped_by_shard,
    }
    if labelled["scored"]:  # positive-source samples that carry ``cls``: how often the teacher's pseudo-label is right
        out["labelled_scored"], out["labelled_kept"] = labelled["scored"], labelled["kept"]
        out["teacher_acc_labelled"] = labelled["scored_right"] / labelled["scored"]
        if labelled["kept"]:
            out["pseudo_label_acc"] = labelled["kept_right"] / labelled["kept"]
    figures = source_precision(tallies.scored, tallies.kept, list(positive_sources))
    if figures:
        out.update(figures)
        if tallies.auroc:
            out["score_auroc"] = tallies.auroc
            if strategy in ("value", "fusion"):  # a random subset does not rank by V
                out["value_auroc"] = tallies.auroc["value"]["all"]
    return out
