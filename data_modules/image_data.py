"""LightningDataModules: an original labeled set plus shard streams (wild pool, selected shards).

``ImageDataModule`` holds what every original data set shares: the eval pipeline, the split of a shard
stream into train and held-out validation, and the wild stream the selector scores. Subclasses give
the original train/val/test arrays (``DigitsDataModule`` here; real formats in later modules).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterator

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from data_modules import shards
from data_modules.transforms import random_affine, to_tensor
from vitkd.errors import VitkdInputError


class ArrayDataset(Dataset):
    """uint8 images (N, H, W) with int labels → (image tensor, label)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, in_chans: int, img_size: int):
        self.images, self.labels = images, labels
        self.in_chans, self.img_size = in_chans, img_size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return to_tensor(self.images[i], self.in_chans, self.img_size), int(self.labels[i])


def _held_out(key: str, fraction: float) -> bool:
    """Deterministic split of a stream by key: the same sample is always on the same side."""
    return int(hashlib.md5(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


class ShardStream(IterableDataset):
    """Decoded samples from shards: (image, cls) for training, or a dict with key/src for scoring.

    Shards are split by the trainer's rank and world size (set in ``setup``), then by DataLoader worker.
    """

    def __init__(
        self,
        urls: list[str],
        in_chans: int,
        img_size: int,
        part: str = "all",
        val_fraction: float = 0.0,
        with_meta: bool = False,
        shuffle_seed: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.urls, self.in_chans, self.img_size = urls, in_chans, img_size
        self.part, self.val_fraction = part, val_fraction
        self.with_meta, self.shuffle_seed = with_meta, shuffle_seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def __iter__(self) -> Iterator:
        seed = None if self.shuffle_seed is None else self.shuffle_seed + self.epoch
        self.epoch += 1
        stream = shards.raw_samples(self.urls, self.rank, self.world_size, seed)
        buffer: list = []
        rng = np.random.default_rng(seed)
        for sample in stream:
            key = sample["__key__"]
            if self.part != "all" and _held_out(key, self.val_fraction) != (self.part == "val"):
                continue
            item = self._decode(sample)
            if seed is None:
                yield item
                continue
            # sample-level shuffle buffer (shard order is already shuffled per epoch)
            buffer.append(item)
            if len(buffer) >= 2048:
                yield buffer.pop(int(rng.integers(len(buffer))))
        if buffer:
            rng.shuffle(buffer)
        yield from buffer

    def _decode(self, sample: dict):
        x = to_tensor(shards.decode_image(sample), self.in_chans, self.img_size)
        if self.with_meta:
            return {"image": x, "key": sample["__key__"], "src": shards.read_str(sample) or ""}
        label = shards.read_int(sample)
        if label is None:
            raise VitkdInputError(
                f"shard sample {sample['__key__']!r} in {sample.get('__url__')} has no cls label: train on selected shards (they carry the teacher's pseudo-label)"
            )
        return x, label


def _collate_meta(batch: list[dict]) -> dict:
    return {"image": torch.stack([b["image"] for b in batch]), "key": [b["key"] for b in batch], "src": [b["src"] for b in batch]}


class ImageDataModule(pl.LightningDataModule):
    """Original labeled data + optional shard streams.

    Args:
        img_size: side of the square model input.
        in_chans: channels of the model input.
        batch_size: training batch size (per process).
        eval_batch_size: batch size for validation, test and scoring.
        num_workers: DataLoader worker processes.
        augment: random affine augmentation of training batches (applied to whole batches after transfer).
        train_urls: shards to train on instead of the original training split (e.g. a selection's
            ``selected/shard-{000000..000002}.tar``); validation is then a held-out slice of them.
        val_fraction: fraction of ``train_urls`` samples held out (by key) for validation.
        wild_urls: shards the selector scores; ``None`` means the data set's embedded wild pool.
        data_dir: where embedded data is written on first use.
    """

    num_classes: int = 10

    def __init__(
        self,
        img_size: int = 16,
        in_chans: int = 1,
        batch_size: int = 128,
        eval_batch_size: int = 512,
        num_workers: int = 0,
        augment: bool = True,
        train_urls: str | None = None,
        val_fraction: float = 0.05,
        wild_urls: str | None = None,
        data_dir: str = "data",
    ):
        super().__init__()
        self.save_hyperparameters()
        self.img_size, self.in_chans = img_size, in_chans
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.augment, self.train_urls, self.val_fraction = augment, train_urls, val_fraction
        self.wild_urls, self.data_dir = wild_urls, Path(data_dir)

    # -- what a subclass provides -------------------------------------------------------------
    def original_split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """uint8 images and int labels of the original ``train``/``val``/``test`` split."""
        raise NotImplementedError

    def embedded_wild_urls(self) -> str:
        """Shard URL of the data set's embedded wild pool, written on first use."""
        raise VitkdInputError(f"{type(self).__name__} has no embedded wild pool: pass --data.wild_urls 'dir/wild-{{000000..000009}}.tar'")

    # -- loaders ------------------------------------------------------------------------------
    def _rank(self) -> tuple[int, int]:
        t = self.trainer
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    def _loader(self, ds, batch_size: int, shuffle: bool = False, collate_fn=None) -> DataLoader:
        return DataLoader(
            ds,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_fn,
        )

    def _original(self, split: str) -> ArrayDataset:
        x, y = self.original_split(split)
        return ArrayDataset(x, y, self.in_chans, self.img_size)

    def _stream(self, urls: str, **kw) -> ShardStream:
        rank, world = self._rank()
        return ShardStream(shards.expand_urls(urls), self.in_chans, self.img_size, rank=rank, world_size=world, **kw)

    def train_dataloader(self) -> DataLoader:
        if self.train_urls:
            seed = torch.initial_seed() % (2**31)
            stream = self._stream(self.train_urls, part="train", val_fraction=self.val_fraction, shuffle_seed=seed)
            return self._loader(stream, self.batch_size)
        return self._loader(self._original("train"), self.batch_size, shuffle=True)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if self.augment and self.trainer is not None and self.trainer.training:
            x, y = batch
            batch = (random_affine(x), y)
        return batch

    def val_dataloader(self) -> DataLoader:
        if self.train_urls:
            return self._loader(self._stream(self.train_urls, part="val", val_fraction=self.val_fraction), self.eval_batch_size)
        return self._loader(self._original("val"), self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._original("test"), self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        """The wild stream, with keys and source tags, for the selector."""
        urls = self.wild_urls or self.embedded_wild_urls()
        return self._loader(self._stream(urls, with_meta=True), self.eval_batch_size, collate_fn=_collate_meta)
