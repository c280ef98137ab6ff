"""Datasets behind the data modules: in-memory arrays, and shard streams split by process, worker and
held-out fraction (``ShardStream`` yields samples, ``ShardBatches`` yields whole per-shard batches for scoring)."""

from __future__ import annotations

import hashlib
import itertools
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from data_modules import shards
from data_modules.transforms import to_tensor
from vitkd.errors import VitkdInputError


class ArrayDataset(Dataset):
    """uint8 images (N, H, W) with int labels → (image tensor, label), plus the index as the sample key if asked."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, in_chans: int, img_size: int, keys: bool = False):
        self.images, self.labels = images, labels
        self.in_chans, self.img_size, self.keys = in_chans, img_size, keys

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        item = to_tensor(self.images[i], self.in_chans, self.img_size), int(self.labels[i])
        return (*item, str(i)) if self.keys else item


def _held_out(key: str, fraction: float) -> bool:
    """Deterministic split of a stream by key: the same sample is always on the same side."""
    return int(hashlib.md5(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class ShardStream(IterableDataset):
    """Decoded (image, cls) samples from shards, for training and evaluation (scoring reads ``ShardBatches``).

    Training (``epoch_samples`` set): every epoch the shards are permuted with a seed shared by all ranks
    and dealt to the ranks (``rank``/``world_size`` come from the trainer), then to DataLoader workers;
    each rank yields exactly ``epoch_samples`` samples, cycling through its shards if they hold fewer, so
    every rank runs the same number of batches (DDP never waits on a rank that ran dry).
    Evaluation (``epoch_samples`` None): one pass, every sample exactly once over all ranks: shards are
    split by rank, or samples are when there are fewer shards than ranks.
    Undecodable images and damaged shards are skipped and counted in ``skips`` (raise if it is strict).
    ``keys``: yield (image, cls, ``__key__``) instead of (image, cls).
    ``memory_cache``: keep each shard's decoded samples in memory after its first read, so later epochs skip
    the tar parsing and image decoding (for shard sets that fit in RAM: samples × C × H × W × 4 bytes). The
    shard order and the sample shuffle still change every epoch; with DataLoader workers the cache needs
    ``persistent_workers`` (``ImageDataModule`` sets it), and it is used only when shards are dealt whole.
    """

    def __init__(
        self,
        urls: list[str],
        in_chans: int,
        img_size: int,
        part: str = "all",
        val_fraction: float = 0.0,
        shuffle_seed: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        epoch_samples: int | None = None,
        skips: shards.SkipCounter | None = None,
        keys: bool = False,
        memory_cache: bool = False,
    ):
        self.urls, self.in_chans, self.img_size, self.keys = urls, in_chans, img_size, keys
        self.memory_cache, self._memory = memory_cache, {}  # shard URL → its decoded samples (this part)
        self.part, self.val_fraction = part, val_fraction
        self.shuffle_seed = shuffle_seed
        self.rank, self.world_size = rank, world_size
        self.epoch_samples = epoch_samples
        self.skips = skips if skips is not None else shards.SkipCounter()
        self.epoch = 0

    def __len__(self) -> int:
        if self.epoch_samples is None:
            raise TypeError("an evaluation stream has no fixed length")
        return self.epoch_samples

    def _samples(self, seed: int | None) -> Iterator:
        """One pass over this rank's and worker's share of the shards, filtered to ``part``, decoded."""
        worker, workers = _worker()
        if self.epoch_samples is None and len(self.urls) < self.world_size:
            # fewer shards than ranks: every rank reads every shard and keeps every world_size-th sample
            mine, sample_split = shards.shard_order(self.urls, 0, 1, seed), (self.rank, self.world_size)
        else:
            mine, sample_split = shards.shard_order(self.urls, self.rank, self.world_size, seed), (0, 1)
        if len(mine) >= workers:
            mine, worker_split = mine[worker::workers], (0, 1)
        else:
            worker_split = (worker, workers)
        if self.memory_cache and sample_split == (0, 1) and worker_split == (0, 1):
            for url in mine:
                if url not in self._memory:
                    self._memory[url] = list(self._read([url]))
                yield from self._memory[url]
            return
        yield from self._read(mine, sample_split, worker_split)

    def _read(
        self, urls: list[str], sample_split: tuple[int, int] = (0, 1), worker_split: tuple[int, int] = (0, 1)
    ) -> Iterator:
        """Samples of ``urls`` in order, keeping this rank's and worker's share and ``part``, decoded."""
        stream = shards.raw_samples(urls, skips=self.skips, split_by_worker=False)
        for i, sample in enumerate(stream):
            if i % sample_split[1] != sample_split[0] or (i // sample_split[1]) % worker_split[1] != worker_split[0]:
                continue
            key = sample["__key__"]
            if self.part != "all" and _held_out(key, self.val_fraction) != (self.part == "val"):
                continue
            item = self._decode(sample)
            if item is not None:
                yield item

    def _quota(self) -> int | None:
        """Samples this worker yields this epoch (None: one natural pass)."""
        if self.epoch_samples is None:
            return None
        worker, workers = _worker()
        return self.epoch_samples // workers + (1 if worker < self.epoch_samples % workers else 0)

    def __iter__(self) -> Iterator:
        seed = None if self.shuffle_seed is None else self.shuffle_seed + self.epoch
        self.epoch += 1
        quota = self._quota()
        if quota is None:
            items = self._samples(seed)
        else:
            items = itertools.islice(self._cycle(seed), quota)
        if seed is None:
            yield from items
            return
        # sample-level shuffle buffer (the shard order is already shuffled per epoch)
        rng = np.random.default_rng(seed)
        buffer: list = []
        for item in items:
            buffer.append(item)
            if len(buffer) >= 2048:
                yield buffer.pop(int(rng.integers(len(buffer))))
        rng.shuffle(buffer)
        yield from buffer

    def _cycle(self, seed: int | None) -> Iterator:
        for rep in itertools.count():
            n = 0
            for item in self._samples(None if seed is None else seed + 100_003 * rep):
                n += 1
                yield item
            if n == 0:
                raise VitkdInputError(
                    f"no {self.part} samples in shards {self.urls[:3]}...: "
                    "check the shard URLs and --data.init_args.val_fraction"
                )

    def _decode(self, sample: dict):
        image = shards.decode_or_skip(sample, self.skips)
        if image is None:
            return None
        x = to_tensor(image, self.in_chans, self.img_size)
        label = shards.read_int(sample)
        if label is None:
            raise VitkdInputError(
                f"shard sample {sample['__key__']!r} in {sample.get('__url__')} has no cls label: "
                "train on selected shards (they carry the teacher's pseudo-label)"
            )
        return (x, label, sample["__key__"]) if self.keys else (x, label)


class ShardBatches(IterableDataset):
    """Scoring batches for the selector, one shard at a time: each shard is read whole by one worker and cut
    into batches of dicts (``image``, ``key``, ``src``, ``cls`` (-1 where a sample has none), ``url``, ``last``).
    ``last`` marks a shard's final batch (possibly empty), so a consumer knows when a shard is finished and can save
    its scores.
    Batches never mix shards, so a sample's batch (and its score) does not depend on the number of ranks.
    A damaged shard or a bad image is skipped as in the training streams (``shards.decode_or_skip``); the last
    batch carries the shard's own ``skipped`` counts (``damaged_shards``, ``corrupt_images``), the samples
    ``read`` from it, and the ``causes`` (the shard's damage, the first skipped images')."""

    def __init__(self, urls: list[str], in_chans: int, img_size: int, batch_size: int, skips: shards.SkipCounter):
        self.urls, self.in_chans, self.img_size, self.batch_size, self.skips = (
            urls,
            in_chans,
            img_size,
            batch_size,
            skips,
        )

    def __iter__(self) -> Iterator[dict]:
        worker, workers = _worker()
        for url in self.urls[worker::workers]:
            skips = shards.SkipCounter(self.skips.strict)  # this shard's own counts, reported with its last batch
            pending: list = []
            read = 0
            for sample in shards.raw_samples([url], skips=skips, split_by_worker=False):
                read += 1
                image = shards.decode_or_skip(sample, skips)
                if image is None:
                    continue
                cls = shards.read_int(sample)
                pending.append(
                    (
                        to_tensor(image, self.in_chans, self.img_size),
                        sample["__key__"],
                        shards.read_str(sample) or "",
                        -1 if cls is None else cls,
                    )
                )
                if len(pending) == self.batch_size:
                    yield self._batch(pending, url)
                    pending = []
            self.skips.add(skips)
            skipped = {**skips.counts(), "read": read, "causes": skips.causes + skips.image_causes[:3]}
            yield {**self._batch(pending, url), "last": True, "skipped": skipped}

    def _batch(self, items: list, url: str) -> dict:
        image = (
            torch.stack([i[0] for i in items]) if items else torch.zeros(0, self.in_chans, self.img_size, self.img_size)
        )
        return {
            "image": image,
            "key": [i[1] for i in items],
            "src": [i[2] for i in items],
            "cls": [i[3] for i in items],
            "url": url,
            "last": False,
        }
