"""How well a tagged wild pool's positive sources can be told from the rest at all: a reference for the
selector's precision.

Example::

    python -m vitkd.demos.pool_separability --urls 'pool/wild-{000000..000009}.tar' \\
        --positive digit --num_keep 12000 8000

A small classifier learns the pool's own ``src`` tags (positive sources vs the rest) from the pixels, scored
out of fold (2-fold cross-fitting: every sample is scored by the model that did not train on it). Its AUROC,
against all and against each other source, and the precision of its ``num_keep`` highest-ranked samples
say what a selection of this pool *can* reach. A teacher-based selection (Eqs. 4–6) never sees the tags:
when it falls far below this reference, the limit is the teacher's scores, not the pool. The reference is
achievable, not an upper bound (a stronger classifier may do better). Written by hand because no library
measures this; the classifier is scikit-learn's ``MLPClassifier`` on ``img_size``² grey pixels.

Writes ``--out`` (JSON, atomically) and prints it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from data_modules import shards
from data_modules.transforms import to_tensor
from vitkd.errors import OneLineParser, VitkdInputError, positive_int
from vitkd.io import write_json
from vitkd.selection.metrics import score_auroc


def read_pool(urls: str, img_size: int, max_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """Grey pixels in [0, 1], (N, img_size²) float32, and the ``src`` tag of each sample (``""`` if none)."""
    skips = shards.SkipCounter()
    pixels, tags = [], []
    for sample in shards.raw_samples(shards.expand_urls(urls), skips=skips, split_by_worker=False):
        if len(pixels) >= max_samples:
            break
        image = shards.decode_or_skip(sample, skips)
        if image is not None:
            pixels.append(to_tensor(image, 1, img_size).reshape(-1).numpy() * 0.5 + 0.5)
            tags.append(shards.read_str(sample) or "")
    if not pixels:
        raise VitkdInputError(
            f"no readable sample in {urls}: pass --urls with webdataset shards holding png or jpg images"
        )
    return np.stack(pixels).astype(np.float32), np.array(tags)


def out_of_fold_scores(x: np.ndarray, y: np.ndarray, seed: int = 0, hidden: tuple[int, ...] = (256, 128)) -> np.ndarray:
    """P(positive) of each sample from an MLP trained on the other half of the pool (2-fold cross-fitting)."""
    from sklearn.neural_network import MLPClassifier

    folds = np.random.default_rng(seed).permutation(len(x)) % 2
    p = np.empty(len(x), dtype=np.float64)
    for f in (0, 1):
        train, test = folds != f, folds == f
        if len(np.unique(y[train])) < 2:  # a fold with one class: nothing to learn from it
            p[test] = y[train].mean()
            continue
        clf = MLPClassifier(hidden, max_iter=200, early_stopping=True, random_state=seed).fit(x[train], y[train])
        p[test] = clf.predict_proba(x[test])[:, 1]
    return p


def separability(
    tags: np.ndarray, scores: np.ndarray, positive_sources: list[str], num_keep: list[int]
) -> dict[str, Any]:
    """AUROC of ``scores`` (high = positive) against all and each other source; precision of the ``k``
    highest for each ``k`` in ``num_keep``, with the bound ``positives / k`` (ties broken by position)."""
    names = {str(t): i for i, t in enumerate(np.unique(tags))}
    codes = np.array([names[str(t)] for t in tags], dtype=np.int32)
    positive = np.isin(tags, positive_sources)
    order = np.lexsort((np.arange(len(scores)), -scores))
    out: dict[str, Any] = {
        "num_samples": len(tags),
        "num_positive": int(positive.sum()),
        "by_source": {s: int((codes == c).sum()) for s, c in names.items()},
        "auroc": score_auroc({"classifier": -scores}, codes, names, positive_sources).get("classifier", {}),
        "precision_at": {},
    }
    for k in num_keep:
        out["precision_at"][str(k)] = {
            "precision": float(positive[order[:k]].mean()),
            "precision_max": min(1.0, int(positive.sum()) / k),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(
        prog="python -m vitkd.demos.pool_separability",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--urls", required=True, help="the pool's shards, e.g. 'pool/wild-{000000..000009}.tar'")
    p.add_argument(
        "--positive",
        nargs="+",
        required=True,
        help="src tags counted as in-distribution (as the selector's positive_sources)",
    )
    p.add_argument(
        "--num_keep", type=positive_int, nargs="+", required=True, help="kept-set sizes to report the precision at"
    )
    p.add_argument(
        "--img_size", type=positive_int, default=16, help="pixels per side fed to the classifier (default 16)"
    )
    p.add_argument(
        "--max_samples",
        type=positive_int,
        default=100_000,
        help="read at most this many samples, from the start (default 100,000)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="JSON file to write (default: print only)")
    a = p.parse_args(argv)
    try:
        if a.max_samples < 2:
            raise VitkdInputError(f"--max_samples {a.max_samples}: the classifier needs at least 2 samples")
        if a.out is not None and (a.out.is_dir() or any(p.exists() and not p.is_dir() for p in a.out.parents)):
            raise VitkdInputError(f"cannot write --out {a.out}: pass a file path whose folders are folders")
        x, tags = read_pool(a.urls, a.img_size, a.max_samples)
        for k in a.num_keep:
            if k > len(tags):
                raise VitkdInputError(f"--num_keep {k} is larger than the pool's {len(tags)} samples read: lower it")
        positive = np.isin(tags, a.positive)
        if positive.all() or not positive.any():
            found = ", ".join(sorted(set(tags.tolist()))) or "none"
            raise VitkdInputError(
                f"--positive {' '.join(a.positive)}: the pool needs samples of those src tags and of others "
                f"(tags found: {found})"
            )
        result = separability(tags, out_of_fold_scores(x, positive, a.seed), a.positive, a.num_keep)
    except VitkdInputError as err:
        print(f"vitkd: error: {err}", file=sys.stderr)
        return 2
    result.update(
        urls=a.urls,
        positive_sources=a.positive,
        img_size=a.img_size,
        seed=a.seed,
        classifier="sklearn MLPClassifier (256, 128), 2-fold out-of-fold",
    )
    if a.out is not None:
        write_json(a.out, result)
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
