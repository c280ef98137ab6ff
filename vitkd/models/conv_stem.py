"""A convolutional patch stem for timm's VisionTransformer (``embed_layer=ConvStemEmbed``).

Two stride-2 3×3 convolutions (with BatchNorm and GELU) then a 1×1 projection replace the single
patch-sized convolution, as in "Early Convolutions Help Transformers See Better" (Xiao et al.,
arXiv:2106.14881). The token grid is the same as a patch-4 ViT's (img_size / 4 per side), so the
attention probe (``vitkd.models.probe``) reads it unchanged. Written as a ``PatchEmbed`` subclass: timm's
``HybridEmbed`` needs a backbone model and measures its feature size with a dummy forward at build time.
"""

from __future__ import annotations

import torch.nn as nn
from timm.layers import PatchEmbed


class ConvStemEmbed(PatchEmbed):
    """timm ``PatchEmbed`` whose ``proj`` is conv3×3/2 → BN → GELU → conv3×3/2 → BN → GELU → conv1×1; needs
    ``patch_size`` 4. ``stem_width`` is the first convolution's channels (the second has twice as many)."""

    def __init__(self, *args, stem_width: int = 16, **kwargs):
        super().__init__(*args, **kwargs)
        if self.patch_size != (4, 4):
            raise ValueError(f"ConvStemEmbed has a total stride of 4: patch_size {self.patch_size} must be 4")
        in_chans, embed_dim = self.proj.in_channels, self.proj.out_channels
        w = stem_width
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, w, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(w),
            nn.GELU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * w),
            nn.GELU(),
            nn.Conv2d(2 * w, embed_dim, 1),
        )
