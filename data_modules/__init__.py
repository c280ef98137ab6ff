"""LightningDataModules and the shard format."""
from data_modules.digits import DigitsDataModule
from data_modules.image_data import ImageDataModule
from data_modules.shard_data import ShardDataModule

__all__ = ["DigitsDataModule", "ImageDataModule", "ShardDataModule"]
