"""Shard format shared by every wild set, selection and packer (webdataset tar files).

Each sample: ``__key__``; the image as ``png`` or ``jpg``; optional ``cls`` (int label, ASCII); optional
``src`` (source tag, ASCII; never read by the selector, used only to measure selection precision).
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Iterable, Iterator

import braceexpand
import numpy as np
import webdataset as wds
from PIL import Image

from vitkd.errors import VitkdInputError
from vitkd.io import atomic_dir

IMAGE_EXTS = ("png", "jpg", "jpeg")


def expand_urls(urls: str | list[str]) -> list[str]:
    """Brace-expand shard URLs; local paths that do not exist give a one-line error naming them."""
    if isinstance(urls, str):
        urls = [urls]
    out: list[str] = []
    for u in urls:
        out.extend(braceexpand.braceexpand(u))
    for u in out:
        if "://" not in u and not u.startswith("pipe:") and not os.path.exists(u):
            raise VitkdInputError(f"shard {u} does not exist: check the path or brace range given in the shard URLs")
    if not out:
        raise VitkdInputError(f"no shards in {urls!r}: give a path such as 'dir/wild-{{000000..000009}}.tar'")
    return out


def raw_samples(urls: list[str], rank: int = 0, world_size: int = 1, shard_shuffle_seed: int | None = None) -> Iterator[dict]:
    """Undecoded samples (dicts of bytes with ``__key__`` and ``__url__``), shards split by rank."""

    def nodesplitter(src):
        yield from (u for i, u in enumerate(src) if i % world_size == rank)

    shardshuffle = False
    if shard_shuffle_seed is not None:
        shardshuffle = len(urls)
    ds = wds.WebDataset(
        urls,
        shardshuffle=shardshuffle,
        seed=shard_shuffle_seed,
        nodesplitter=nodesplitter,
        workersplitter=wds.split_by_worker,
        empty_check=False,
    )
    yield from ds


def decode_image(sample: dict) -> Image.Image:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return Image.open(io.BytesIO(sample[ext]))
    raise VitkdInputError(
        f"shard sample {sample.get('__key__')!r} in {sample.get('__url__')} has no image: every sample needs a png or jpg entry"
    )


def read_int(sample: dict, key: str = "cls") -> int | None:
    v = sample.get(key)
    return None if v is None else int(v.decode() if isinstance(v, bytes) else v)


def read_str(sample: dict, key: str = "src") -> str | None:
    v = sample.get(key)
    return None if v is None else (v.decode() if isinstance(v, bytes) else str(v))


def encode_png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def write_shards(samples: Iterable[dict], out_dir: str | Path, pattern: str = "shard-%06d.tar", maxcount: int = 2000) -> list[Path]:
    """Write samples (dicts with ``__key__`` and byte/str/int fields) as tar shards in ``out_dir``.

    The whole directory is built under a temporary name and renamed into place at the end, so readers
    never see a partial set of shards.
    """
    with atomic_dir(out_dir) as tmp:
        with wds.ShardWriter(str(tmp / pattern), maxcount=maxcount, verbose=0) as sink:
            for s in samples:
                sink.write(s)
    return sorted(Path(out_dir).glob("*.tar"))


def shard_url(out_dir: str | Path, n: int, prefix: str) -> str:
    """Brace URL of ``n`` shards named ``{prefix}-%06d.tar`` in ``out_dir``."""
    return str(Path(out_dir) / (f"{prefix}-{{000000..{n - 1:06d}}}.tar" if n > 1 else f"{prefix}-000000.tar"))
