"""Resumable per-shard partial scores of a selection, and the damaged data each shard's scoring skipped.

Each rank scores its share of the wild shards and saves every finished shard's score columns at once, so an
interrupted selection resumes without rescoring finished shards; ``fingerprint.json`` records what the scores
depend on, so a resumed selection only reuses scores computed the same way.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vitkd.errors import VitkdInputError
from vitkd.io import atomic_path, write_json


class ScoreParts:
    """Per-shard score files ``part-%06d.npz`` (index in the pool's shard list), written atomically as each
    shard finishes; ``fingerprint.json`` records what the scores depend on, so a resumed selection only
    reuses scores computed the same way."""

    def __init__(self, folder: Path, urls: list[str], fingerprint: dict[str, Any]):
        self.folder, self.urls = folder, urls
        self.fingerprint = {**fingerprint, "pool": hashlib.sha1("\n".join(urls).encode()).hexdigest()}
        self._index = {u: i for i, u in enumerate(urls)}
        self._sizes: dict[int, int] = {}

    def matches(self) -> bool:
        """Scores already in the folder (if any) were computed the same way."""
        path = self.folder / "fingerprint.json"
        return not path.exists() or json.loads(path.read_text()) == self.fingerprint

    def check(self) -> None:
        """Scores already in the folder must have been computed the same way."""
        if not self.matches():
            old = json.loads((self.folder / "fingerprint.json").read_text())
            changed = sorted(k for k in {*old, *self.fingerprint} if old.get(k) != self.fingerprint.get(k))
            raise VitkdInputError(
                f"{self.folder} holds scores computed differently ({', '.join(changed)} changed): "
                "use a new --run_dir, or --overwrite true to rescore"
            )

    def prepare(self) -> None:
        self.check()
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / "fingerprint.json"
        if not path.exists():
            write_json(path, self.fingerprint)

    def path(self, i: int) -> Path:
        return self.folder / f"part-{i:06d}.npz"

    def done(self, url: str) -> bool:
        return self.path(self._index[url]).is_file()

    def save(self, url: str, chunks: list[dict[str, np.ndarray]], skipped: dict[str, int]) -> None:
        cols = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]} if chunks else {}
        with atomic_path(self.path(self._index[url])) as tmp, open(tmp, "wb") as f:
            np.savez(f, url=np.array(url), skipped=np.array(json.dumps(skipped)), **cols)

    def load(self, i: int) -> dict[str, np.ndarray]:
        with np.load(self.path(i)) as z:
            if str(z["url"]) != self.urls[i]:
                raise VitkdInputError(
                    f"{self.path(i)} holds scores of {z['url']}, not {self.urls[i]}: use a new --run_dir"
                )
            cols = {k: z[k] for k in z.files if k not in ("url", "skipped")}
        if "key" not in cols:  # a shard with no readable sample
            cols = {
                "key": np.empty(0, str),
                "src": np.empty(0, str),
                "value": np.empty(0),
                "vn": np.empty(0),
                "pred": np.empty(0, np.int64),
            }
        if "label" not in cols:  # parts scored before labels were kept: no sample counts as labelled
            cols["label"] = np.full(len(cols["key"]), -1, dtype=np.int64)
        self._sizes[i] = len(cols["key"])
        return cols

    def skipped(self, i: int) -> dict[str, int]:
        with np.load(self.path(i)) as z:
            return json.loads(str(z["skipped"]))

    def size(self, i: int) -> int:
        """Samples scored in part ``i`` (reads its keys only: npz members load one at a time)."""
        if i not in self._sizes:
            with np.load(self.path(i)) as z:
                self._sizes[i] = len(z["key"]) if "key" in z.files else 0
        return self._sizes[i]

    def num_scored(self) -> int:
        missing = [u for u in self.urls if not self.done(u)]
        if missing:
            raise VitkdInputError(
                f"no scores for {len(missing)} shards (e.g. {missing[0]}): "
                "rerun the same command to resume the selection"
            )
        return sum(self.size(i) for i in range(len(self.urls)))


def skipped_count(info: dict[str, Any], n_scored: int, expected: int | None) -> int:
    """Samples of a shard not scored: those its meta.json or headers list (``expected``) or that were read,
    less those scored."""
    return max(int(expected or 0), int(info.get("read", n_scored)), n_scored) - n_scored


def warn_skipped(url: str, info: dict[str, Any], n_scored: int, expected: int | None) -> None:
    """One line on stderr for a shard with damaged data: the file, the cause, what was scored and skipped."""
    lost = skipped_count(info, n_scored, expected)
    if not (lost or info.get("damaged_shards") or info.get("corrupt_images")):
        return
    what = "damaged shard" if info.get("damaged_shards") else "shard with bad images"
    causes = "; ".join(info.get("causes", [])) or "unknown"
    line = f"vitkd: warning: {what} {url} ({causes}): {n_scored} samples scored, {lost} skipped"
    print(line, file=sys.stderr, flush=True)


def score_fingerprint(
    hparams: Mapping[str, Any],
    probe_blocks: list[int],
    lambda_a: list[float],
    precision: str,
) -> dict[str, Any]:
    """What the saved scores depend on, from the selector's ``hparams``: resuming with any of it changed would
    mix incomparable scores. ``probe_blocks`` in block order, each ``lambda_a`` with its block."""
    ckpt = Path(hparams["teacher_ckpt"])
    stat = ckpt.stat()
    return {
        "teacher_ckpt": str(ckpt.resolve()),
        "teacher_size": stat.st_size,
        "teacher_mtime": int(stat.st_mtime),
        "probe_blocks": list(probe_blocks),
        "probe_head": hparams["probe_head"],
        "lambda_a": list(lambda_a),
        "lambda_n": hparams["lambda_n"],
        "img_size": hparams["img_size"],
        "in_chans": hparams["in_chans"],
        "precision": precision,
        # absent when off: parts scored before the switch existed resume
        **({"compile": True} if hparams.get("compile") else {}),
        **({"extra_scores": list(hparams["stability_views"])} if hparams.get("extra_scores") else {}),
    }


def check_pool_size(counts: dict[str, int] | None, urls: list[str], num_keep: int) -> None:
    """Before any sample is scored: the pool (``counts``, samples per shard from its ``meta.json`` or tar
    headers; None when unknown until scored) holds ``num_keep`` samples and is not empty."""
    if counts is None:
        return
    n = sum(counts.values())
    if n == 0:
        raise VitkdInputError(
            f"the wild pool {urls[0]}{' ...' if len(urls) > 1 else ''} holds no samples "
            "(by its meta.json or tar headers): check --data.init_args.wild_urls"
        )
    if num_keep > n:
        raise VitkdInputError(
            f"num_keep {num_keep} is larger than the wild pool ({n} samples in {len(urls)} shards, "
            "counted from their meta.json or tar headers before scoring): lower --model.num_keep"
        )
