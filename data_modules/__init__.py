"""LightningDataModules and the shard format."""
from data_modules.digits import DigitsDataModule
from data_modules.image_data import ImageDataModule

__all__ = ["DigitsDataModule", "ImageDataModule"]
