"""Teacher outputs kept by sample key, so a frozen teacher sees each training sample once.

With augmentation off, a training sample is the same tensor every epoch, so the frozen teacher's outputs
for it never change: the first time a key is seen they are computed and stored, afterwards they are read
back. Only what the loss terms need is kept (logits, the CLS relation row of each probed block, the pooled
feature for PEFD), e.g. 10 + 3·64 numbers per CIFAR image for the paper's pair instead of the (3, 65, 384)
block outputs, so 650k selected images fit in about half a GB. Written by hand: no library caches a
module's outputs by dataset key inside a training loop.

``save`` and ``load`` keep the rows in a file between runs, under a fingerprint of everything the outputs
depend on, so runs of several seeds over the same inputs (fixed views: ``view_seed``) run the teacher once.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import torch

from vitkd.io import atomic_path

FILE_FORMAT = 1  # the layout save writes; load ignores a file of any other


class TeacherCache:
    """Per-key storage of tensor outputs, grown by doubling; each field is one (capacity, ...) tensor on the
    device of the first outputs stored (under DDP every rank holds the keys it has seen)."""

    def __init__(self) -> None:
        self._row: dict[str, int] = {}
        self._fields: dict[str, torch.Tensor] = {}
        self._size = 0
        self.hits = 0
        self.misses = 0
        self.loaded = 0  # rows read from a file (load)

    def __len__(self) -> int:
        return self._size

    def __call__(
        self, keys: Sequence[str], x: torch.Tensor, compute: Callable[[torch.Tensor], dict[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """The outputs for batch ``x`` named by ``keys``: stored rows for known keys, ``compute`` on the rest
        (only those samples), which are then stored."""
        rows = [self._row.get(k, -1) for k in keys]
        missing = [i for i, r in enumerate(rows) if r < 0]
        if missing:
            fresh = compute(x[missing] if len(missing) < len(keys) else x)
            start = self._append({name: t.detach() for name, t in fresh.items()})
            for j, i in enumerate(missing):
                rows[i] = self._row[keys[i]] = start + j
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        index = torch.tensor(rows, device=next(iter(self._fields.values())).device)
        return {name: t.index_select(0, index) for name, t in self._fields.items()}

    def _append(self, fresh: dict[str, torch.Tensor]) -> int:
        n = len(next(iter(fresh.values())))
        start, need = self._size, self._size + n
        for name, t in fresh.items():
            buf = self._fields.get(name)
            if buf is None:
                buf = t.new_empty((max(n, 1024), *t.shape[1:]))
            elif need > len(buf):
                grown = buf.new_empty((max(need, 2 * len(buf)), *buf.shape[1:]))
                grown[:start] = buf[:start]
                buf = grown
            buf[start:need] = t
            self._fields[name] = buf
        self._size = need
        return start

    def save(self, path: str | os.PathLike, fingerprint: str) -> None:
        """Writes the stored rows, their keys and ``fingerprint`` to ``path`` atomically: a run stopped during
        the write leaves the previous file whole."""
        keys = sorted(self._row, key=self._row.__getitem__)
        fields = {name: t[: self._size].cpu() for name, t in self._fields.items()}
        with atomic_path(path) as tmp:
            torch.save({"format": FILE_FORMAT, "fingerprint": fingerprint, "keys": keys, "fields": fields}, tmp)

    def load(self, path: str | os.PathLike, fingerprint: str, device: torch.device | str = "cpu") -> str | None:
        """Takes the rows of a file ``save`` wrote with the same ``fingerprint`` (onto ``device``), in place of
        what is stored; returns why the file was not used (missing, unreadable, other inputs), None when it was."""
        if not os.path.exists(path):
            return "no such file yet"
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            keys, fields = state["keys"], state["fields"]
            fresh = state.get("format") != FILE_FORMAT or state.get("fingerprint") != fingerprint
        except Exception as exn:  # a damaged file is recomputed and replaced, never trusted
            return f"unreadable ({type(exn).__name__}: {str(exn).splitlines()[0] if str(exn) else ''})"
        if fresh:
            return "written for another teacher, stage, precision or inputs"
        if not keys or any(len(t) != len(keys) for t in fields.values()):
            return "unreadable (rows and keys differ in number)"
        self._row = {k: i for i, k in enumerate(keys)}
        self._fields = {name: t.to(device) for name, t in fields.items()}
        self._size = len(keys)
        self.loaded = len(keys)
        return None

    def nbytes(self) -> int:
        """Bytes held by the stored rows (not the spare capacity)."""
        return sum(t[: self._size].nelement() * t.element_size() for t in self._fields.values())

    def summary(self) -> dict[str, float]:
        """What ``metrics.json`` records of a cache: samples, hits, misses, rows read from a file and MB held."""
        return {
            "samples": len(self),
            "hits": self.hits,
            "misses": self.misses,
            "loaded": self.loaded,
            "mb": self.nbytes() / 2**20,
        }
