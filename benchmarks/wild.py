"""Synthetic wild pool for the selector's scale benchmark: grayscale noise PNGs in webdataset shards.

Shards are written in parallel (one process per shard, each renamed into place when complete), and
reused when already present, so the 1M-sample pool is built once per machine.
"""

from __future__ import annotations

from multiprocessing import Pool
from pathlib import Path

import numpy as np
import webdataset as wds

from data_modules.shards import encode_png
from vitkd.io import atomic_path

SHARD_SIZE = 10_000


def _write_shard(args: tuple[Path, int, int, int]) -> None:
    path, index, size, side = args
    if path.is_file():
        return
    rng = np.random.default_rng(index)
    with atomic_path(path) as tmp:
        with wds.TarWriter(str(tmp)) as sink:  # one shard per process: ShardWriter's rollover is not needed
            for j in range(size):
                img = (rng.random((side, side)) * 255).astype(np.uint8)
                sink.write({"__key__": f"w{index:06d}_{j:05d}", "png": encode_png(img), "src": "noise"})


def wild_pool(folder: str | Path, num_samples: int, side: int = 8, processes: int = 2) -> str:
    """Shards ``wild-%06d.tar`` of ``SHARD_SIZE`` samples covering ``num_samples``; returns their brace URL."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n = -(-num_samples // SHARD_SIZE)
    jobs = [(folder / f"wild-{i:06d}.tar", i, SHARD_SIZE, side) for i in range(n)]
    todo = [j for j in jobs if not j[0].is_file()]
    if todo:
        with Pool(processes) as pool:
            pool.map(_write_shard, todo, chunksize=1)
    return str(folder / f"wild-{{000000..{n - 1:06d}}}.tar")
