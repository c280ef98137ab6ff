"""The teacher's selection scores of a batch (Wang et al., "Attention Probe: Vision Transformer Distillation in
the Wild", arXiv 2102.05958, Eqs. 4–6): V_a per probed block, V_n, V and the teacher's prediction, and with
stability views vitkd's V_s and energy (``vitkd.selection.scoring``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vitkd.errors import VitkdInputError
from vitkd.models import AttentionProbe
from vitkd.selection.scoring import (
    STABILITY_VIEWS,
    attention_value,
    confidence_value,
    energy_value,
    selection_value,
    stability_value,
)


def probe_weights(blocks: Sequence[int], lambda_a: Sequence[float]) -> tuple[list[int], list[float]]:
    """The probed blocks in forward order, each with its λa of Eq. 6 (given in any order, each block once): an
    attention probe's rows come in the blocks' forward order, whatever order they were named in."""
    if len(set(blocks)) < len(blocks):
        raise VitkdInputError(f"probe_blocks {list(blocks)} name a block twice: list each block once")
    pairs = sorted(zip(blocks, lambda_a, strict=True))
    return [b for b, _ in pairs], [w for _, w in pairs]


class ProbeScorer:
    """Scores batches with a frozen ``teacher``: its attention probe on ``probe_blocks`` (hooks stay attached),
    V = Σ λa·V_a + λn·V_n with each ``lambda_a`` weighing its own block, and with ``stability_views`` (names
    of ``STABILITY_VIEWS``) one more teacher forward per view for V_s, and the energy."""

    def __init__(
        self,
        teacher: torch.nn.Module,
        probe_blocks: Sequence[int],
        probe_head: str | int,
        lambda_a: Sequence[float],
        lambda_n: float,
        stability_views: Sequence[str] | None = None,
    ):
        self.teacher, self.lambda_n, self.views = teacher, lambda_n, list(stability_views or [])
        self.probe = AttentionProbe(teacher, probe_blocks, probe_head) if probe_blocks else None
        # blocks in 0..depth-1
        self.blocks, self.lambda_a = probe_weights(self.probe.blocks if self.probe else [], lambda_a)

    def names(self) -> list[str]:
        """The score columns, in order: ``va_blk<B>`` in block order, ``vn``, (``vs``, ``energy``), ``value``."""
        return [*(f"va_blk{b}" for b in self.blocks), "vn", *(("vs", "energy") if self.views else ()), "value"]

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """V_a per probed block (Eq. 4), V_n (Eq. 5), V (Eq. 6) and the teacher's prediction for a batch."""
        logits = self.teacher(images)
        vn = confidence_value(logits)
        rows = self.probe.rows() if self.probe else {}
        va = [attention_value(rows[b]) for b in self.blocks]
        cols = {f"va_blk{b}": a for b, a in zip(self.blocks, va, strict=True)}
        cols.update(vn=vn, value=selection_value(va, vn, self.lambda_a, self.lambda_n), pred=logits.argmax(dim=1))
        if self.views:
            views = [self.teacher(STABILITY_VIEWS[v](images)) for v in self.views]
            cols.update(vs=stability_value(logits, views), energy=energy_value(logits))
        return cols
