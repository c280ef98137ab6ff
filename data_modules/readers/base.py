"""What every reader is (``Reader``), and the reader of data sets held as uint8 arrays (``ArrayReader``)."""

from __future__ import annotations

import hashlib
import json
from typing import Iterator

import numpy as np

from vitkd.errors import VitkdInputError

FIXED_SPLITS = ("train", "test", "all")


class Reader:
    """A source of ``len(self)`` images in a fixed order; see ``data_modules.readers``."""

    format: str = ""

    def __init__(self, name: str, classes: list[str] | None):
        self.name, self.classes = name, classes

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[str, np.ndarray, int | None]]:
        raise NotImplementedError

    def key(self, i: int) -> str:
        return f"{self.name}-{i:07d}"

    def describe(self) -> dict:
        """What identifies the source (written into meta.json; compared when a pack resumes)."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        return hashlib.sha1(json.dumps(self.describe(), sort_keys=True).encode()).hexdigest()[:16]


class ArrayReader(Reader):
    """Images from uint8 arrays in parts (e.g. train then test), labels as int arrays."""

    def __init__(
        self,
        name: str,
        classes: list[str],
        parts: list[tuple[np.ndarray, np.ndarray]],
        info: dict,
        transpose: bool = False,
    ):
        super().__init__(name, classes)
        self.parts, self.info, self.transpose = parts, info, transpose
        self.offsets = np.cumsum([0] + [len(x) for x, _ in parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, start: int = 0, stop: int | None = None):
        stop = len(self) if stop is None else min(stop, len(self))
        for p, (images, labels) in enumerate(self.parts):
            lo, hi = max(start, self.offsets[p]), min(stop, self.offsets[p + 1])
            for i in range(lo, hi):
                img = images[i - self.offsets[p]]
                label = int(labels[i - self.offsets[p]])
                yield self.key(i), np.ascontiguousarray(img.T if self.transpose else img), label

    def describe(self) -> dict:
        return {**self.info, "num_images": len(self)}


def split_parts(split: str, fmt: str) -> tuple[str, ...]:
    """The parts a fixed data set's ``split`` reads: ``train``, ``test``, or both for ``all``."""
    if split not in FIXED_SPLITS:
        raise VitkdInputError(f"--split {split} is not a split of {fmt}: use one of {', '.join(FIXED_SPLITS)}")
    return ("train", "test") if split == "all" else (split,)
