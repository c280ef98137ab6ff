"""Fashion-MNIST as the real-data benchmark's original data set (``make bench-wild``).

The four original IDX files (``train-images-idx3-ubyte.gz`` and the other three, as the Fashion-MNIST
project releases them) are looked for, in this order: ``fashion_dir`` (``--data.init_args.fashion_dir``),
``$FASHION_MNIST_DIR``, Debian's ``/usr/share/datasets/fashion-mnist`` (package ``dataset-fashion-mnist``).
``python -m data_modules.fashion_pool`` (``make data-fashion``) also installs that package where ``apt-get``
exists and the user is root.

Splits, fixed (``SPLIT_SEED``), so every run sees the same ones:

* ``test``: the official 10,000 test images; only ever used for the reported figures.
* ``wild``: train images held out of every other split for the wild pool, class-imbalanced (the largest
  class ``WILD_MAX`` images, the smallest ``WILD_MAX / WILD_RATIO``, geometric in between, in a seeded class
  order); they reach the selector only through a different acquisition (``data_modules.fashion_pool``).
* ``val``: ``VAL_PER_CLASS`` per class, for choosing checkpoints; its first ``SELECT_VAL`` images are the
  labelled split on which vitkd's own selection settings are chosen.
* ``train``: the rest of the train images: the teacher's data, and the original-data baselines'.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

import numpy as np

from data_modules.image_data import ImageDataModule
from data_modules.readers.idx import FASHION_CLASSES as CLASSES  # defined there so vitkd.pack needs no Lightning
from data_modules.readers.idx import IDX_IMAGES, IDX_LABELS, read_idx
from data_modules.shards import encode_png, shard_url, write_shards
from vitkd.errors import VitkdInputError

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_PACKAGE = "dataset-fashion-mnist"
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
SPLIT_SEED = 0
WILD_MAX, WILD_RATIO = 2500, 10  # in-distribution wild images: largest class 2,500, smallest 250
VAL_PER_CLASS = 500
SELECT_VAL = 1000  # the labelled split (first images of val) on which vitkd's own selection settings are chosen


def _present(folder: Path) -> list[str]:
    """The four files' names missing from ``folder`` (each plain or ``.gz``)."""
    names = [n for pair in FILES.values() for n in pair]
    return [n for n in names if not ((folder / n).is_file() or (folder / f"{n}.gz").is_file())]


def missing_message(where: str) -> str:
    return (
        f"Fashion-MNIST not found ({where}): put the four original IDX files (train-images-idx3-ubyte.gz, "
        f"train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz, from the Fashion-MNIST "
        f"project's releases) in a folder and set FASHION_MNIST_DIR to it, "
        f"or run 'apt-get install {DEBIAN_PACKAGE}' as root"
    )


def find_fashion_dir(fashion_dir: str | Path | None = None) -> Path:
    """The folder holding the four IDX files: ``fashion_dir``, else ``$FASHION_MNIST_DIR``, else Debian's.
    A folder named explicitly that lacks a file is an error naming the file (it is not silently skipped)."""
    named = [
        (fashion_dir, "--data.init_args.fashion_dir"),
        (os.environ.get("FASHION_MNIST_DIR") or None, "FASHION_MNIST_DIR"),
    ]
    for folder, what in named:
        if folder is None:
            continue
        folder = Path(folder)
        if not folder.is_dir():
            raise VitkdInputError(
                f"{what} {folder} is not a folder: {missing_message('name the folder that holds the files')}"
            )
        lacking = _present(folder)
        if lacking:
            raise VitkdInputError(
                f"{what} {folder} lacks {', '.join(lacking)} (plain or .gz): {missing_message('partial folder')}"
            )
        return folder
    if not _present(DEBIAN_DIR):
        return DEBIAN_DIR
    raise VitkdInputError(missing_message(f"no FASHION_MNIST_DIR, nothing in {DEBIAN_DIR}"))


def install_fashion() -> Path:
    """``find_fashion_dir``, and where nothing is found, ``apt-get install -y dataset-fashion-mnist`` when
    apt-get exists and this is root (``make data-fashion``)."""
    try:
        return find_fashion_dir()
    except VitkdInputError:
        if os.environ.get("FASHION_MNIST_DIR") or shutil.which("apt-get") is None or os.geteuid() != 0:
            raise
    print(f"installing Debian's {DEBIAN_PACKAGE} (apt-get install -y {DEBIAN_PACKAGE})", flush=True)
    done = subprocess.run(["apt-get", "install", "-y", DEBIAN_PACKAGE], capture_output=True, text=True)
    if done.returncode != 0:
        done = subprocess.run(
            ["sh", "-c", f"apt-get update -qq && apt-get install -y {DEBIAN_PACKAGE}"], capture_output=True, text=True
        )
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise VitkdInputError(f"apt-get install {DEBIAN_PACKAGE} failed ({last}): {missing_message('apt-get failed')}")
    return find_fashion_dir()


@lru_cache(maxsize=4)
def load_fashion(folder: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The official ``train`` (60,000) and ``test`` (10,000) images (N, 28, 28) uint8 and int64 labels, read
    by the IDX reader ``vitkd.pack`` uses."""

    out = {}
    for split, (img, lab) in FILES.items():
        path = {n: Path(folder) / n if (Path(folder) / n).is_file() else Path(folder) / f"{n}.gz" for n in (img, lab)}
        x, y = np.asarray(read_idx(path[img], IDX_IMAGES)), np.asarray(read_idx(path[lab], IDX_LABELS)).astype(np.int64)
        if x.ndim != 3 or len(x) != len(y):
            raise VitkdInputError(
                f"{path[img]} {tuple(x.shape)} and {path[lab]} {tuple(y.shape)} do not match: "
                "pass the original Fashion-MNIST files"
            )
        if len(y) and (y.min() < 0 or y.max() >= len(CLASSES)):
            raise VitkdInputError(f"{path[lab]} has labels outside 0..9: it is not a Fashion-MNIST labels file")
        out[split] = (x, y)
    return out


def wild_class_counts(
    num_classes: int = 10, largest: int = WILD_MAX, ratio: float = WILD_RATIO, seed: int = SPLIT_SEED
) -> np.ndarray:
    """Held-out images per class for the wild pool: geometric from ``largest`` down to ``largest / ratio``,
    the classes in a seeded order (so which class is rare is not chosen by hand)."""
    ranks = np.random.default_rng(seed).permutation(num_classes)
    return np.round(largest * float(ratio) ** (-ranks / max(num_classes - 1, 1))).astype(np.int64)


def split_indices(
    labels: np.ndarray, wild_counts: np.ndarray, val_per_class: int, seed: int = SPLIT_SEED
) -> dict[str, np.ndarray]:
    """Indices of the official train images in ``wild``, ``val`` and ``train`` (disjoint, all of them);
    per class, a seeded permutation gives the wild images first, then val, then train."""
    rng = np.random.default_rng(seed + 1)
    parts: dict[str, list[np.ndarray]] = {"wild": [], "val": [], "train": []}
    for c in range(len(wild_counts)):
        idx = rng.permutation(np.flatnonzero(labels == c))
        w, v = int(wild_counts[c]), val_per_class
        if len(idx) < w + v + 1:
            raise VitkdInputError(
                f"class {c} has {len(idx)} train images, fewer than the {w} wild + {v} val it needs: "
                "pass the full Fashion-MNIST train files"
            )
        parts["wild"].append(idx[:w])
        parts["val"].append(idx[w : w + v])
        parts["train"].append(idx[w + v :])
    # interleave classes in a seeded order, so the first SELECT_VAL of val hold every class
    return {k: rng.permutation(np.concatenate(v)) for k, v in parts.items()}


@lru_cache(maxsize=4)
def fashion_splits(
    folder: str, wild_max: int = WILD_MAX, wild_ratio: float = WILD_RATIO, val_per_class: int = VAL_PER_CLASS
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``train``/``val``/``test``/``wild`` (images, labels); see the module docstring. The sizes default to
    the module's constants (smaller ones only for tests on tiny files)."""
    data = load_fashion(folder)
    x, y = data["train"]
    idx = split_indices(y, wild_class_counts(largest=wild_max, ratio=wild_ratio), val_per_class)
    out = {k: (x[i], y[i]) for k, i in idx.items()}
    out["test"] = data["test"]
    return out


class FashionMNISTDataModule(ImageDataModule):
    """Fashion-MNIST (original data: ``train``/``val``/``test`` of ``fashion_splits``) with the benchmark's
    wild pool (``--data.init_args.wild_urls``, written by ``make data-fashion``).

    Args (besides ``ImageDataModule``'s):
        fashion_dir: folder of the four IDX files (default: ``$FASHION_MNIST_DIR``, then Debian's folder).
        val_limit: use only the first N validation images (e.g. ``SELECT_VAL``), None for all.
        wild_max, val_per_class: the split sizes (``fashion_splits``); smaller ones only for tests on tiny files.
    """

    num_classes = 10

    def __init__(
        self,
        *args,
        fashion_dir: str | None = None,
        val_limit: int | None = None,
        img_size: int = 28,
        wild_max: int = WILD_MAX,
        val_per_class: int = VAL_PER_CLASS,
        **kwargs,
    ):
        super().__init__(*args, img_size=img_size, **kwargs)
        for name, value in (("val_limit", val_limit), ("wild_max", wild_max), ("val_per_class", val_per_class)):
            if value is not None and (isinstance(value, bool) or value < 1):
                raise VitkdInputError(f"--data.init_args.{name} {value!r} must be a positive integer")
        self.fashion_dir, self.val_limit = fashion_dir, val_limit
        self.split_sizes = {"wild_max": wild_max, "val_per_class": val_per_class}

    def original_split(self, split: str):
        x, y = fashion_splits(str(find_fashion_dir(self.fashion_dir)), **self.split_sizes)[split]
        if split == "val" and self.val_limit is not None:
            x, y = x[: self.val_limit], y[: self.val_limit]
        return x, y

    def prepare_data(self) -> None:
        find_fashion_dir(self.fashion_dir)  # a missing data set is named before any work

    def embedded_wild_urls(self) -> str:
        raise VitkdInputError(
            "FashionMNISTDataModule has no embedded wild pool: run 'make data-fashion' and pass "
            "--data.init_args.wild_urls 'data/fashion-wild-v1/wild-{000000..000020}.tar'"
        )


def write_val_shards(out: str | Path, limit: int, wild_max: int = WILD_MAX, val_per_class: int = VAL_PER_CLASS) -> str:
    """The first ``limit`` validation images as shards (``src`` ``fashion-val``, true ``cls``) in ``out``, for
    scoring them as the pool is scored (the labelled split vitkd's own selection settings are chosen on);
    returns their brace URL."""
    x, y = fashion_splits(str(find_fashion_dir()), wild_max=wild_max, val_per_class=val_per_class)["val"]
    samples = (
        {"__key__": f"val{i:07d}", "png": encode_png(x[i]), "src": "fashion-val", "cls": str(int(y[i]))}
        for i in range(min(limit, len(x)))
    )
    return shard_url(
        out,
        len(write_shards(samples, out, pattern="wild-%06d.tar", maxcount=1000, meta={"split": "val", "limit": limit})),
        "wild",
    )


def num_test_images() -> int:
    """Images in the official test split."""
    return len(load_fashion(str(find_fashion_dir()))["test"][1])
