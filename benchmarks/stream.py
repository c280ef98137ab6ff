"""Training samples per second of ``ShardStream`` over the digits demo's kept-set size."""

from __future__ import annotations

import tempfile
import time
from typing import Any

import numpy as np

from data_modules.shards import encode_png, expand_urls, write_shards
from data_modules.stream import ShardStream

STREAM_SAMPLES, STREAM_SHARD = 12_000, 2_000  # the digits demo's kept set: 12,000 samples in 6 shards


def bench_stream(epochs: int = 3) -> dict[str, Any]:
    """Training samples per second of ``ShardStream`` (tar parsing, PNG decoding, to_tensor, the shuffle
    buffer) over the digits demo's kept-set size, per epoch, without and with ``memory_cache``."""
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {"samples": STREAM_SAMPLES, "shard_size": STREAM_SHARD, "img": "8x8 grey PNG -> 16x16"}
    with tempfile.TemporaryDirectory() as tmp:
        samples = (
            {"__key__": f"s{i:06d}", "png": encode_png((rng.random((8, 8)) * 255).astype(np.uint8)), "cls": str(i % 10)}
            for i in range(STREAM_SAMPLES)
        )
        write_shards(samples, tmp, pattern="shard-%06d.tar", maxcount=STREAM_SHARD)
        urls = expand_urls(f"{tmp}/shard-{{000000..{STREAM_SAMPLES // STREAM_SHARD - 1:06d}}}.tar")
        for cache in (False, True):
            ds = ShardStream(urls, 1, 16, shuffle_seed=0, epoch_samples=STREAM_SAMPLES, memory_cache=cache)
            per_epoch = []
            for _ in range(epochs):
                t0 = time.perf_counter()
                n = sum(1 for _ in ds)
                per_epoch.append(n / (time.perf_counter() - t0))
            out["memory_cache" if cache else "plain"] = {"images_per_s_per_epoch": per_epoch}
    plain, cached = out["plain"]["images_per_s_per_epoch"], out["memory_cache"]["images_per_s_per_epoch"]
    out["speedup_epoch_2_on"] = cached[1] / plain[1]
    return out
