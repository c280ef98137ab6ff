"""How good a selection is, measured against the pool's ``src`` tags (never read to select).

One place for the figures both the selector's ``metrics.json`` and the selection report show.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def source_precision(
    scored: Mapping[str, int], kept: Mapping[str, int], positive_sources: list[str]
) -> dict[str, float | dict[str, int]]:
    """Precision and recall of the kept set against ``positive_sources``, from samples scored and kept per
    ``src`` tag (``""`` = untagged), with the bounds that put the precision in context: ``precision_max``,
    the best any selection of this size could reach (keeping more than the pool's positives forces the
    rest in), and ``precision_random``, what a random subset gets on average. Empty when no positive
    source is named or no sample is tagged."""
    pos = set(positive_sources)
    if not pos or not any(s for s, n in scored.items() if s and n):
        return {}
    num_scored, num_kept = sum(scored.values()), sum(kept.values())
    n_pos = sum(n for s, n in scored.items() if s in pos)
    pos_kept = sum(n for s, n in kept.items() if s in pos)
    return {
        "precision": pos_kept / max(1, num_kept),
        "recall": pos_kept / max(1, n_pos),
        "precision_max": min(1.0, n_pos / max(1, num_kept)),
        "precision_random": n_pos / max(1, num_scored),
        "scored_by_source": dict(scored),
        "kept_by_source": dict(kept),
    }


def score_auroc(
    columns: dict[str, np.ndarray], src: np.ndarray, names: dict[str, int], positive_sources: list[str]
) -> dict[str, dict[str, float]]:
    """How well each score column (each ``va_blk*``, ``vn``, ``value``; low = kept) tells the positive
    sources from the rest: AUROC of −score against all other samples (``all``) and against each other
    source alone. 1.0 when the score ranks every positive sample first, 0.5 for chance; it judges the score
    whichever samples the strategy kept. Empty when the pool has no ``src`` tags or no positive or no
    other sample. (scikit-learn's ``roc_auc_score``: ties count one half.)"""
    from sklearn.metrics import roc_auc_score

    pos = np.isin(src, [names[s] for s in positive_sources if s in names])
    if pos.all() or not pos.any():
        return {}
    groups = {"all": ~pos, **{s: src == c for s, c in sorted(names.items()) if s not in positive_sources and s}}
    out = {}
    for col, v in columns.items():
        out[col] = {}
        for g, neg in groups.items():
            m = pos | neg
            out[col][g] = float(roc_auc_score(pos[m], -v[m].astype(np.float64)))
    return out
