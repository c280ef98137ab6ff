"""The selector's arguments checked together before the teacher is loaded: one ``VitkdInputError`` line naming
the argument and the fix."""

from __future__ import annotations

from collections.abc import Sequence

from vitkd.errors import VitkdInputError
from vitkd.selection.scoring import STABILITY_VIEWS


def check_selection_args(
    num_keep: int,
    probe_blocks: Sequence[int],
    lambda_a: Sequence[float],
    stability_views: Sequence[str],
    strategy: str,
    fusion_weights: dict[str, float] | None,
    extra_scores: bool,
    class_balance: bool,
) -> None:
    """A positive ``num_keep``, one λa per probe block, known stability views; ``fusion`` weighs known,
    nonzero columns it has scores for; ``class_balance`` ranks by a value (``value`` or ``fusion``)."""
    if num_keep <= 0:
        raise VitkdInputError(f"num_keep {num_keep} must be positive: pass --model.num_keep N")
    if len(lambda_a) != len(probe_blocks):
        raise VitkdInputError(
            f"lambda_a has {len(lambda_a)} weights for {len(probe_blocks)} probe_blocks: give one weight per block"
        )
    unknown = sorted(set(stability_views) - set(STABILITY_VIEWS))
    if unknown:
        raise VitkdInputError(f"stability_views {unknown} unknown: use some of {sorted(STABILITY_VIEWS)}")
    if strategy == "fusion":
        needs = {"vn", "va", "vs", "energy"} if extra_scores else {"vn", "va"}
        bad = sorted(set(fusion_weights or {}) - needs)
        if not fusion_weights or bad or not any(fusion_weights.values()):
            hint = "; vs and energy need extra_scores true" if bad and not extra_scores else ""
            raise VitkdInputError(
                f"strategy fusion needs --model.init_args.fusion_weights with nonzero weights of {sorted(needs)} "
                f"(got {fusion_weights}){hint}"
            )
        if "va" in fusion_weights and fusion_weights["va"] and not probe_blocks:
            raise VitkdInputError("fusion weight va needs probe_blocks: name the blocks whose V_a enters, or drop va")
    if class_balance and strategy not in ("value", "fusion"):
        raise VitkdInputError(
            f"class_balance applies to strategy value only, not {strategy}: drop --model.init_args.class_balance"
        )
