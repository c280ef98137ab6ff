"""``fit_size``: a packed image's resize to the requested square size (``python -m vitkd.pack --size``)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps


def fit_size(image: np.ndarray, size: int | None, resample: str = "auto", crop: str = "none") -> np.ndarray:
    """Resize a uint8 image to ``size``×``size`` (unchanged if it already is, or if ``size`` is 0/None).

    ``crop="none"``: direct resize, aspect ratio not kept (how ImageNet-32 and the paper's code resize);
    ``crop="center"``: shorter side to ``size``, then a center crop (``PIL.ImageOps.fit``).
    ``resample="auto"``: box filter when shrinking (the area average ImageNet-32 uses), bicubic when enlarging.
    """
    h, w = image.shape[:2]
    if not size or (h == size and w == size):
        return image
    if resample == "auto":
        resample = "box" if min(h, w) >= size else "bicubic"
    method = getattr(Image.Resampling, resample.upper())
    img = Image.fromarray(image)
    out = ImageOps.fit(img, (size, size), method=method) if crop == "center" else img.resize((size, size), method)
    return np.asarray(out)
