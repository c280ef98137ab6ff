"""DAFL (Chen et al., "Data-Free Learning of Student Networks", ICCV 2019, arXiv 1904.01186): the convolutional
generator.

Its teacher-as-discriminator terms live in ``vitkd.losses.dafl``.

Restated from the authors' ``DAFL-train.py`` (github.com/huawei-noah/Efficient-Computing,
Data-Efficient-Model-Compression/DAFL), not copied:
z → Linear → 128×(s/4)² → BN → ×2 up → conv3 128→128 → BN(eps 0.8) → LeakyReLU(0.2) → ×2 up →
conv3 128→64 → BN(eps 0.8) → LeakyReLU(0.2) → conv3 64→C → tanh [→ BN(C, affine=False)].
The eps=0.8 batch norms are the reference's quirk (kept: the maintainer says it came from GAN code).
The final affine-free BN is off by default in vitkd: vitkd teachers take inputs in [-1, 1] and the
BN would take the output out of that range; ``final_bn=True`` restores the reference behaviour.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitkd.errors import VitkdInputError


class DAFLGenerator(nn.Module):
    """DAFL's generator for square images whose side is a multiple of 4; output in [-1, 1] (tanh)."""

    def __init__(
        self, img_size: int = 16, in_chans: int = 1, latent_dim: int = 100, width: int = 128, final_bn: bool = False
    ):
        super().__init__()
        if img_size % 4:
            raise VitkdInputError(
                f"DAFL generator needs an image size divisible by 4, got {img_size}: "
                "use the transformer generator or resize the teacher input"
            )
        self.init_size, self.width, self.latent_dim = img_size // 4, width, latent_dim
        self.l1 = nn.Linear(latent_dim, width * self.init_size**2)
        self.bn0 = nn.BatchNorm2d(width)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width, eps=0.8)
        self.conv2 = nn.Conv2d(width, width // 2, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(width // 2, eps=0.8)
        self.conv3 = nn.Conv2d(width // 2, in_chans, 3, padding=1)
        self.final_bn = nn.BatchNorm2d(in_chans, affine=False) if final_bn else None

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.bn0(self.l1(z).view(z.shape[0], self.width, self.init_size, self.init_size))
        x = F.leaky_relu(self.bn1(self.conv1(F.interpolate(x, scale_factor=2))), 0.2)
        x = F.leaky_relu(self.bn2(self.conv2(F.interpolate(x, scale_factor=2))), 0.2)
        x = torch.tanh(self.conv3(x))
        return self.final_bn(x) if self.final_bn is not None else x
