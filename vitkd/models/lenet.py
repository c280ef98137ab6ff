"""LeNet-5 for 16×16 digits: the convolutional teacher of the data-free route's CNN-teacher control.

DAFL (Chen et al., "Data-Free Learning of Student Networks", arXiv 1904.01186) distils LeNet-5 into
LeNet-5-half on MNIST. The control trains the same shape of network on vitkd's 16×16 digits, so a DAFL
run can be told apart between "a ViT teacher is hard to invert" and "the implementation is wrong".
timm has no LeNet, hence this small file; it exposes timm's classifier interface (``forward_features``,
``forward_head(pre_logits=True)``, ``head``) that the stages read. The pre-logits feature is the conv3
output, the feature DAFL's activation term reads.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.models import register_model


class LeNet5(nn.Module):
    """conv3×3(6) → pool → conv3×3(16) → pool → conv4×4(120) → fc(84) → fc(classes); ``width`` scales channels."""

    def __init__(self, img_size: int = 16, in_chans: int = 1, num_classes: int = 10, width: float = 1.0):
        super().__init__()
        if img_size != 16:
            raise ValueError(f"LeNet5 here is built for 16×16 inputs, got img_size {img_size}")
        c1, c2, c3, c4 = (max(1, int(round(c * width))) for c in (6, 16, 120, 84))
        self.num_classes, self.num_features = num_classes, c3
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, c1, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c2, c3, 4),
            nn.ReLU(),
        )
        self.fc = nn.Sequential(nn.Linear(c3, c4), nn.ReLU())
        self.head = nn.Linear(c4, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).flatten(1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The conv3 output (DAFL's f_T) when ``pre_logits``, else the logits."""
        return x if pre_logits else self.head(self.fc(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _lenet(pretrained: bool, width: float, **kwargs) -> LeNet5:
    if pretrained:
        raise ValueError("vitkd presets have no pretrained weights; pass a checkpoint path to the stage instead")
    kwargs = {k: v for k, v in kwargs.items() if k not in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")}
    return LeNet5(width=width, **kwargs)


@register_model
def digits_lenet5_16(pretrained: bool = False, **kwargs) -> LeNet5:
    """LeNet-5 teacher of the CNN control (DAFL's MNIST teacher shape) at 16×16, 1 channel."""
    return _lenet(pretrained, 1.0, **kwargs)


@register_model
def digits_lenet5half_16(pretrained: bool = False, **kwargs) -> LeNet5:
    """LeNet-5-half (DAFL's MNIST student: half the channels) at 16×16, 1 channel."""
    return _lenet(pretrained, 0.5, **kwargs)
