"""Supervised training of a ViT on labeled data: the teacher, and the student-from-scratch baseline."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from vitkd.models import create_model
from vitkd.stages.base import ClassificationStage, adamw


class Classifier(ClassificationStage):
    """Cross-entropy training of a timm ViT.

    Args:
        arch: timm model name (vitkd presets included, e.g. ``digits_teacher_patch4_16``).
        img_size, in_chans, num_classes: set from the data module.
        lr, weight_decay, warmup_epochs: AdamW with linear warm-up then cosine decay.
        label_smoothing: cross-entropy label smoothing.
        model_kwargs: extra keyword arguments for the timm constructor (e.g. ``drop_path_rate``).
        measure_batch_size: batch of the throughput timed for ``metrics.json`` (0 skips the cost figures).
    """

    def __init__(
        self,
        arch: str,
        img_size: int = 16,
        in_chans: int = 1,
        num_classes: int = 10,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_epochs: float = 1.0,
        label_smoothing: float = 0.0,
        model_kwargs: dict[str, Any] | None = None,
        measure_batch_size: int = 256,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.model = create_model(
            arch, img_size=img_size, in_chans=in_chans, num_classes=num_classes, **(model_kwargs or {})
        )
        self.add_accuracy(num_classes)

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"ce": F.cross_entropy(self(x).float(), y, label_smoothing=self.hparams.label_smoothing)}

    def configure_optimizers(self):
        opt = adamw(
            list(self.model.parameters()),
            amp=self.under_amp(),
            lr=self.hparams.lr,
            weight_decay=self.hparams.weight_decay,
        )
        return self.cosine_schedule(opt, self.hparams.warmup_epochs)
