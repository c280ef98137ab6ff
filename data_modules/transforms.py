"""Image → model input, shared by original data and every shard stream so both see the same pipeline."""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def to_tensor(img: Image.Image | np.ndarray, in_chans: int, img_size: int) -> torch.Tensor:
    """uint8 image (any size, gray or RGB) → float (in_chans, img_size, img_size) in [-1, 1]."""
    if isinstance(img, Image.Image):
        mode = "L" if in_chans == 1 else "RGB"
        arr = np.asarray(img if img.mode == mode else img.convert(mode))  # convert to the same mode would copy
    else:
        arr = img
    t = torch.from_numpy(np.array(arr, dtype=np.uint8)).float().div_(255.0)  # a copy: PIL arrays are read-only
    t = t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)
    if t.shape[0] != in_chans:
        t = t.mean(0, keepdim=True) if in_chans == 1 else t.expand(in_chans, -1, -1)
    if t.shape[-1] != img_size or t.shape[-2] != img_size:
        t = F.interpolate(t.unsqueeze(0), size=(img_size, img_size), mode="bilinear", align_corners=False).squeeze(0)
    return t.sub_(0.5).div_(0.5)


def random_affine(
    x: torch.Tensor,
    degrees: float = 10.0,
    translate: float = 0.1,
    scale: tuple[float, float] = (0.9, 1.1),
    fill: float = -1.0,
) -> torch.Tensor:
    """Mild random shift/rotate/scale of a whole batch (B, C, H, W) at once, one draw per image.

    Done on the batch with ``affine_grid``/``grid_sample`` rather than per sample in the loader: on a
    CPU the per-sample transform cost as much as the training step of the small models.
    """
    b = x.shape[0]
    angle = torch.empty(b, device=x.device).uniform_(-degrees, degrees) * (torch.pi / 180)
    s = torch.empty(b, device=x.device).uniform_(*scale)
    shift = torch.empty(b, 2, device=x.device).uniform_(-translate, translate) * 2  # grid units span [-1, 1]
    return _affine(x, angle, s, shift, fill)


def view_affine(
    x: torch.Tensor,
    keys: Sequence[str],
    view: int,
    seed: int,
    degrees: float = 10.0,
    translate: float = 0.1,
    scale: tuple[float, float] = (0.9, 1.1),
    fill: float = -1.0,
) -> torch.Tensor:
    """``random_affine``'s transform with each image's draw fixed by (``seed``, its key, ``view``): view ``v`` of
    a sample is the same image every time it comes back, so a frozen teacher's outputs for it can be kept
    (FKD's stored soft labels of fixed random crops: Shen & Xing, "A Fast Knowledge Distillation Framework for
    Visual Recognition", arXiv 2112.01528). The four uniforms of a draw are the 16-byte BLAKE2 digest of
    (seed, view, key): a seeded generator per key would cost more than the transform itself."""
    digests = b"".join(hashlib.blake2b(f"{seed}/{view}/{k}".encode(), digest_size=16).digest() for k in keys)
    u = np.frombuffer(digests, dtype="<u4").reshape(len(keys), 4) / 2.0**32
    u = torch.as_tensor(u, dtype=torch.float32, device=x.device)
    angle = (u[:, 0] * 2 - 1) * degrees * (torch.pi / 180)
    s = scale[0] + u[:, 1] * (scale[1] - scale[0])
    shift = (u[:, 2:] * 2 - 1) * translate * 2
    return _affine(x, angle, s, shift, fill)


def _affine(x: torch.Tensor, angle: torch.Tensor, s: torch.Tensor, shift: torch.Tensor, fill: float) -> torch.Tensor:
    """Rotate by ``angle`` (radians), scale by ``s`` and shift by ``shift`` (grid units) each image of ``x``."""
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    # sample (x - fill) with zero padding so the uncovered border takes the value ``fill``
    return F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill
