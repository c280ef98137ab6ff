"""A run's torch intra-op threads re-read from a file at each epoch start, so a scheduler that runs several
runs on one machine can give a run left alone the cores the others freed (``vitkd.demos.runs.run_graph``)."""

from __future__ import annotations

import os

import torch
from lightning.pytorch.callbacks import Callback


def read_threads(path: str | os.PathLike) -> int | None:
    """The positive thread count written in ``path``; None when the file is missing or holds anything else."""
    try:
        with open(path) as f:
            n = int(f.read().strip())
    except (OSError, ValueError):
        return None
    return n if n >= 1 else None


class ThreadShare(Callback):
    """``torch.set_num_threads(n)`` with the ``n`` in ``path`` at the start of each training and validation
    epoch; a missing or unreadable file leaves the threads as they are. The thread count can change the last
    bits of a result (how a sum is split between threads): a run that must repeat bit for bit keeps a fixed
    ``--torch_threads`` instead."""

    def __init__(self, path: str | os.PathLike):
        self.path = path

    def _apply(self) -> None:
        n = read_threads(self.path)
        if n is not None and n != torch.get_num_threads():
            torch.set_num_threads(n)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._apply()

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._apply()
