"""Kept and rejected examples of a selection, and the teacher's outputs for them, for a report's embedding.

A callback that draws them (``callbacks.SelectionReport``) names what it needs in a ``selection_examples``
attribute (an ``ExampleRequest``, or None). The selector gathers the images while it reads the kept samples'
shards to write them (``vitkd.selection.outputs.selected_samples``), runs its teacher on them and on some
original training images, and hands the outputs over in the ``SelectionResult`` of ``on_selection_end``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

Features = Literal["softmax", "pooled"]
GROUPS = ("kept", "rejected", "original")


@dataclass(frozen=True)
class ExampleRequest:
    """Up to ``per_group`` kept and rejected wild images among the first ``max_scan`` samples of the pool, and
    ``per_group`` original training images (a random subset drawn with ``seed``), embedded by the teacher's
    ``features`` (``softmax`` outputs or ``pooled`` pre-logit features)."""

    per_group: int
    max_scan: int
    features: tuple[Features, ...] = ("softmax",)
    seed: int = 0

    @staticmethod
    def merge(requests: Iterable[ExampleRequest | None]) -> ExampleRequest | None:
        """One request that serves all (the most of each count, every feature kind; the first one's seed);
        None when none asks for any example."""
        wanted = [r for r in requests if r is not None and r.per_group > 0]
        if not wanted:
            return None
        features = tuple(dict.fromkeys(f for r in wanted for f in r.features))
        per_group, max_scan = max(r.per_group for r in wanted), max(r.max_scan for r in wanted)
        return ExampleRequest(per_group, max_scan, features, wanted[0].seed)


class ExampleGatherer:
    """Collects the images of kept and rejected samples offered in pool order, ``request.per_group`` of each
    among the first ``request.max_scan`` samples offered. ``decode`` turns a raw shard sample into the
    teacher's input (C, H, W), or None for an image that does not decode."""

    def __init__(self, request: ExampleRequest, decode: Callable[[dict], torch.Tensor | None]):
        self.request, self.decode = request, decode
        self.seen = 0
        self.images: dict[str, list[torch.Tensor]] = {"kept": [], "rejected": []}

    @property
    def wants_more(self) -> bool:
        return self.seen < self.request.max_scan and min(map(len, self.images.values())) < self.request.per_group

    def offer(self, sample: dict, selected: bool | None) -> None:
        """One raw sample read from the pool, kept or not (None: not scored, e.g. a bad image)."""
        if not self.wants_more:
            return
        self.seen += 1
        group = None if selected is None else self.images["kept" if selected else "rejected"]
        if group is not None and len(group) < self.request.per_group:
            image = self.decode(sample)
            if image is not None:
                group.append(image)

    def features(
        self,
        teacher: torch.nn.Module,
        original: torch.Tensor | None = None,
    ) -> dict[str, dict[str, np.ndarray]]:
        """The teacher's outputs (``example_features``) for the gathered images and ``original`` ones."""
        images = {k: torch.stack(v) for k, v in self.images.items() if v}
        if original is not None:
            images["original"] = original
        return example_features(teacher, images, self.request.features)


@torch.inference_mode()
def teacher_features(teacher: torch.nn.Module, x: torch.Tensor, features: Features, batch: int = 256) -> np.ndarray:
    """The teacher's softmax outputs (N, C), or its pooled pre-logit features (N, D), for images ``x``."""
    param = next(teacher.parameters())
    out = []
    for chunk in x.split(batch):
        chunk = chunk.to(param.device, param.dtype)
        if features == "pooled":
            f = teacher.forward_head(teacher.forward_features(chunk), pre_logits=True)
        else:
            f = teacher(chunk).float().softmax(dim=-1)
        out.append(f.float().cpu().numpy())
    return np.concatenate(out)


def example_features(
    teacher: torch.nn.Module,
    images: dict[str, torch.Tensor],
    kinds: Iterable[Features],
) -> dict[str, dict[str, np.ndarray]]:
    """``{feature kind: {group: (N, D) teacher outputs}}`` for each group's images, groups in ``GROUPS`` order."""
    groups = [g for g in GROUPS if g in images and len(images[g])]
    return {kind: {g: teacher_features(teacher, images[g], kind) for g in groups} for kind in kinds}
