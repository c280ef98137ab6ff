"""LightningDataModules and the shard format.

The data modules are imported on first use, so tools that only need the shard format or the readers
(``python -m vitkd.pack``) start without loading Lightning.
"""

from importlib import import_module

_LAZY = {
    "DigitsDataModule": "data_modules.digits",
    "FashionMNISTDataModule": "data_modules.fashion",
    "ImageDataModule": "data_modules.image_data",
    "ShardDataModule": "data_modules.shard_datamodule",
}
__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'data_modules' has no attribute {name!r}")
