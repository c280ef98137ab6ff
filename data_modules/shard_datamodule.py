"""A data set that lives entirely in shards: the packers' output (MNIST, EMNIST, CIFAR, ImageNet folders,
Flickr-style image dumps) and the selector's kept shards, read by one DataModule."""

from __future__ import annotations

from data_modules.image_data import ImageDataModule
from vitkd.errors import VitkdInputError


class ShardDataModule(ImageDataModule):
    """Original splits and wild pools given as shard URLs (``python -m vitkd.pack`` writes them).

    Teacher: ``train_urls`` = the packed original training set, ``test_urls`` its test set, validation a
    held-out slice of ``train_urls`` (``val_fraction``) or ``val_urls``. Student: ``train_urls`` = a
    selection's ``selected/shard-{...}.tar``, same ``test_urls``. Selector: ``wild_urls``.

    Args (besides ``ImageDataModule``'s):
        num_classes: classes of the original data set (10 for MNIST/CIFAR-10, 100 for CIFAR-100, ...).
    """

    def __init__(self, *args, num_classes: int = 10, **kwargs):
        super().__init__(*args, **kwargs)
        self.num_classes = num_classes

    def original_split(self, split: str):
        flag = {"train": "train_urls", "val": "val_urls", "test": "test_urls"}[split]
        raise VitkdInputError(
            f"ShardDataModule has no {split} split: pass --data.init_args.{flag} 'dir/name-{{000000..000009}}.tar'"
        )
