"""Image → model input, shared by original data and every shard stream so both see the same pipeline."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2


def to_tensor(img: Image.Image | np.ndarray, in_chans: int, img_size: int) -> torch.Tensor:
    """uint8 image (any size, gray or RGB) → float (in_chans, img_size, img_size) in [-1, 1]."""
    if isinstance(img, Image.Image):
        img = img.convert("L" if in_chans == 1 else "RGB")
        arr = np.asarray(img)
    else:
        arr = img
    t = torch.from_numpy(np.ascontiguousarray(arr)).float().div_(255.0)
    t = t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)
    if t.shape[0] != in_chans:
        t = t.mean(0, keepdim=True) if in_chans == 1 else t.expand(in_chans, -1, -1)
    if t.shape[-1] != img_size or t.shape[-2] != img_size:
        t = F.interpolate(t.unsqueeze(0), size=(img_size, img_size), mode="bilinear", align_corners=False).squeeze(0)
    return t.sub_(0.5).div_(0.5)


def train_augment(img_size: int) -> v2.Transform:
    """Mild geometric augmentation (shift/rotate/scale), applied to the model-size tensor."""
    return v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1), fill=-1.0)
