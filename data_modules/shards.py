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
import re
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

    A damaged (truncated, bit-flipped, empty) shard is counted in ``skips`` (or raises when ``skips`` is
    strict or absent); the samples read before the damage are kept, and for a local file so are those
    after it that ``recovered_samples`` finds past the damaged bytes.
    """
    if not urls:
        return
    skips = skips or SkipCounter(strict=True)
    if split_by_worker:
        info = torch_worker_info()
        if info is not None:
            urls = list(urls)[info.id :: info.num_workers]
    for url in urls:
        damage: list[Exception] = []

        def handler(exn: Exception) -> bool:
            damage.append(exn)
            return skips.shard_error(exn)

        seen: set[str] = set()
        ds = wds.WebDataset(
            url, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False, handler=handler
        )
        for sample in ds:
            seen.add(sample["__key__"])
            yield sample
        local = "://" not in url and not url.startswith("pipe:") and os.path.isfile(url)
        if local and not damage and not _has_end_marker(url):  # cut at a member boundary: tarfile sees a clean end
            handler(tarfile.ReadError("truncated: no end-of-archive blocks"))
        if damage and local:
            yield from recovered_samples(url, seen)


def _has_end_marker(path: str) -> bool:
    """Whether a tar file ends with the two zero blocks every tar writer puts at the end of an archive."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        if size < 2 * tarfile.BLOCKSIZE:
            return False
        f.seek(size - 2 * tarfile.BLOCKSIZE)
        return not any(f.read(2 * tarfile.BLOCKSIZE))


def torch_worker_info():
    from torch.utils.data import get_worker_info  # torch is imported only when a stream runs in a loader

    return get_worker_info()


_MEMBER = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's key/extension split of a member name


def recovered_samples(path: str, seen: set[str]) -> Iterator[dict]:
    """The samples of a damaged tar that lie past its damage, not in ``seen``: every 512-byte block is tried
    as a tar header, and a member is kept when its header checksum holds and its data is all there.
    Written by hand: tarfile and webdataset stop at the first bad header, losing every sample after it."""
    import mmap

    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size < tarfile.BLOCKSIZE:
            return
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        key, group, pos = None, {}, 0
        while pos + tarfile.BLOCKSIZE <= len(data):
            try:
                info = tarfile.TarInfo.frombuf(data[pos : pos + tarfile.BLOCKSIZE], tarfile.ENCODING, "surrogateescape")
            except tarfile.HeaderError:
                pos += tarfile.BLOCKSIZE
                continue
            start = pos + tarfile.BLOCKSIZE
            end = start + info.size
            if end > len(data):  # its data was cut off
                pos = start
                continue
            match = _MEMBER.match(info.name) if info.isreg() else None
            if match:
                if match.group(1) != key:
                    if key is not None and key not in seen and group:
                        yield {"__key__": key, "__url__": path, **group}
                    key, group = match.group(1), {}
                group[match.group(2)] = bytes(data[start:end])
            pos = start + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        if key is not None and key not in seen and group:
            yield {"__key__": key, "__url__": path, **group}
    finally:
        data.close()


def _cause(exn: BaseException) -> str:
    """One line for a shard error: webdataset appends the URL (and more) to the exception's arguments."""
    first = exn.args[0] if exn.args else ""
    return f"{type(exn).__name__}: {first}" if first else type(exn).__name__


class SkipCounter:
    """Damaged shards and undecodable images met while streaming: skipped and counted, or raised if ``strict``.

    Counts live in shared memory so DataLoader workers (forked) add to the same totals.
    """

    def __init__(self, strict: bool = False):
        self.strict = strict
        self._shards, self._images = mp.Value("q", 0), mp.Value("q", 0)
        self.causes: list[str] = []  # this process's, in order: what damaged each shard
        self.image_causes: list[str] = []  # and what each skipped image had

    def __getstate__(self):  # a pickled copy (spawned process) starts its own counts
        return {"strict": self.strict, "counts": self.counts()}

    def __setstate__(self, state):
        self.__init__(state["strict"])
        self._shards.value, self._images.value = state["counts"]["damaged_shards"], state["counts"]["corrupt_images"]

    def shard_error(self, exn: Exception) -> bool:
        """webdataset handler: True = go on with the next shard."""
        if self.strict:
            raise VitkdInputError(
                f"damaged shard ({exn}): repack or remove it, or set --data.init_args.strict false to skip damaged data"
            )
        with self._shards.get_lock():
            self._shards.value += 1
        self.causes.append(_cause(exn))
        warnings.warn(f"skipped the damaged part of a shard: {exn}", stacklevel=2)
        return True

    def image_error(self, sample: dict, exn: Exception) -> None:
        if self.strict:
            raise VitkdInputError(
                f"shard sample {sample.get('__key__')!r} in {sample.get('__url__')} has an undecodable image ({exn}): "
                "repack the shard, or set --data.init_args.strict false to skip such samples"
            )
        with self._images.get_lock():
            self._images.value += 1
        self.image_causes.append(
            f"sample {sample.get('__key__')!r}: "
            f"{_cause(exn) if not isinstance(exn, VitkdInputError) else 'no png or jpg entry'}"
        )

    def add(self, other: "SkipCounter") -> None:
        for mine, theirs in ((self._shards, other._shards), (self._images, other._images)):
            with mine.get_lock():
                mine.value += theirs.value

    def counts(self) -> dict[str, int]:
        return {"damaged_shards": int(self._shards.value), "corrupt_images": int(self._images.value)}


def decode_or_skip(sample: dict, skips: SkipCounter) -> Image.Image | None:
    """The sample's image, fully decoded; None (counted in ``skips``) when it has no image entry (e.g. its
    member was lost to a damaged tar header), or its bytes are empty, fail a PNG checksum, or do not decode.
    With a strict ``skips`` these raise."""
    if not any(ext in sample for ext in IMAGE_EXTS):
        try:
            decode_image(sample)  # no png/jpg entry: raises the format error
        except VitkdInputError as exn:
            if skips.strict:
                raise
            skips.image_error(sample, exn)
            return None
    try:
        image = decode_image(sample)
        if "png" in sample:  # PNG carries a CRC per chunk: verify() catches flipped bits that would decode silently
            image.verify()
            image = decode_image(sample)
        image.load()
    except Exception as exn:  # PIL raises OSError, SyntaxError, ValueError, EOFError, DecompressionBombError...
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
            n = _count_tar(path)
        counts[u] = int(n)
    return counts


def _count_tar(path: Path) -> int:
    """Samples in a tar by its headers; a damaged tar counts those before the damage."""
    keys: set[str] = set()
    try:
        with tarfile.open(path) as tar:
            for m in tar:
                if m.isreg():
                    keys.add(m.name.split(".", 1)[0])
    except (tarfile.TarError, OSError, EOFError):
        pass
    return len(keys)


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
        f"shard sample {sample.get('__key__')!r} in {sample.get('__url__')} has no image: "
        "every sample needs a png or jpg entry"
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
    samples: Iterable[dict],
    out_dir: str | Path,
    pattern: str = "shard-%06d.tar",
    maxcount: int = 2000,
    meta: dict | None = None,
) -> list[Path]:
    """Write samples (dicts with ``__key__`` and byte/str/int fields) as tar shards in ``out_dir``, with a
    ``meta.json`` holding ``meta`` plus ``num_samples`` and ``shard_counts`` (samples per shard file).

    The whole directory is built under a temporary name and renamed into place at the end, so readers
    never see a partial set of shards.
    """
    counts: dict[str, int] = {}
    with atomic_dir(out_dir) as tmp:
        # webdataset's float member times give each member a pax header, so a damaged member header makes tarfile
        # raise (and the reader recover) where a plain ustar header would end the shard there silently
        with wds.ShardWriter(str(tmp / pattern), maxcount=maxcount, verbose=0) as sink:
            for s in samples:
                sink.write(s)
                name = Path(sink.fname).name
                counts[name] = counts.get(name, 0) + 1
        info = {**(meta or {}), "num_samples": sum(counts.values()), "shards": len(counts), "shard_counts": counts}
        with open(tmp / "meta.json", "w") as f:
            f.write(json.dumps(info, indent=1))
    return sorted(Path(out_dir).glob("*.tar"))


def shard_url(out_dir: str | Path, n: int, prefix: str) -> str:
    """Brace URL of ``n`` shards named ``{prefix}-%06d.tar`` in ``out_dir``."""
    return str(Path(out_dir) / (f"{prefix}-{{000000..{n - 1:06d}}}.tar" if n > 1 else f"{prefix}-000000.tar"))
