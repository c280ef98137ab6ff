"""What the selector hands the callbacks once its outputs exist: ``on_selection_end(trainer, stage, result)``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vitkd.selection.outputs import SelectionTallies


@dataclass(frozen=True, eq=False)
class SelectionResult:
    """A finished selection.

    Attributes:
        run_dir: the run directory (``scores.csv``, ``selected/``; a report writes beside them).
        positive_sources: ``src`` tags counted as in-distribution (none: precision is not measured).
        tallies: the counts and score columns of the pass that wrote ``scores.csv``.
        examples: the teacher's outputs for the examples the callbacks asked for (``ExampleRequest``):
            ``{feature kind: {group: (N, D)}}``, groups ``kept``, ``rejected``, ``original``; empty when none
            was asked for.
    """

    run_dir: Path
    positive_sources: tuple[str, ...] = ()
    tallies: SelectionTallies = field(default_factory=SelectionTallies)
    examples: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
