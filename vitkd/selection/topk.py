"""The running top-k merge of a selection: the k lowest ranking values over the score parts, holding at most
k candidates (2k with a per-class quota) plus one part in memory.

A kept set is ``{part index: sorted row indices}``. Ties in the value are broken by position (shard order,
then order in the shard), so any number of ranks scoring the pool gives the same set.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

Kept = dict[int, np.ndarray]


def _by_part(ids: np.ndarray) -> Kept:
    """Packed positions (part index << 32 | row) as ``{part: sorted rows}``."""
    return {int(i): np.sort(ids[(ids >> 32) == i] & 0xFFFFFFFF) for i in np.unique(ids >> 32)}


def top_k(load: Callable[[int], dict[str, np.ndarray]], num_parts: int, k: int, per_class: int = 0) -> Kept:
    """The ``k`` lowest ``value`` rows over parts ``load(0) .. load(num_parts - 1)``.

    With ``per_class`` = q > 0 (class balance), first the q lowest of each teacher-predicted class (the ``pred``
    column; at most k more candidates), then the places those leave free filled with the lowest of the rest:
    the global top-k holds them all, since at most k − r of its k candidates are chosen when r places are free.
    """
    best_v, best_id = np.empty(0, np.float64), np.empty(0, np.int64)
    cls_v, cls_id, cls_c = np.empty(0, np.float64), np.empty(0, np.int64), np.empty(0, np.int64)
    for i in range(num_parts):
        cols = load(i)
        v = cols["value"].astype(np.float64)
        ids = (np.int64(i) << 32) | np.arange(len(v), dtype=np.int64)
        best_v, best_id = np.concatenate([best_v, v]), np.concatenate([best_id, ids])
        if len(best_v) > k:
            order = np.lexsort((best_id, best_v))[:k]
            best_v, best_id = best_v[order], best_id[order]
        if per_class:
            cls_v, cls_id = np.concatenate([cls_v, v]), np.concatenate([cls_id, ids])
            cls_c = np.concatenate([cls_c, cols["pred"].astype(np.int64)])
            order = np.lexsort((cls_id, cls_v, cls_c))  # by class, then value, then position
            c = cls_c[order]
            rank = np.arange(len(c)) - np.searchsorted(c, c, side="left")  # place within its class
            order = order[rank < per_class]
            cls_v, cls_id, cls_c = cls_v[order], cls_id[order], cls_c[order]
    if not per_class:
        return _by_part(best_id)
    ranked = best_id[np.lexsort((best_id, best_v))]
    fill = ranked[~np.isin(ranked, cls_id)][: k - len(cls_id)]
    return _by_part(np.concatenate([cls_id, fill]))


def random_k(sizes: Sequence[int], k: int, seed: int) -> Kept:
    """A uniform random subset of ``k`` of the ``sum(sizes)`` rows of parts of ``sizes`` rows (the random-wild
    baseline), the same for any number of ranks."""
    n = int(sum(sizes))
    pos = np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))
    kept, offset = {}, 0
    for i, m in enumerate(sizes):
        sel = pos[(pos >= offset) & (pos < offset + m)] - offset
        if len(sel):
            kept[i] = sel
        offset += m
    return kept


def choose(parts, k: int, random_seed: int | None = None, per_class: int = 0) -> Kept:
    """The kept set over ``parts`` (``load(i)``, ``size(i)``, ``urls``): ``random_k`` with ``random_seed`` set,
    else ``top_k`` of the parts' ranking value."""
    if random_seed is not None:
        return random_k([parts.size(i) for i in range(len(parts.urls))], k, random_seed)
    return top_k(parts.load, len(parts.urls), k, per_class)
