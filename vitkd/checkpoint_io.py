"""Checkpoints written like every other output: to a temporary name, fsynced, then renamed into place."""

from __future__ import annotations

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from vitkd.io import atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO, but written to a temporary file and renamed into place."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        # through a Python file: a full disk then surfaces as the OS error (torch's own writer reports no errno)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            torch.save(checkpoint, f)
