"""Shard format shared by every wild set, selection and packer (webdataset tar files).

Each sample: ``__key__``; the image as ``png`` or ``jpg``; optional ``cls`` (int label, ASCII); optional
``src`` (source tag, ASCII). In a wild set the selector never chooses by ``src`` or ``cls``: they only
measure a selection (precision by source; how often the teacher's pseudo-label equals ``cls``).
"""
from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
import tarfile
import warnings
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


def shard_order(urls: list[str], rank: int = 0, world_size: int = 1, shuffle_seed: int | None = None) -> list[str]:
    """This rank's shards: a seeded permutation (the same on every rank) then every ``world_size``-th.

    Shuffling before the split (webdataset shuffles after it) moves shards between ranks from epoch to epoch.
    """
    order = list(urls)
    if shuffle_seed is not None:
        order = [order[i] for i in np.random.default_rng(shuffle_seed).permutation(len(order))]
    return order[rank::world_size]


def raw_samples(urls: list[str], skips: "SkipCounter | None" = None, split_by_worker: bool = True) -> Iterator[dict]:
    """Undecoded samples (dicts of bytes with ``__key__`` and ``__url__``) of ``urls``, in order (a rank's
    share comes from ``shard_order``); split between DataLoader workers unless ``split_by_worker`` is off.

    A damaged (e.g. truncated) shard ends early: the samples read before the damage are kept, the shard is
    counted in ``skips`` (or raises when ``skips`` is strict or absent).
    """
    if not urls:
        return
    ds = wds.WebDataset(
        urls,
        shardshuffle=False,
        nodesplitter=None,
        workersplitter=wds.split_by_worker if split_by_worker else None,
        empty_check=False,
        handler=(skips or SkipCounter(strict=True)).shard_error,
    )
    yield from ds


class SkipCounter:
    """Damaged shards and undecodable images met while streaming: skipped and counted, or raised if ``strict``.

    Counts live in shared memory so DataLoader workers (forked) add to the same totals.
    """

    def __init__(self, strict: bool = False):
        self.strict = strict
        self._shards, self._images = mp.Value("q", 0), mp.Value("q", 0)

    def __getstate__(self):  # a pickled copy (spawned process) starts its own counts
        return {"strict": self.strict, "counts": self.counts()}

    def __setstate__(self, state):
        self.__init__(state["strict"])
        self._shards.value, self._images.value = state["counts"]["damaged_shards"], state["counts"]["corrupt_images"]

    def shard_error(self, exn: Exception) -> bool:
        """webdataset handler: True = go on with the next shard."""
        if self.strict:
            raise VitkdInputError(f"damaged shard ({exn}): repack or remove it, or set --data.init_args.strict false to skip damaged data")
        with self._shards.get_lock():
            self._shards.value += 1
        warnings.warn(f"skipped the rest of a damaged shard: {exn}")
        return True

    def image_error(self, sample: dict, exn: Exception) -> None:
        if self.strict:
            raise VitkdInputError(
                f"shard sample {sample.get('__key__')!r} in {sample.get('__url__')} has an undecodable image ({exn}): "
                "repack the shard, or set --data.init_args.strict false to skip such samples"
            )
        with self._images.get_lock():
            self._images.value += 1

    def add(self, other: "SkipCounter") -> None:
        for mine, theirs in ((self._shards, other._shards), (self._images, other._images)):
            with mine.get_lock():
                mine.value += theirs.value

    def counts(self) -> dict[str, int]:
        return {"damaged_shards": int(self._shards.value), "corrupt_images": int(self._images.value)}


def decode_or_skip(sample: dict, skips: SkipCounter) -> Image.Image | None:
    """The sample's image, fully decoded; None (counted in ``skips``) when its bytes do not decode."""
    try:
        image = decode_image(sample)
        image.load()
    except VitkdInputError:
        raise  # no image entry at all: a format error, not damage
    except (OSError, SyntaxError, ValueError) as exn:
        skips.image_error(sample, exn)
        return None
    return image


def shard_counts(urls: list[str]) -> dict[str, int] | None:
    """Samples per shard: from a ``meta.json`` beside the shards (written by vitkd's packers and selector),
    else by listing local tars (headers only). None for remote shards with no meta.json."""
    counts: dict[str, int] = {}
    metas: dict[Path, dict] = {}
    for u in urls:
        if "://" in u or u.startswith("pipe:"):
            return None
        path = Path(u)
        meta = metas.setdefault(path.parent, _read_meta(path.parent / "meta.json"))
        n = meta.get(path.name)
        if n is None:
            with tarfile.open(path) as tar:
                n = len({m.name.split(".", 1)[0] for m in tar if m.isreg()})
        counts[u] = int(n)
    return counts


def _read_meta(path: Path) -> dict[str, int]:
    """``{shard file name: samples}`` from the ``shard_counts`` of a meta.json (``write_shards``, ``vitkd.pack``)."""
    if not path.is_file():
        return {}
    per = json.loads(path.read_text()).get("shard_counts") or {}
    return {Path(k).name: int(v) for k, v in per.items()}


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


def write_shards(
    samples: Iterable[dict], out_dir: str | Path, pattern: str = "shard-%06d.tar", maxcount: int = 2000, meta: dict | None = None
) -> list[Path]:
    """Write samples (dicts with ``__key__`` and byte/str/int fields) as tar shards in ``out_dir``, with a
    ``meta.json`` holding ``meta`` plus ``num_samples`` and ``shard_counts`` (samples per shard file).

    The whole directory is built under a temporary name and renamed into place at the end, so readers
    never see a partial set of shards.
    """
    counts: dict[str, int] = {}
    with atomic_dir(out_dir) as tmp:
        with wds.ShardWriter(str(tmp / pattern), maxcount=maxcount, verbose=0) as sink:
            for s in samples:
                sink.write(s)
                name = Path(sink.fname).name
                counts[name] = counts.get(name, 0) + 1
        info = {**(meta or {}), "num_samples": sum(counts.values()), "shards": len(counts), "shard_counts": counts}
        (tmp / "meta.json").write_text(json.dumps(info, indent=1))
    return sorted(Path(out_dir).glob("*.tar"))


def shard_url(out_dir: str | Path, n: int, prefix: str) -> str:
    """Brace URL of ``n`` shards named ``{prefix}-%06d.tar`` in ``out_dir``."""
    return str(Path(out_dir) / (f"{prefix}-{{000000..{n - 1:06d}}}.tar" if n > 1 else f"{prefix}-000000.tar"))
