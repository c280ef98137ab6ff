"""The Fashion-MNIST benchmark's wild pool (``make data-fashion``): real images, shifted, imbalanced, with
near and far out-of-distribution data, as the wild data of Wang et al., "Attention Probe: Vision Transformer
Distillation in the Wild" (arXiv:2102.08237) is.

Every sample is a 28×28 grey PNG (object bright on a dark ground where the source has an object, as in
Fashion-MNIST) with ``__key__`` ``wild{i:07d}``, its ``src`` tag and, only for the Fashion-MNIST images,
``cls`` (the true class, in the teacher's label space: ``data_modules.fashion.CLASSES``). The selector never
chooses by ``src`` or ``cls``; they measure a selection (precision, recall, pseudo-label accuracy).

Sources (``src`` tag, default count):

* ``fashion`` (10,218), in-distribution in the wild: every image of ``fashion_splits(...)["wild"]``, train
  images held out of the teacher's train and val splits, class-imbalanced (largest class 2,500, smallest
  250: ``data_modules.fashion``). Each passes through a different acquisition (``reacquire``): rescale
  0.7–1.0 re-centred on the canvas, shift ±3 px, rotation ±12°, gamma 0.5–2.0 (log-uniform), contrast
  0.5–1.0 about the image's mean, Gaussian blur σ 0–1.2.
* ``digit`` (6,000), near OOD: scikit-learn's handwritten digits (``load_digits``, 8×8, 17 grey levels)
  upscaled to about 20 px with random scale, rotation, shear and shift, slightly blurred.
* ``glyph`` (8,000), near OOD: letters, punctuation and symbols rendered anti-aliased (grey-level) from the
  fonts bundled with matplotlib (``data_modules.wild_pool``'s font list; each symbol only from a font that
  has it), random size, stroke, rotation, shift and brightness.
* ``shape`` (4,000), near OOD: one or two filled ellipses, rotated rectangles or polygons, each with a
  linear grey gradient, on a dark ground.
* ``photo`` (8,000), far OOD: random square crops of the photographs shipped with scikit-image and
  scikit-learn (``data_modules.wild_pool``'s list), grey, box-resized to 28×28, randomly mirrored.
* ``texture`` (3,000), far OOD: procedural sine or square gratings, rotated checkerboards, smoothed noise
  (some thresholded into blobs).
* ``noise`` (2,000), far OOD: Gaussian, uniform or salt-and-pepper pixel noise.

41,218 images with the default counts, in a seeded shuffle of all sources; the same seed gives the same
pool. ``meta.json`` holds the counts per source and per Fashion-MNIST class, the seed and ``POOL_VERSION``.
The pool is built once under ``data/fashion-wild-v{POOL_VERSION}`` (``fashion_pool_urls``).
"""

from __future__ import annotations

import argparse
import json
import string
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy.ndimage import gaussian_filter

from data_modules.fashion import (
    CLASSES,
    VAL_PER_CLASS,
    WILD_MAX,
    WILD_RATIO,
    fashion_splits,
    find_fashion_dir,
    install_fashion,
)
from data_modules.shards import encode_png, shard_url, write_shards
from data_modules.wild_pool import _FONTS, _natural_images
from vitkd.errors import OneLineParser, VitkdInputError, demo_main, non_negative_int, positive_int
from vitkd.io import build_once

POOL_VERSION = 1  # bump when a source's rendering or the sample fields change, so built pools are rebuilt
SIZE = 28
SOURCES = ("fashion", "digit", "glyph", "shape", "photo", "texture", "noise")
DEFAULT_COUNTS = {
    "fashion": None,
    "digit": 6000,
    "glyph": 8000,
    "shape": 4000,
    "photo": 8000,
    "texture": 3000,
    "noise": 2000,
}  # fashion None: all wild images
_SYMBOLS = string.ascii_letters + "!#$%&*+/<=>?@^~{}§¶©®±×÷µß∞≈≠≤≥∑∏√∫Ωπλ♠♣♥♦★☆●■▲◆→←↑↓♪☺✓✗"


def _warp(
    image: np.ndarray, scale: float, angle: float, shift: tuple[float, float], shear: float = 0.0, out: int = SIZE
) -> np.ndarray:
    """``image`` (float32, H×W) scaled, sheared and rotated (degrees) about its centre, which lands on the
    output's centre plus ``shift``; bilinear, zero outside."""
    h, w = image.shape
    t = np.deg2rad(angle)
    forward = scale * np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]) @ np.array([[1.0, shear], [0.0, 1.0]])
    inv = np.linalg.inv(forward)
    centre_out = np.array([out / 2 + shift[0], out / 2 + shift[1]])
    offset = np.array([w / 2, h / 2]) - inv @ centre_out
    coeffs = (inv[0, 0], inv[0, 1], offset[0], inv[1, 0], inv[1, 1], offset[1])
    warped = Image.fromarray(image.astype(np.float32), mode="F").transform(
        (out, out), Image.AFFINE, coeffs, resample=Image.BILINEAR
    )
    return np.asarray(warped, dtype=np.float32)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def reacquire(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A Fashion-MNIST image (28×28 uint8) as another camera would take it: rescale 0.7–1.0 (re-centred),
    shift ±3 px, rotation ±12°, gamma 0.5–2.0, contrast 0.5–1.0 about the mean, Gaussian blur σ 0–1.2."""
    x = image.astype(np.float32) / 255.0
    x = _warp(x, rng.uniform(0.7, 1.0), rng.uniform(-12, 12), tuple(rng.uniform(-3, 3, 2)))
    x = np.clip(x, 0.0, 1.0) ** np.exp(rng.uniform(np.log(0.5), np.log(2.0)))
    x = x.mean() + rng.uniform(0.5, 1.0) * (x - x.mean())
    sigma = rng.uniform(0.0, 1.2)
    return _to_uint8(gaussian_filter(x, sigma) if sigma > 0.05 else x)


def _digits(n: int, rng: np.random.Generator) -> np.ndarray:
    from sklearn.datasets import load_digits

    source = load_digits().images.astype(np.float32) / 16.0
    out = np.empty((n, SIZE, SIZE), np.uint8)
    for i, k in enumerate(rng.integers(len(source), size=n)):
        x = _warp(
            source[k], rng.uniform(2.2, 3.0), rng.uniform(-15, 15), tuple(rng.uniform(-2, 2, 2)), rng.uniform(-0.2, 0.2)
        )
        out[i] = _to_uint8(gaussian_filter(x, rng.uniform(0.3, 0.8)) * rng.uniform(0.7, 1.0))
    return out


@lru_cache(maxsize=None)
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size=size)


@lru_cache(maxsize=1)
def _font_symbols() -> list[tuple[str, str]]:
    """(font path, the symbols of ``_SYMBOLS`` that font has a glyph for)."""
    from fontTools.ttLib import TTFont

    out = []
    for path in _FONTS:
        cmap = TTFont(str(path), lazy=True).getBestCmap() or {}
        out.append((str(path), "".join(c for c in _SYMBOLS if ord(c) in cmap)))
    return out


def _glyphs(n: int, rng: np.random.Generator) -> np.ndarray:
    fonts = _font_symbols()
    out = np.empty((n, SIZE, SIZE), np.uint8)
    for i in range(n):
        path, chars = fonts[rng.integers(len(fonts))]
        canvas = Image.new("L", (96, 96), 0)
        ImageDraw.Draw(canvas).text(
            (48, 48),
            chars[rng.integers(len(chars))],
            fill=255,
            font=_font(path, int(rng.choice([40, 56]))),
            anchor="mm",
            stroke_width=int(rng.integers(0, 3)),
            stroke_fill=255,
        )
        canvas = canvas.rotate(rng.uniform(-15, 15), resample=Image.BILINEAR)
        box = canvas.getbbox() or (40, 40, 56, 56)
        glyph = canvas.crop(box)
        side = rng.uniform(14, 24) / max(glyph.size)
        glyph = glyph.resize((max(1, round(glyph.width * side)), max(1, round(glyph.height * side))), Image.BILINEAR)
        frame = Image.new("L", (SIZE, SIZE), 0)
        dx, dy = rng.integers(-2, 3, 2)
        frame.paste(glyph, ((SIZE - glyph.width) // 2 + int(dx), (SIZE - glyph.height) // 2 + int(dy)))
        x = np.asarray(frame, np.float32) / 255.0 * rng.uniform(0.6, 1.0)
        out[i] = _to_uint8(gaussian_filter(x, rng.uniform(0.0, 0.7)))
    return out


def _shape_mask(rng: np.random.Generator, up: int = 4) -> np.ndarray:
    """An anti-aliased (drawn at ``up``× then box-reduced) filled ellipse, rotated rectangle or polygon."""
    big = SIZE * up
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy = rng.uniform(0.3, 0.7, 2) * big
    kind = rng.integers(3)
    if kind == 0:
        rx, ry = rng.uniform(0.12, 0.4, 2) * big
        ellipse = Image.new("L", (big, big), 0)
        ImageDraw.Draw(ellipse).ellipse((big / 2 - rx, big / 2 - ry, big / 2 + rx, big / 2 + ry), fill=255)
        canvas = ellipse.rotate(rng.uniform(0, 180), resample=Image.BILINEAR, translate=(cx - big / 2, cy - big / 2))
    else:
        corners = 4 if kind == 1 else int(rng.integers(3, 9))
        angles = (
            np.sort(rng.uniform(0, 2 * np.pi, corners)) if kind == 2 else np.array([0.25, 0.75, 1.25, 1.75]) * np.pi
        )
        radii = rng.uniform(0.15, 0.42, corners) * big if kind == 2 else np.full(corners, rng.uniform(0.15, 0.4) * big)
        stretch = np.array([1.0, rng.uniform(0.4, 1.0)]) if kind == 1 else np.ones(2)
        turn = rng.uniform(0, np.pi)
        pts = np.stack([np.cos(angles) * stretch[0], np.sin(angles) * stretch[1]], 1) * radii[:, None]
        pts = pts @ np.array([[np.cos(turn), np.sin(turn)], [-np.sin(turn), np.cos(turn)]]) + [cx, cy]
        draw.polygon([tuple(p) for p in pts], fill=255)
    return np.asarray(canvas.resize((SIZE, SIZE), Image.BOX), np.float32) / 255.0


def _shapes(n: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / (SIZE - 1)
    out = np.empty((n, SIZE, SIZE), np.uint8)
    for i in range(n):
        x = np.full((SIZE, SIZE), rng.uniform(0.0, 0.15), np.float32)
        for _ in range(int(rng.integers(1, 3))):
            t = rng.uniform(0, 2 * np.pi)
            ramp = np.cos(t) * xx + np.sin(t) * yy
            ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
            lo, hi = rng.uniform(0.2, 0.7), rng.uniform(0.7, 1.0)
            mask = _shape_mask(rng)
            x = x * (1 - mask) + mask * (lo + (hi - lo) * ramp)
        out[i] = _to_uint8(x)
    return out


def _photos(n: int, rng: np.random.Generator) -> np.ndarray:
    images = _natural_images()
    out = np.empty((n, SIZE, SIZE), np.uint8)
    for i in range(n):
        img = images[rng.integers(len(images))]
        side = int(rng.integers(SIZE, max(SIZE + 1, min(img.shape[:2]) // 2)))
        y, x = int(rng.integers(0, img.shape[0] - side + 1)), int(rng.integers(0, img.shape[1] - side + 1))
        crop = np.asarray(
            Image.fromarray(img[y : y + side, x : x + side].astype(np.float32), mode="F").resize(
                (SIZE, SIZE), Image.BOX
            )
        )
        out[i] = _to_uint8(crop[:, ::-1] if rng.random() < 0.5 else crop)
    return out


def _textures(n: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    out = np.empty((n, SIZE, SIZE), np.uint8)
    for i in range(n):
        t = rng.uniform(0, np.pi)
        u, v = np.cos(t) * xx + np.sin(t) * yy, -np.sin(t) * xx + np.cos(t) * yy
        kind = rng.integers(3)
        if kind == 0:  # grating, sine or square
            wave = np.sin(2 * np.pi * rng.uniform(0.05, 0.35) * u + rng.uniform(0, 2 * np.pi))
            wave = np.sign(wave) if rng.random() < 0.5 else wave
        elif kind == 1:  # checkerboard
            period = rng.uniform(3, 10)
            wave = np.sign(np.sin(np.pi * u / period) * np.sin(np.pi * v / period))
        else:  # smoothed noise, sometimes thresholded into blobs
            field = gaussian_filter(rng.standard_normal((SIZE, SIZE)), rng.uniform(1, 4), mode="wrap")
            wave = (field - field.mean()) / max(float(field.std()), 1e-6)
            wave = np.sign(wave) if rng.random() < 0.3 else np.clip(wave / 2, -1, 1)
        out[i] = _to_uint8(rng.uniform(0.3, 0.7) + rng.uniform(0.15, 0.5) * wave)
    return out


def _noise(n: int, rng: np.random.Generator) -> np.ndarray:
    kind = rng.integers(3, size=(n, 1, 1))
    mean, spread = rng.uniform(0.2, 0.8, (n, 1, 1)), rng.uniform(0.05, 0.4, (n, 1, 1))
    gauss = mean + spread * rng.standard_normal((n, SIZE, SIZE))
    uniform = mean + spread * rng.uniform(-1.7, 1.7, (n, SIZE, SIZE))
    salt = (rng.random((n, SIZE, SIZE)) < rng.uniform(0.05, 0.5, (n, 1, 1))).astype(np.float32)
    return _to_uint8(np.where(kind == 0, gauss, np.where(kind == 1, uniform, salt)))


_RENDER = {
    "digit": _digits,
    "glyph": _glyphs,
    "shape": _shapes,
    "photo": _photos,
    "texture": _textures,
    "noise": _noise,
}


def generate_fashion_pool(
    out_dir: str | Path,
    fashion_dir: str | Path | None = None,
    seed: int = 0,
    shard_size: int = 2000,
    counts: dict[str, int | None] | None = None,
    split_sizes: dict | None = None,
) -> str:
    """Write the pool (see the module docstring) as ``wild-%06d.tar`` shards plus ``meta.json`` in
    ``out_dir``; returns the brace URL of the shards.

    ``counts``: images per source, merged into ``DEFAULT_COUNTS`` (``fashion``: None = every wild image, N =
    the first N); ``split_sizes``: keyword arguments of ``fashion_splits`` (``wild_max``, ``wild_ratio``,
    ``val_per_class``; the module's constants by default)."""
    counts = {**DEFAULT_COUNTS, **(counts or {})}
    unknown = sorted(set(counts) - set(SOURCES))
    if unknown:
        raise ValueError(f"unknown pool sources {unknown}: use {', '.join(SOURCES)}")
    folder = find_fashion_dir(fashion_dir)
    wild_x, wild_y = fashion_splits(str(folder), **(split_sizes or {}))["wild"]
    n_fashion = len(wild_x) if counts["fashion"] is None else min(int(counts["fashion"]), len(wild_x))
    counts = {**counts, "fashion": n_fashion}
    rngs = dict(
        zip(
            SOURCES + ("order",),
            (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(len(SOURCES) + 1)),
        )
    )

    parts = [
        np.stack([reacquire(img, rngs["fashion"]) for img in wild_x[:n_fashion]])
        if n_fashion
        else np.empty((0, SIZE, SIZE), np.uint8)
    ]
    parts += [_RENDER[src](int(counts[src]), rngs[src]) for src in SOURCES[1:]]
    images = np.concatenate(parts)
    tags = np.repeat(np.array(SOURCES), [counts[s] for s in SOURCES])
    labels = np.concatenate([wild_y[:n_fashion], np.full(len(images) - n_fashion, -1)])
    order = rngs["order"].permutation(len(images))

    def samples():
        for i, j in enumerate(order):
            sample = {"__key__": f"wild{i:07d}", "png": encode_png(images[j]), "src": str(tags[j])}
            if labels[j] >= 0:  # true class, only where it is in the teacher's label space
                sample["cls"] = str(int(labels[j]))
            yield sample

    per_class = np.bincount(wild_y[:n_fashion], minlength=len(CLASSES))
    meta = {
        "version": POOL_VERSION,
        "seed": seed,
        "sources": counts,
        "image_size": SIZE,
        "classes": CLASSES,
        "fashion_per_class": {c: int(k) for c, k in zip(CLASSES, per_class)},
        "fashion_dir": str(folder),
    }
    shards = write_shards(samples(), out_dir, pattern="wild-%06d.tar", maxcount=shard_size, meta=meta)
    return shard_url(out_dir, len(shards), "wild")


def pool_dir(
    data_dir: str | Path = "data", seed: int = 0, split_sizes: dict | None = None, ood_scale: float = 1.0
) -> Path:
    """Where the pool of ``seed`` is built: ``data_dir/fashion-wild-v{POOL_VERSION}`` (``-s{seed}`` appended
    for a seed other than the benchmark's 0, and the sizes for other split sizes or an ``ood_scale``)."""
    sizes = {
        k: v
        for k, v in (split_sizes or {}).items()
        if v != {"wild_max": WILD_MAX, "val_per_class": VAL_PER_CLASS, "wild_ratio": WILD_RATIO}.get(k)
    }
    tail = "".join(f"-{k}{v}" for k, v in sorted(sizes.items())) + (f"-ood{ood_scale:g}" if ood_scale != 1.0 else "")
    return Path(data_dir) / (f"fashion-wild-v{POOL_VERSION}" + (f"-s{seed}" if seed else "") + tail)


def fashion_pool_urls(
    data_dir: str | Path = "data",
    fashion_dir: str | Path | None = None,
    seed: int = 0,
    split_sizes: dict | None = None,
    ood_scale: float = 1.0,
) -> str:
    """The brace URL of the pool under ``data_dir``, built first if it is not there (once, under a lock).
    ``ood_scale`` scales every out-of-distribution source's count (for tests)."""
    if not ood_scale > 0:
        raise VitkdInputError(f"--ood_scale {ood_scale} must be positive")
    pool = pool_dir(data_dir, seed, split_sizes, ood_scale)
    counts = (
        {s: max(1, round(n * ood_scale)) for s, n in DEFAULT_COUNTS.items() if s != "fashion"}
        if ood_scale != 1.0
        else None
    )
    build_once(
        pool,
        lambda: generate_fashion_pool(pool, fashion_dir, seed, counts=counts, split_sizes=split_sizes),
        done=pool / "meta.json",
    )
    return shard_url(pool, json.loads((pool / "meta.json").read_text())["shards"], "wild")


def add_size_args(p: argparse.ArgumentParser) -> None:
    """The pool's size options (``--wild_max``, ``--val_per_class``, ``--ood_scale``), smaller only for tests."""
    p.add_argument(
        "--wild_max",
        type=positive_int,
        default=WILD_MAX,
        help="split size: the largest class's held-out wild images (smaller only for tests)",
    )
    p.add_argument(
        "--val_per_class",
        type=positive_int,
        default=VAL_PER_CLASS,
        help="split size: validation images per class (smaller only for tests)",
    )
    p.add_argument(
        "--ood_scale",
        type=float,
        default=1.0,
        help="fraction of every out-of-distribution source's count (smaller only for tests)",
    )


def main(argv: list[str] | None = None) -> None:
    """``python -m data_modules.fashion_pool`` (``make data-fashion``): find or install Fashion-MNIST, build the
    benchmark's wild pool (``data_modules.fashion_pool``) once under ``--data_dir`` and print its shard URL."""
    p = OneLineParser(prog="python -m data_modules.fashion_pool", description=main.__doc__)
    p.add_argument("--data_dir", default="data", help="folder the pool is written under (default data)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the pool (default 0, the benchmark's)")
    add_size_args(p)
    a = p.parse_args(argv)
    folder = install_fashion()
    print(f"Fashion-MNIST: {folder}", file=sys.stderr, flush=True)
    try:
        url = fashion_pool_urls(
            a.data_dir,
            fashion_dir=folder,
            seed=a.seed,
            split_sizes={"wild_max": a.wild_max, "val_per_class": a.val_per_class},
            ood_scale=a.ood_scale,
        )
    except OSError as err:
        raise VitkdInputError(
            f"--data_dir {a.data_dir}: cannot write the pool there ({err.strerror or err}); name a writable folder"
        ) from None
    print(url)


if __name__ == "__main__":
    demo_main(main)
