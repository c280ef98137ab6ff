"""Models: ViT presets, channel-shuffle students and the CNN-control LeNets (each module registers its presets
in timm when imported here, as timm's own model package does), the attention probe and feature taps."""

from __future__ import annotations

import timm
import torch.nn as nn

from vitkd.errors import VitkdInputError
from vitkd.models import lenet, shuffle_block, vit
from vitkd.models.probe import AttentionProbe, FeatureTap, probe_from_qkv


def create_model(arch: str, **kwargs) -> nn.Module:
    """Build any timm model (vitkd presets included) by name; unknown names give a one-line error."""
    if not timm.is_model(arch):
        raise VitkdInputError(
            f"unknown model arch {arch!r}: use a timm model name, e.g. one of {timm.list_models('*patch4*')}"
        )
    return timm.create_model(arch, **kwargs)


def count_params(model: nn.Module) -> int:
    """Parameters of ``model`` (trainable or not)."""
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "lenet",
    "shuffle_block",
    "vit",
    "AttentionProbe",
    "FeatureTap",
    "create_model",
    "count_params",
    "probe_from_qkv",
]
