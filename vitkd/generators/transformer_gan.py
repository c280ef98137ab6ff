"""vitkd's transformer-augmented generator (Habib et al., "Optimizing Vision Transformers with Data-Free Knowledge
Transfer", arXiv 2408.05952, names the idea; the architecture is vitkd's own).

Only the paper's abstract is public ("Transformer-augmented GANs that leverage patch-level attention"),
so the design here is vitkd's: noise z → one linear map to a grid of patch tokens (+ learned position
embeddings) → transformer blocks (timm ``Block``: every patch token attends to every other, i.e. patch-level
self-attention) → LayerNorm → per-token linear map to a p×p×h pixel patch → un-patchify → 3×3 conv
(mixes pixels across patch borders so the output has no patch seams) → tanh, so images lie in the
teacher's input range [-1, 1]. Any square size divisible by the patch size and any channel count work.

``head="conv"`` (vitkd's redesign, the one the demo uses) replaces the per-token pixel map with DAFL's
convolutional upsampling head: the token grid becomes a feature map (B, embed_dim, g, g), batch-normed,
then log2(patch_size) rounds of ×2 nearest upsampling → conv3×3 → BN(eps 0.8) → LeakyReLU(0.2), and a
conv3×3 → tanh. The attention blocks decide what goes where on the patch grid; the convolutions draw
strokes that cross patch borders, where the per-token head drew a separate texture in every patch.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block

from vitkd.errors import VitkdInputError


class TransformerGenerator(nn.Module):
    """Noise → patch tokens → transformer blocks → image in [-1, 1] of shape (B, in_chans, img_size, img_size).

    Args:
        img_size, in_chans: the teacher's input.
        latent_dim: dimension of z.
        patch_size: side of each generated patch (the token grid is img_size/patch_size square).
        embed_dim, depth, num_heads, mlp_ratio: the transformer blocks.
        pixel_hidden: channels of the un-patchified map before the seam conv (``head="patch"``).
        head: ``patch`` (per-token pixel map + seam conv) or ``conv`` (DAFL's upsampling head).
        conv_width: channels of the conv head's first upsampling stage (halved at each later stage).
        init_values: LayerScale of the blocks (timm's ``init_values``); a small value (1e-5) starts every
            block near the identity, so the generator starts as its linear map + head and the attention
            grows in as it helps. None: no LayerScale.
    """

    def __init__(
        self,
        img_size: int = 16,
        in_chans: int = 1,
        latent_dim: int = 100,
        patch_size: int = 4,
        embed_dim: int = 64,
        depth: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        pixel_hidden: int = 16,
        head: str = "patch",
        conv_width: int = 64,
        init_values: float | None = None,
    ):
        super().__init__()
        if img_size % patch_size:
            raise VitkdInputError(
                f"transformer generator: image size {img_size} is not a multiple of patch_size {patch_size}: "
                "set --model.init_args.generator_kwargs.patch_size to a divisor"
            )
        if embed_dim % num_heads:
            raise VitkdInputError(
                f"transformer generator: embed_dim {embed_dim} is not divisible by num_heads {num_heads}"
            )
        if head not in ("patch", "conv"):
            raise VitkdInputError(
                f"transformer generator: head {head!r} is not one of 'patch', 'conv': "
                "set --model.init_args.generator_kwargs.head"
            )
        ups = patch_size.bit_length() - 1
        if head == "conv" and 2**ups != patch_size:
            raise VitkdInputError(
                f"transformer generator: the conv head upsamples by 2, so patch_size {patch_size} must be a power of 2"
            )
        self.img_size, self.in_chans, self.patch_size, self.head = img_size, in_chans, patch_size, head
        self.grid = img_size // patch_size
        self.num_tokens, self.embed_dim, self.pixel_hidden = self.grid**2, embed_dim, pixel_hidden
        self.latent_dim = latent_dim
        self.to_tokens = nn.Linear(latent_dim, self.num_tokens * embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, embed_dim))
        trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.Sequential(
            *[Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, init_values=init_values) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(embed_dim)
        if head == "patch":
            self.to_pixels = nn.Linear(embed_dim, patch_size * patch_size * pixel_hidden)
            self.act = nn.GELU()
            self.seam_conv = nn.Conv2d(pixel_hidden, in_chans, 3, padding=1)
        else:
            layers: list[nn.Module] = [nn.BatchNorm2d(embed_dim)]
            c_in = embed_dim
            for i in range(ups):
                c_out = max(8, conv_width // 2**i)
                layers += [
                    nn.Upsample(scale_factor=2),
                    nn.Conv2d(c_in, c_out, 3, padding=1),
                    nn.BatchNorm2d(c_out, eps=0.8),
                    nn.LeakyReLU(0.2),
                ]
                c_in = c_out
            layers += [nn.Conv2d(c_in, in_chans, 3, padding=1), nn.Tanh()]
            self.conv_head = nn.Sequential(*layers)

    def tokens(self, z: torch.Tensor) -> torch.Tensor:
        """Patch tokens after the transformer blocks, (B, grid², embed_dim)."""
        t = self.to_tokens(z).view(z.shape[0], self.num_tokens, self.embed_dim) + self.pos_embed
        return self.norm(self.blocks(t))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        b, g, p, h = z.shape[0], self.grid, self.patch_size, self.pixel_hidden
        if self.head == "conv":
            fmap = self.tokens(z).transpose(1, 2).reshape(b, self.embed_dim, g, g)
            return self.conv_head(fmap)
        pix = self.to_pixels(self.tokens(z))  # (B, g², p·p·h)
        img = pix.view(b, g, g, p, p, h).permute(0, 5, 1, 3, 2, 4).reshape(b, h, g * p, g * p)
        return torch.tanh(self.seam_conv(self.act(img)))
