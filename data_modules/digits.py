"""scikit-learn's digits as the embedded original data set (real handwriting that ships in the wheel)."""

from __future__ import annotations

import json
from functools import lru_cache

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from data_modules.image_data import ImageDataModule
from data_modules.shards import shard_url
from data_modules.wild_pool import POOL_VERSION, generate_pool
from vitkd.errors import OneLineParser, VitkdInputError, demo_main, non_negative_int, positive_int
from vitkd.io import build_once

SPLIT_SEED = 0  # fixed: every run sees the same train/val/test split


@lru_cache(maxsize=1)
def digits_splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """1797 8×8 images (17 grey levels) → uint8 0..255; stratified 60/20/20 train/val/test split."""
    d = load_digits()
    x = (d.images * (255.0 / 16.0)).round().astype(np.uint8)
    y = d.target.astype(np.int64)
    x_tr, x_rest, y_tr, y_rest = train_test_split(x, y, test_size=0.4, stratify=y, random_state=SPLIT_SEED)
    x_va, x_te, y_va, y_te = train_test_split(x_rest, y_rest, test_size=0.5, stratify=y_rest, random_state=SPLIT_SEED)
    return {"train": (x_tr, y_tr), "val": (x_va, y_va), "test": (x_te, y_te)}


class DigitsDataModule(ImageDataModule):
    """Digits (original data) + the embedded wild pool (``data_modules.wild_pool``) for selection.

    Args (besides ``ImageDataModule``'s):
        wild_pool_size: number of samples in the embedded wild pool (written once under ``data_dir``).
        wild_pool_seed: seed of the embedded pool.
    """

    num_classes = 10

    def __init__(self, *args, wild_pool_size: int = 20000, wild_pool_seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        for name, value, least in (("wild_pool_size", wild_pool_size, 1), ("wild_pool_seed", wild_pool_seed, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise VitkdInputError(f"--data.init_args.{name} {value!r} must be an integer ≥ {least}")
        self.wild_pool_size, self.wild_pool_seed = wild_pool_size, wild_pool_seed

    def original_split(self, split: str):
        return digits_splits()[split]

    def _pool_dir(self):
        return self.data_dir / f"digits-wild-v{POOL_VERSION}-{self.wild_pool_size}-s{self.wild_pool_seed}"

    def prepare_data(self) -> None:
        if self.wild_urls is None:
            pool = self._pool_dir()
            build_once(
                pool, lambda: generate_pool(pool, self.wild_pool_size, self.wild_pool_seed), done=pool / "meta.json"
            )

    def embedded_wild_urls(self) -> str:
        meta = self._pool_dir() / "meta.json"
        if not meta.exists():
            self.prepare_data()
        return shard_url(self._pool_dir(), json.loads(meta.read_text())["shards"], "wild")


def main(argv: list[str] | None = None) -> None:
    """``python -m data_modules.digits``: write the embedded wild pool now (a run otherwise writes it on first
    use) and print its shard URL; e.g. before several selections start at once."""
    p = OneLineParser(prog="python -m data_modules.digits", description=main.__doc__)
    p.add_argument("--data_dir", default="data", help="folder of the embedded data sets (the data module's data_dir)")
    p.add_argument("--wild_pool_size", type=positive_int, default=20000)
    p.add_argument("--wild_pool_seed", type=non_negative_int, default=0)
    a = p.parse_args(argv)
    dm = DigitsDataModule(data_dir=a.data_dir, wild_pool_size=a.wild_pool_size, wild_pool_seed=a.wild_pool_seed)
    try:
        dm.prepare_data()
    except OSError as err:
        raise VitkdInputError(
            f"--data_dir {a.data_dir}: cannot write the pool there ({err.strerror or err}); name a writable folder"
        ) from None
    print(dm.embedded_wild_urls())


if __name__ == "__main__":
    demo_main(main)
