"""Models: ViT presets and the CNN-control LeNets (registered in timm), the attention probe and feature taps."""
from __future__ import annotations

import timm
import torch.nn as nn

from vitkd.errors import VitkdInputError
from vitkd.models import lenet as _lenet  # noqa: F401  (registers the CNN-control presets)
from vitkd.models import vit as _vit  # noqa: F401  (registers the presets)
from vitkd.models.probe import AttentionProbe, FeatureTap, probe_from_qkv


def create_model(arch: str, **kwargs) -> nn.Module:
    """Build any timm model (vitkd presets included) by name; unknown names give a one-line error."""
    if not timm.is_model(arch):
        raise VitkdInputError(
            f"unknown model arch {arch!r}: use a timm model name, e.g. one of {timm.list_models('*patch4*')}"
        )
    return timm.create_model(arch, **kwargs)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["AttentionProbe", "FeatureTap", "create_model", "count_params", "probe_from_qkv"]
