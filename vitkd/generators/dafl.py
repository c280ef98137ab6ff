"""DAFL (Chen et al., ICCV 2019): the convolutional generator and its three teacher-as-discriminator terms.

Restated from ``reference-methods.md`` §2.3 (the authors' ``DAFL-train.py``), not copied:
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

    def __init__(self, img_size: int = 16, in_chans: int = 1, latent_dim: int = 100, width: int = 128, final_bn: bool = False):
        super().__init__()
        if img_size % 4:
            raise VitkdInputError(f"DAFL generator needs an image size divisible by 4, got {img_size}: use the transformer generator or resize the teacher input")
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


def onehot_loss(teacher_logits: torch.Tensor) -> torch.Tensor:
    """DAFL's one-hot term (the paper's L_oh): L_oh = CE(T(G(z)), argmax T(G(z))), mean over the batch.

    Low when the teacher is confident on each generated image.
    """
    logits = teacher_logits.float()
    return F.cross_entropy(logits, logits.argmax(dim=1))


def information_entropy_loss(teacher_logits: torch.Tensor) -> torch.Tensor:
    """DAFL's information-entropy term (the paper's L_ie, base 10 as in the authors' code):
    L_ie = Σ_c p̄_c · log10 p̄_c, with p̄ the batch-mean teacher softmax.

    The negative entropy of the batch's class histogram: minimal (−log10 C) when classes are balanced.
    """
    p_bar = teacher_logits.float().softmax(dim=1).mean(dim=0)
    return (p_bar * torch.log10(p_bar.clamp_min(1e-12))).sum()


def activation_loss(teacher_features: torch.Tensor) -> torch.Tensor:
    """DAFL's activation term (the paper's L_a): L_a = −mean |f_T|, f_T the teacher's penultimate feature.

    For a ViT teacher vitkd takes f_T to be the pre-logits feature (pooled CLS token after the final norm),
    the feature the classifier head reads: vitkd's choice of "penultimate" for transformers.
    """
    return -teacher_features.float().abs().mean()


def dafl_loss(
    teacher_logits: torch.Tensor,
    teacher_features: torch.Tensor,
    oh_weight: float = 1.0,
    ie_weight: float = 5.0,
    act_weight: float = 0.1,
) -> dict[str, torch.Tensor]:
    """DAFL's generator loss L_G = oh·L_oh + ie·L_ie + a·L_a as named weighted terms (weight 0 drops a term).

    Defaults are the authors' MNIST setting (oh 1, ie 5, a 0.1).
    """
    out: dict[str, torch.Tensor] = {}
    if oh_weight:
        out["oh"] = oh_weight * onehot_loss(teacher_logits)
    if ie_weight:
        out["ie"] = ie_weight * information_entropy_loss(teacher_logits)
    if act_weight:
        out["act"] = act_weight * activation_loss(teacher_features)
    return out
