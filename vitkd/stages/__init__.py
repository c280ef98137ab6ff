"""Stages as LightningModules: each runs through ``python -m vitkd.fit``."""
from vitkd.stages.base import Stage
from vitkd.stages.classifier import Classifier
from vitkd.stages.selector import AttentionProbeSelector
from vitkd.stages.student import ProbeDistillation

__all__ = ["Stage", "Classifier", "AttentionProbeSelector", "ProbeDistillation"]
from vitkd.stages.data_free import DataFreeGAN  # noqa: E402

__all__ += ["DataFreeGAN"]
