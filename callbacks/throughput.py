"""Training images per second and peak memory, per epoch.

Lightning's own ``ThroughputMonitor`` synchronises the device after every batch; this one reads the clock
at epoch boundaries only (one synchronisation per epoch on a GPU) and leaves validation time out.
"""

from __future__ import annotations

import time

import lightning.pytorch as pl
import psutil
import torch
from lightning.pytorch.callbacks import Callback


def images_in(batch, pl_module: pl.LightningModule) -> int:
    """Images in a training batch: the first 4-D tensor of the batch (tuple, dict with ``image``, or tensor);
    stages that make their images in the step (the generator stage) count their ``images_per_step``
    attribute, else their ``batch_size`` hyper-parameter."""
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (tuple, list)) else [batch]
    for x in items:
        if isinstance(x, torch.Tensor) and x.ndim == 4:
            return int(x.shape[0])
    per_step = getattr(pl_module, "images_per_step", None)
    return int(per_step if per_step is not None else pl_module.hparams.get("batch_size", 0))


class ThroughputMonitor(Callback):
    """Logs ``perf/images_per_s`` (training batches only, summed over processes) and ``perf/peak_mem_mb``
    (``torch.cuda.max_memory_allocated`` on a GPU, the largest resident set size seen at batch ends on a
    CPU; max over processes) once per training epoch."""

    def __init__(self) -> None:
        self._t0: float | None = None
        self._val_t0: float | None = None
        self._val_time = 0.0
        self._images = 0
        self._rss = 0
        self._proc = psutil.Process()

    @staticmethod
    def _sync(pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync(pl_module)
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        self._images, self._val_time, self._rss = 0, 0.0, self._proc.memory_info().rss
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._images += images_in(batch, pl_module)
        if pl_module.device.type != "cuda":
            self._rss = max(self._rss, self._proc.memory_info().rss)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._t0 is not None and not trainer.sanity_checking:
            self._sync(pl_module)
            self._val_t0 = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._val_t0 is not None:
            self._sync(pl_module)
            self._val_time += time.perf_counter() - self._val_t0
            self._val_t0 = None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._t0 is None:
            return
        self._sync(pl_module)
        seconds = max(time.perf_counter() - self._t0 - self._val_time, 1e-9)
        self._t0 = None
        if pl_module.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(pl_module.device)
        else:
            peak = max(self._rss, self._proc.memory_info().rss)
        pl_module.log("perf/images_per_s", self._images / seconds, on_epoch=True, reduce_fx="sum", sync_dist=True)
        pl_module.log("perf/peak_mem_mb", peak / 2**20, on_epoch=True, reduce_fx="max", sync_dist=True)
