"""The random state of a run in its checkpoints, so a resumed run continues as the uninterrupted one would."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch.callbacks import Callback


class RngState(Callback):
    """Saves the torch (CPU and CUDA), numpy and python random states with every checkpoint, and restores
    them where the resumed run's next epoch starts (``on_train_epoch_start``); the loggers are flushed with
    each checkpoint, so ``metrics.csv`` holds what the checkpoint holds.

    Checkpoints are written at the end of an epoch, after which an uninterrupted run draws nothing until
    the next epoch's loader iterator is created: it draws its base seed from torch's generator, after this
    hook. A resumed run created that iterator before this hook, so the draw is made again here (not for
    persistent workers, whose iterator an uninterrupted run reuses without a draw). The shard streams'
    order and the generator stage's noise do not come from these states: they are restored by
    ``ImageDataModule`` (the epoch number) and the stage's own checkpoint entry.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    @property
    def state_key(self) -> str:
        return "RngState"

    def state_dict(self) -> dict[str, Any]:
        states = _collect_rng_states(include_cuda=torch.cuda.is_available())
        kind, key, pos, has_gauss, gauss = states["numpy"]  # as tensors and numbers: checkpoints load with weights_only
        states["numpy"] = (kind, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
        return {"rng": states}

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # the log holds what the checkpoint holds: a run killed after this save resumes with these rows written
        for logger in trainer.loggers:
            logger.save()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict.get("rng")

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending is None:
            return
        states = dict(self._pending)
        kind, key, pos, has_gauss, gauss = states["numpy"]
        states["numpy"] = (kind, key.numpy().astype(np.uint32), pos, has_gauss, gauss)
        _set_rng_states(states)
        self._pending = None
        loader = trainer.train_dataloader
        loaders = (
            loader
            if isinstance(loader, (list, tuple))
            else list(loader.values())
            if isinstance(loader, dict)
            else [loader]
        )
        for dl in loaders:
            if isinstance(dl, torch.utils.data.DataLoader) and not (dl.persistent_workers and dl.num_workers > 0):
                torch.empty((), dtype=torch.int64).random_(generator=dl.generator)  # the base-seed draw of its iterator
