"""Pack and decode rates (images/s) of ``vitkd.pack`` on synthetic data written in real formats.

Two sources: MNIST-style gzipped IDX (28×28 grey strokes, stored as PNG at 28) and an ImageNet-style
folder of 500×375 JPEGs in 10 class folders (resized to 32×32 PNG, the paper's ImageNet-32 setting).
Pack rate = images / wall time of ``pack`` (reading, resizing, encoding, writing shards; the source
files are written beforehand and not timed). Decode rate = images / wall time of streaming the shards
back and decoding every image to an array in one process (what one DataLoader worker does).

``run(tmp_dir, n=...)`` returns the figures as a dict (``bench_pack()``: in a temporary folder, for ``make bench``);
``python -m benchmarks.pack_bench`` prints them.
"""

from __future__ import annotations

import argparse
import gzip
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from data_modules import shards
from vitkd.pack import default_workers, pack


def _strokes(rng: np.random.Generator, size: int = 28) -> np.ndarray:
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 5))):
        draw.line(
            [tuple(rng.integers(4, size - 4, 2).tolist()) for _ in range(3)], fill=255, width=int(rng.integers(2, 4))
        )
    return np.asarray(img)


def write_mnist(root: Path, n: int, seed: int = 0) -> None:
    """n images and labels as ``train-images-idx3-ubyte.gz`` / ``train-labels-idx1-ubyte.gz``."""
    rng = np.random.default_rng(seed)
    images = np.stack([_strokes(rng) for _ in range(n)])
    labels = rng.integers(0, 10, n).astype(np.uint8)
    root.mkdir(parents=True, exist_ok=True)
    for name, arr in (("train-images-idx3-ubyte", images), ("train-labels-idx1-ubyte", labels)):
        head = bytes([0, 0, 0x08, arr.ndim]) + np.asarray(arr.shape, dtype=">i4").tobytes()
        with gzip.open(root / f"{name}.gz", "wb", compresslevel=6) as f:
            f.write(head + arr.tobytes())


def write_jpeg_folder(root: Path, n: int, seed: int = 0, size: tuple[int, int] = (500, 375)) -> None:
    """n photo-like JPEGs (smooth colour gradients plus noise) in 10 class folders."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(n):
        a = rng.uniform(0.005, 0.03, 3)
        rgb = np.stack(
            [127 + 100 * np.sin(a[c] * (xx + rng.uniform(0, w)) + a[(c + 1) % 3] * yy) for c in range(3)], -1
        )
        rgb += rng.normal(0, 12, rgb.shape)
        path = root / f"n{i % 10:08d}" / f"img_{i:06d}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(path, format="JPEG", quality=90)


def _decode_rate(url: str) -> tuple[float, int]:
    t0, k = time.perf_counter(), 0
    for sample in shards.raw_samples(shards.expand_urls(url)):
        np.asarray(shards.decode_image(sample))
        k += 1
    return k / (time.perf_counter() - t0), k


def run(
    tmp_dir: str | Path, n: int = 4000, n_jpeg: int | None = None, workers: int | None = None, shard_size: int = 500
) -> dict:
    """Pack and decode rates for ``n`` MNIST-format and ``n_jpeg`` (default n // 8) JPEG-folder images."""
    tmp = Path(tmp_dir)
    workers = workers or default_workers()
    n_jpeg = n_jpeg or max(1, n // 8)
    write_mnist(tmp / "mnist_src", n)
    write_jpeg_folder(tmp / "jpeg_src", n_jpeg)
    out: dict = {
        "workers": workers,
        "shard_size": shard_size,
        "n_mnist": n,
        "n_jpeg": n_jpeg,
        "jpeg_source_size": [500, 375],
    }
    for tag, fmt, src, size in (
        ("mnist", "mnist", tmp / "mnist_src", None),
        ("jpeg_folder", "folder", tmp / "jpeg_src", 32),
    ):
        t0 = time.perf_counter()
        meta = pack(fmt, src, tmp / f"{tag}_shards", size=size, shard_size=shard_size, workers=workers, progress=False)
        seconds = time.perf_counter() - t0
        rate, count = _decode_rate(meta["url"])
        assert count == meta["num_samples"], (count, meta["num_samples"])
        shard_bytes = sum(p.stat().st_size for p in (tmp / f"{tag}_shards").glob("*.tar"))
        out[f"pack_{tag}_images_per_s"] = round(meta["num_samples"] / seconds, 1)
        out[f"decode_{tag}_images_per_s"] = round(rate, 1)
        out[f"shard_bytes_per_image_{tag}"] = round(shard_bytes / meta["num_samples"], 1)
    return out


def bench_pack() -> dict:
    """``run`` in a temporary folder at its default sizes: the ``pack`` figures of ``make bench``."""
    with tempfile.TemporaryDirectory() as tmp:
        return run(tmp)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=4000)
    p.add_argument("--workers", type=int, default=None)
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(run(tmp, n=a.n, workers=a.workers), indent=2))


if __name__ == "__main__":
    main()
