"""Where a callback's figure goes: W&B and TensorBoard when they are on, else PNG files in the run directory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from PIL import Image

from vitkd.io import atomic_path


def save_png(image: np.ndarray, path: Path) -> Path:
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
    return path


def image_loggers(trainer) -> list:
    """The trainer's loggers that store images (CSVLogger does not)."""
    return [lg for lg in trainer.loggers if isinstance(lg, (WandbLogger, TensorBoardLogger))]


def log_image(trainer, key: str, image: np.ndarray, step: int, caption: str | None = None) -> bool:
    """Send ``image`` (H, W, 3 uint8) to every image-capable logger; False when there is none."""
    loggers = image_loggers(trainer)
    for lg in loggers:
        if isinstance(lg, WandbLogger):
            lg.log_image(key=key, images=[image], step=step, **({"caption": [caption]} if caption else {}))
        else:
            lg.experiment.add_image(key, image, global_step=step, dataformats="HWC")
    return bool(loggers)
