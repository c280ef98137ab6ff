"""The embedded wild pool: an EMNIST/Flickr analog built from files that ship inside installed packages.

Sources (``src`` tag): ``digit`` and ``letter`` glyphs rendered from matplotlib's bundled fonts with
random affine, stroke and noise; ``natural`` crops of the photographs shipped with scikit-image and
scikit-learn; ``noise``. Every image passes through the same acquisition as scikit-learn's digits
(a 32×32 binary bitmap counted in 4×4 blocks, giving 8×8 images with 17 grey levels), so only the
content differs from the original data, as EMNIST differs from MNIST. Digits carry their digit in ``cls``
(as EMNIST's do), which measures the teacher's pseudo-labels; the selector never chooses by it.
"""

from __future__ import annotations

import string
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from data_modules.shards import encode_png, shard_url, write_shards

POOL_VERSION = (
    3  # bump when the rendering or the sample fields change, so cached pools are rebuilt (3: digits carry cls)
)
DEFAULT_MIX = {"digit": 0.4, "letter": 0.3, "natural": 0.2, "noise": 0.1}
_FONT_DIR = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
_FONTS = sorted(
    [p for p in _FONT_DIR.glob("DejaVu*.ttf") if "Display" not in p.name]  # Display fonts lack most glyphs
    + [
        _FONT_DIR / f
        for f in ("STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf")
    ]
)
_LETTERS = string.ascii_letters


def acquire(bitmap32: np.ndarray) -> np.ndarray:
    """The digits data set's acquisition: 32×32 binary bitmap → 8×8 counts of ink per 4×4 block (0..16),
    stored as uint8 scaled to 0..255 (the same scaling the original digits get)."""
    counts = bitmap32.astype(np.uint8).reshape(8, 4, 8, 4).sum(axis=(1, 3))
    return (counts.astype(np.float32) * (255.0 / 16.0)).round().astype(np.uint8)


def render_glyph(char: str, rng: np.random.Generator) -> np.ndarray:
    """A character in a random bundled font, size, stroke, rotation, shear and shift → 32×32 bool bitmap."""
    font = ImageFont.truetype(str(_FONTS[rng.integers(len(_FONTS))]), size=80)
    canvas = Image.new("L", (128, 128), 0)
    draw = ImageDraw.Draw(canvas)
    draw.text((64, 64), char, fill=255, font=font, anchor="mm", stroke_width=int(rng.integers(1, 4)), stroke_fill=255)
    shear = rng.uniform(-0.1, 0.1)
    canvas = canvas.transform(canvas.size, Image.AFFINE, (1, shear, -shear * 64, 0, 1, 0), resample=Image.BILINEAR)
    canvas = canvas.rotate(rng.uniform(-5, 5), resample=Image.BILINEAR)
    box = canvas.getbbox()
    if box is None:
        return np.zeros((32, 32), dtype=bool)
    glyph = canvas.crop(box)
    # like the digits data: the glyph fills the frame's height and is a little narrower than the font's
    h = int(rng.integers(28, 33))
    w = max(1, min(26, round(glyph.width * h / glyph.height * rng.uniform(0.7, 1.0))))
    glyph = glyph.resize((w, h), Image.BILINEAR)
    frame = Image.new("L", (32, 32), 0)
    frame.paste(glyph, ((32 - w) // 2, (32 - h) // 2))
    bitmap = np.asarray(frame) > 127
    flips = rng.random((32, 32)) < rng.uniform(0.0, 0.005)  # sparse sensor noise
    return bitmap ^ flips


def _natural_images() -> list[np.ndarray]:
    """Greyscale photographs that ship inside installed packages (no download)."""
    from skimage import color, data
    from sklearn.datasets import load_sample_images

    images = []
    for name in (
        "camera",
        "coffee",
        "chelsea",
        "astronaut",
        "rocket",
        "coins",
        "moon",
        "page",
        "horse",
        "grass",
        "gravel",
        "brick",
        "immunohistochemistry",
        "hubble_deep_field",
        "retina",
        "motorcycle_left",
    ):
        fn = getattr(data, name, None)
        if fn is None:
            continue
        try:
            img = fn()
        except Exception:  # an image that would need a download is skipped
            continue
        if isinstance(img, tuple):
            img = img[0]
        img = np.asarray(img)
        if img.ndim == 3:
            img = color.rgb2gray(img[..., :3])
        img = img.astype(np.float32)
        images.append(img / max(float(img.max()), 1e-6))
    for img in load_sample_images().images:
        images.append(color.rgb2gray(img).astype(np.float32))
    return images


def render_natural(images: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """A random crop of a shipped photograph, binarised (dark = ink) at a random quantile → 32×32 bitmap."""
    img = images[rng.integers(len(images))]
    side = int(rng.integers(24, max(25, min(img.shape[:2]) // 2)))
    y = int(rng.integers(0, img.shape[0] - side + 1))
    x = int(rng.integers(0, img.shape[1] - side + 1))
    crop = np.asarray(
        Image.fromarray((img[y : y + side, x : x + side] * 255).astype(np.uint8)).resize((32, 32), Image.BILINEAR)
    )
    thresh = np.quantile(crop, rng.uniform(0.2, 0.6))
    bitmap = crop < thresh
    return ~bitmap if rng.random() < 0.5 else bitmap


def render_noise(rng: np.random.Generator) -> np.ndarray:
    return rng.random((32, 32)) < rng.uniform(0.05, 0.5)


def generate_pool(
    out_dir: str | Path, size: int = 20000, seed: int = 0, shard_size: int = 2000, mix: dict[str, float] | None = None
) -> str:
    """Write the pool as ``wild-%06d.tar`` shards plus ``meta.json``; returns the brace URL of the shards."""
    out_dir = Path(out_dir)
    mix = mix or DEFAULT_MIX
    rng = np.random.default_rng(seed)
    counts = {k: int(round(v * size)) for k, v in mix.items()}
    counts["digit"] += size - sum(counts.values())
    sources = np.concatenate([np.full(n, k, dtype=object) for k, n in counts.items()])
    rng.shuffle(sources)
    naturals = _natural_images()

    def samples():
        for i, src in enumerate(sources):
            label = None
            if src == "digit":
                label = int(rng.integers(10))
                bitmap = render_glyph(str(label), rng)
            elif src == "letter":
                bitmap = render_glyph(_LETTERS[rng.integers(len(_LETTERS))], rng)
            elif src == "natural":
                bitmap = render_natural(naturals, rng)
            else:
                bitmap = render_noise(rng)
            sample = {"__key__": f"wild{i:07d}", "png": encode_png(acquire(bitmap)), "src": src}
            if label is not None:  # the digit drawn: measures the teacher's pseudo-labels, never used to select
                sample["cls"] = str(label)
            yield sample

    shards = write_shards(
        samples(), out_dir, pattern="wild-%06d.tar", maxcount=shard_size, meta={"sources": counts, "seed": seed}
    )
    return shard_url(out_dir, len(shards), "wild")
