"""Stages as LightningModules: each runs through ``python -m vitkd.fit``."""

from vitkd.stages.base import Stage
from vitkd.stages.classifier import Classifier
from vitkd.stages.data_free import DataFreeGAN, GeneratorLossWeights, StudentLossWeights
from vitkd.stages.distillation import DistillationStage
from vitkd.stages.idlevit_finetune import IdleViTFinetune, IdleViTLossWeights
from vitkd.stages.selector import AttentionProbeSelector
from vitkd.stages.student import ProbeDistillation, ProbeLossWeights

__all__ = [
    "AttentionProbeSelector",
    "Classifier",
    "DataFreeGAN",
    "DistillationStage",
    "GeneratorLossWeights",
    "IdleViTFinetune",
    "IdleViTLossWeights",
    "ProbeDistillation",
    "ProbeLossWeights",
    "Stage",
    "StudentLossWeights",
]
