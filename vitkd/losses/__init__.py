"""Loss terms, one paper equation per function (the docstring names the equation)."""

from vitkd.losses.dafl import activation_loss, dafl_loss, information_entropy_loss, onehot_loss
from vitkd.losses.data_free import (
    adversarial_loss,
    attention_consistency_loss,
    attention_loss,
    attention_peak_loss,
    discrepancy_loss,
    generator_loss,
    total_variation_loss,
)
from vitkd.losses.kd import kd_loss
from vitkd.losses.noisy_adaptation import NoisyAdaptation, adapted_cross_entropy
from vitkd.losses.probe_relation import cls_relation, probe_relation_loss, relation_rows_loss
from vitkd.losses.projector_ensemble import ProjectorEnsemble, projector_ensemble_loss

__all__ = [
    "activation_loss",
    "dafl_loss",
    "information_entropy_loss",
    "onehot_loss",
    "adversarial_loss",
    "attention_consistency_loss",
    "attention_loss",
    "attention_peak_loss",
    "discrepancy_loss",
    "generator_loss",
    "total_variation_loss",
    "kd_loss",
    "NoisyAdaptation",
    "adapted_cross_entropy",
    "cls_relation",
    "probe_relation_loss",
    "relation_rows_loss",
    "ProjectorEnsemble",
    "projector_ensemble_loss",
]
