"""The value a selection strategy ranks the scored samples by (lowest first), read part by part.

``value`` ranks by V (Wang et al., "Attention Probe: Vision Transformer Distillation in the Wild",
arXiv 2102.05958, Eq. 6) as scored; ``fusion`` by ``vitkd.selection.scoring.zscore_fusion`` of the saved
columns, μ and σ over the whole pool; ``oracle`` puts every positive source first (by its ``src`` tag, a
benchmark's upper bound only), then ranks by V. ``random`` does not rank (``vitkd.selection.topk.random_k``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vitkd.errors import VitkdInputError
from vitkd.selection.parts import ScoreParts
from vitkd.selection.scoring import fusion_columns, zscore_fusion

ORACLE_OFFSET = 1e9  # added to V outside the positive sources: larger than any V, so they rank after every positive


def column_stats(parts: ScoreParts, weights: dict[str, float]) -> dict[str, tuple[float, float]]:
    """Mean and standard deviation over the whole pool of each column ``fusion`` weighs (one pass)."""
    sums: dict[str, np.ndarray] = {}
    for i in range(len(parts.urls)):
        cols = parts.load(i)
        if not len(cols["key"]):
            continue
        for c, v in fusion_columns(cols).items():
            sums[c] = sums.get(c, np.zeros(3)) + np.array([len(v), v.sum(), (v * v).sum()])
    missing = sorted(set(weights) - set(sums))
    if missing:
        raise VitkdInputError(
            f"the saved scores have no {missing} column: rescore with --model.init_args.extra_scores true "
            "(a new --run_dir or --overwrite true)"
        )
    out = {}
    for c, (n, s1, s2) in sums.items():
        mu = s1 / n
        out[c] = (float(mu), float(np.sqrt(max(s2 / n - mu * mu, 0.0))))
    return out


class RankedParts:
    """Score parts whose ``value`` column is the strategy's ranking value (V itself for ``value`` and
    ``random``); the fusion's statistics are taken over the pool once, when this is built."""

    def __init__(
        self,
        parts: ScoreParts,
        strategy: str,
        positive_sources: Sequence[str] = (),
        fusion_weights: dict[str, float] | None = None,
    ):
        self.parts, self.strategy = parts, strategy
        self.positive_sources, self.fusion_weights = list(positive_sources), fusion_weights
        self.stats = column_stats(parts, fusion_weights or {}) if strategy == "fusion" else {}

    @property
    def urls(self) -> list[str]:
        return self.parts.urls

    def size(self, i: int) -> int:
        return self.parts.size(i)

    def skipped(self, i: int) -> dict:
        return self.parts.skipped(i)

    def load(self, i: int) -> dict[str, np.ndarray]:
        """Part ``i``'s columns, with ``value`` the strategy's ranking value."""
        cols = self.parts.load(i)
        if len(cols["key"]) and self.strategy == "fusion":
            cols["value"] = zscore_fusion(fusion_columns(cols), self.fusion_weights, self.stats)
        elif len(cols["key"]) and self.strategy == "oracle":
            outside = ~np.isin(cols["src"], self.positive_sources)
            cols["value"] = cols["value"].astype(np.float64) + ORACLE_OFFSET * outside
        return cols
