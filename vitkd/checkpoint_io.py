"""Checkpoints written like every other output: to a temporary name, then renamed into place."""
from __future__ import annotations

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from vitkd.io import atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO, but written to a temporary file and renamed into place."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)
