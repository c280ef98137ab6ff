"""LightningDataModules: an original labeled set plus shard streams (wild pool, selected shards).

``ImageDataModule`` holds what every original data set shares: the eval pipeline, the split of a shard
stream into train and held-out validation, and the wild stream the selector scores. Subclasses give
the original train/val/test arrays (``DigitsDataModule`` here; real formats in later modules).
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset

from data_modules import shards
from data_modules.stream import ArrayDataset, ShardBatches, ShardStream
from data_modules.transforms import random_affine, view_affine
from vitkd.data_contract import DataFreeData, KeyedTrainData, ReportingData, ScoringData
from vitkd.errors import VitkdInputError


class ImageDataModule(pl.LightningDataModule, KeyedTrainData, DataFreeData, ScoringData, ReportingData):
    """Original labeled data + optional shard streams; implements every stage's data protocol
    (``vitkd.data_contract``).

    Args:
        img_size: side of the square model input.
        in_chans: channels of the model input.
        batch_size: training batch size (per process).
        eval_batch_size: batch size for validation, test and scoring.
        num_workers: DataLoader worker processes.
        augment: random affine augmentation of training batches (applied to whole batches after transfer).
        augment_views: 0: a fresh draw of the augmentation each time a sample comes back; ``K`` > 0: each
            training sample has ``K`` fixed augmented views (``view_affine``, drawn from the run's seed, the
            sample's key and the view), view ``epoch mod K`` in each epoch, so a frozen teacher's outputs for
            every view can be kept (``--model.init_args.teacher_cache true``) and its forward runs in ``K``
            epochs instead of all of them. Training batches then carry keys ``<key>@<view>``.
        view_seed: the seed of the fixed views; ``None``: the run's seed, so each seed of a sweep sees its
            own views. A number gives every run the same views (as FKD's soft labels, stored once for all
            runs: arXiv 2112.01528), so the runs of several seeds can share the teacher's outputs
            (``--model.init_args.teacher_cache_file``). Unused without fixed views.
        train_urls: shards to train on instead of the original training split (e.g. a selection's
            ``selected/shard-{000000..000002}.tar``); validation is then a held-out slice of them.
        val_fraction: fraction of ``train_urls`` samples held out (by key) for validation.
        val_urls, test_urls: shards of the validation and test splits, instead of the data set's own arrays
            (packed original sets); ``val_urls`` replaces the held-out slice of ``train_urls``.
        wild_urls: shards the selector scores; ``None`` means the data set's embedded wild pool.
        epoch_samples: training samples per epoch over all ranks when training on shards; ``None``: the
            shards' sample count (from their ``meta.json`` or tar listing) × (1 − ``val_fraction``). On the
            original data, a random subset of that many training images each epoch (all of them if fewer).
        strict: raise on a damaged shard or an undecodable image, instead of skipping and counting it.
        memory_cache: keep the decoded samples of ``train_urls`` (and of ``val_urls``) in memory after the first
            epoch, so later epochs skip the tar parsing and decoding (``ShardStream``); for shard sets that fit
            in RAM: shards are dealt afresh every epoch, so each rank (and each DataLoader worker) may come to
            hold all of them, samples × in_chans × img_size² × 4 bytes. The digits demo's 12,000 kept samples
            take 12 MB.
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
        augment_views: int = 0,
        view_seed: int | None = None,
        train_urls: str | None = None,
        val_fraction: float = 0.05,
        val_urls: str | None = None,
        test_urls: str | None = None,
        wild_urls: str | None = None,
        epoch_samples: int | None = None,
        strict: bool = False,
        memory_cache: bool = False,
        data_dir: str = "data",
    ):
        super().__init__()
        if augment_views < 0:
            raise VitkdInputError(
                f"--data.init_args.augment_views {augment_views} must be 0 (a fresh draw every epoch) "
                "or a positive number of fixed views per sample"
            )
        for name, value in (
            ("img_size", img_size),
            ("in_chans", in_chans),
            ("batch_size", batch_size),
            ("eval_batch_size", eval_batch_size),
        ):
            if value < 1:
                raise VitkdInputError(f"--data.init_args.{name} {value} must be a positive integer")
        for name, value in (
            ("train_urls", train_urls),
            ("val_urls", val_urls),
            ("test_urls", test_urls),
            ("wild_urls", wild_urls),
        ):
            if value is not None and not str(value).strip():
                raise VitkdInputError(
                    f"--data.init_args.{name} is empty: pass shard URLs like 'dir/shard-{{000000..000009}}.tar', "
                    "or leave it unset" + (" for the embedded pool" if name == "wild_urls" else "")
                )
        self.save_hyperparameters()
        self.img_size, self.in_chans = img_size, in_chans
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.augment, self.train_urls, self.val_fraction = augment, train_urls, val_fraction
        self.val_urls, self.test_urls = val_urls, test_urls
        self.wild_urls, self.data_dir = wild_urls, Path(data_dir)
        self.epoch_samples, self.skips = epoch_samples, shards.SkipCounter(strict)
        self.memory_cache = memory_cache
        self.augment_views = augment_views if augment else 0
        self.view_seed = view_seed
        self.keys_requested = False  # training batches reach the stage with each sample's key third

    @property
    def train_keys(self) -> bool:
        """Whether the training datasets yield keys: the stage asked for them, or fixed views are drawn by key."""
        return self.keys_requested or self.augment_views > 0

    def request_train_keys(self) -> None:
        """From now on, training batches are ``(x, y, key)``: a stage that caches per sample asks for them."""
        self.keys_requested = True

    UNUSED_BY_INPUTS = ("num_workers", "eval_batch_size", "memory_cache")  # how samples load, not what they are

    def train_inputs_id(self) -> dict:
        """What each keyed training input depends on: this module's class and options, the views' seed (the
        run's when ``view_seed`` is unset) and each local training shard's size and modification time (a
        rewritten shard is other data); remote shards by URL."""
        files = []
        for url in shards.expand_urls(self.train_urls) if self.train_urls else []:
            st = os.stat(url) if "://" not in url and not url.startswith("pipe:") else None
            files.append([os.path.abspath(url), st.st_size, st.st_mtime_ns] if st else [url])
        return {
            "module": f"{type(self).__module__}.{type(self).__qualname__}",
            "options": {k: v for k, v in self.hparams.items() if k not in self.UNUSED_BY_INPUTS},
            "view_seed": self._view_seed() if self.augment_views else None,
            "train_files": files,
        }

    @staticmethod
    def _run_seed() -> int:
        """The run's seed, the same on every rank after seed_everything."""
        return torch.initial_seed() % (2**31)

    def _view_seed(self) -> int:
        return self.view_seed if self.view_seed is not None else self._run_seed()

    # -- what a subclass provides -------------------------------------------------------------
    def original_split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """uint8 images and int labels of the original ``train``/``val``/``test`` split."""
        raise NotImplementedError

    def embedded_wild_urls(self) -> str:
        """Shard URL of the data set's embedded wild pool, written on first use."""
        raise VitkdInputError(
            f"{type(self).__name__} has no embedded wild pool: pass --data.wild_urls 'dir/wild-{{000000..000009}}.tar'"
        )

    # -- loaders ------------------------------------------------------------------------------
    def _rank(self) -> tuple[int, int]:
        t = self.trainer
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    def _loader(self, ds, batch_size: int | None, shuffle: bool = False, sampler=None) -> DataLoader:
        return DataLoader(
            ds,
            batch_size=batch_size,
            shuffle=shuffle,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self._on_gpu(),  # page-locked batches copy to the GPU asynchronously
        )

    def _on_gpu(self) -> bool:
        t = self.trainer
        return t is not None and t.strategy.root_device.type == "cuda"

    def _original(self, split: str, keys: bool = False) -> ArrayDataset:
        x, y = self.original_split(split)
        return ArrayDataset(x, y, self.in_chans, self.img_size, keys=keys)

    def _eval_loader(self, ds: Dataset) -> DataLoader:
        """Each sample exactly once over all ranks (Lightning's default sampler would pad with repeats)."""
        rank, world = self._rank()
        sampler = UnrepeatedDistributedSampler(ds, num_replicas=world, rank=rank, shuffle=False) if world > 1 else None
        return self._loader(ds, self.eval_batch_size, sampler=sampler)

    def _stream(self, urls: str, **kw) -> ShardStream:
        rank, world = self._rank()
        return ShardStream(
            shards.expand_urls(urls), self.in_chans, self.img_size, rank=rank, world_size=world, skips=self.skips, **kw
        )

    def train_epoch_samples(self) -> int:
        """Training samples per rank per epoch on ``train_urls``: equal on every rank (with several DataLoader
        workers, a whole number of batches per worker)."""
        _, world = self._rank()
        total = self.epoch_samples
        if total is None:
            counts = shards.shard_counts(shards.expand_urls(self.train_urls))
            if counts is None:
                raise VitkdInputError(
                    f"cannot count the samples of remote shards {self.train_urls}: set --data.init_args.epoch_samples"
                )
            total = int(sum(counts.values()) * (1.0 - (0.0 if self.val_urls else self.val_fraction)))
        per_rank = total // world
        step = self.batch_size * self.num_workers
        if self.num_workers > 1 and per_rank >= step:
            per_rank = per_rank // step * step  # whole batches per worker, so the loader's length is exact
        if per_rank == 0:
            raise VitkdInputError(
                f"{total} training samples in {self.train_urls} are fewer than the {world} ranks: "
                "use fewer devices or more data"
            )
        return per_rank

    def train_dataloader(self) -> DataLoader:
        if self.train_urls:
            part = "all" if self.val_urls else "train"
            stream = self._stream(
                self.train_urls,
                part=part,
                val_fraction=self.val_fraction,
                shuffle_seed=self._run_seed(),
                epoch_samples=self.train_epoch_samples(),
                keys=self.train_keys,
                memory_cache=self.memory_cache,
            )
            # a resumed run continues the shard permutations at its next epoch (the stream counts epochs from here)
            stream.epoch = self._resume_epochs or 0
            return self._loader(stream, self.batch_size)
        ds = self._original("train", keys=self.train_keys)
        if (
            self.epoch_samples is not None
        ):  # a fixed budget per epoch on the original data too: that many drawn without replacement
            sampler = torch.utils.data.RandomSampler(ds, num_samples=min(self.epoch_samples, len(ds)))
            return self._loader(ds, self.batch_size, sampler=sampler)
        return self._loader(ds, self.batch_size, shuffle=True)

    _resume_epochs: int | None = None

    def state_dict(self) -> dict:
        """In checkpoints: the training epochs begun, so a resumed shard stream permutes its shards as the
        uninterrupted run's next epoch does (Lightning restores this before it asks for the loaders)."""
        t = self.trainer
        return {"train_epochs": int(t.fit_loop.epoch_progress.current.processed)} if t is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        self._resume_epochs = state_dict.get("train_epochs")

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if not (self.augment and self.trainer is not None and self.trainer.training):
            return batch
        if self.augment_views and len(batch) >= 3:
            x, y, keys = batch
            view = self.trainer.current_epoch % self.augment_views
            x = view_affine(x, keys, view, self._view_seed())
            return (x, y, [f"{k}@{view}" for k in keys]) if self.keys_requested else (x, y)
        x, *rest = batch
        return (random_affine(x), *rest)

    def val_dataloader(self) -> DataLoader:
        if self.val_urls:
            return self._loader(self._stream(self.val_urls, memory_cache=self.memory_cache), self.eval_batch_size)
        if self.train_urls:
            return self._loader(
                self._stream(
                    self.train_urls, part="val", val_fraction=self.val_fraction, memory_cache=self.memory_cache
                ),
                self.eval_batch_size,
            )
        return self._eval_loader(self._original("val"))

    def train_stream(self, trainer: pl.Trainer, batch_size: int) -> DataLoader:
        """The training split in ``batch_size`` batches for a stage that trains on its own loaders (the trainer
        is never given this data module): the shard stream splits by ``trainer``'s rank and world size."""
        self.trainer = trainer
        return DataLoader(self.train_dataloader().dataset, batch_size=batch_size, num_workers=self.num_workers)

    def labelled_val_dataloader(self) -> DataLoader:
        """The original labelled validation split, whatever streams train and validation use (the data-free
        stage chooses between designs on it, never on test)."""
        return self._eval_loader(self._original("val"))

    def test_dataloader(self) -> DataLoader:
        if self.test_urls:
            return self._loader(self._stream(self.test_urls), self.eval_batch_size)
        return self._eval_loader(self._original("test"))

    def wild_shards(self) -> list[str]:
        """The wild pool's shard URLs, expanded."""
        return shards.expand_urls(self.wild_urls or self.embedded_wild_urls())

    def scoring_loader(self, urls: list[str]) -> DataLoader:
        """Per-shard scoring batches (see ``ShardBatches``) over ``urls``, for the selector."""
        return self._loader(ShardBatches(urls, self.in_chans, self.img_size, self.eval_batch_size, self.skips), None)

    def predict_dataloader(self) -> DataLoader:
        """This rank's share of the wild pool as scoring batches (dicts with ``image``, ``key``, ``src``)."""
        rank, world = self._rank()
        return self.scoring_loader(shards.shard_order(self.wild_shards(), rank, world))

    def data_report(self) -> dict[str, int]:
        """Damaged shards and undecodable images skipped so far (this process), for ``metrics.json``."""
        return self.skips.counts()
