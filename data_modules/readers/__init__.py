"""Readers of the paper data sets' real file formats, for ``python -m vitkd.pack``.

Every reader is a ``Reader``: ``len(reader)`` images in a fixed order, ``reader.read(start, stop)`` yields
``(key, image, label)`` with ``image`` a uint8 array (H×W grey or H×W×3 RGB, the source's own size) and
``label`` an int index into ``reader.classes`` (None where the source has no labels). Keys are
``{name}-{index:07d}``, so the same source always gives the same keys. ``name`` is also the ``src`` tag.

Formats (``open_reader(format, src, ...)``), one module per kind of file:

* ``idx``: ``mnist``, IDX files ``train-images-idx3-ubyte`` / ``train-labels-idx1-ubyte`` (test: ``t10k-...``),
  plain or ``.gz``, anywhere under ``src`` (e.g. torchvision's ``MNIST/raw/``).
  ``fashion-mnist``: Fashion-MNIST (Xiao et al., "Fashion-MNIST: a Novel Image Dataset for Benchmarking
  Machine Learning Algorithms", arXiv:1708.07747): the same IDX file names as MNIST (e.g. Debian's
  ``/usr/share/datasets/fashion-mnist``), class names ``FASHION_CLASSES``; default name ``fashion-mnist-{split}``.
  ``emnist``: ``emnist-{split}-{train|test}-images-idx3-ubyte(.gz)`` for the splits byclass, bymerge,
  balanced, letters, digits, mnist. EMNIST stores every image transposed (column-major) relative to MNIST;
  the reader transposes it back, so packed images are upright like MNIST's. ``letters`` labels are 1..26 in
  the files; they are shifted to 0..25 so that every packed ``cls`` indexes ``classes`` (``"Aa"`` .. ``"Zz"``).
  Class names come from ``emnist-{split}-mapping.txt`` when it is there, else from the built-in tables.
* ``cifar``: ``cifar10`` / ``cifar100``, the python pickle batches (``cifar-10-batches-py/data_batch_1..5``,
  ``test_batch``; ``cifar-100-python/train``, ``test``, with ``fine_labels`` or ``coarse_labels``), given as
  the folder or as the ``.tar.gz`` archive. Pickle is the format the data set ships in (torchvision loads it
  the same way); only pack archives you trust.
* ``files``: ``folder``, ``src/<class>/*.jpg|jpeg|png`` (ImageNet style); classes sorted by name give the
  indices. ``flat``: a folder (searched recursively), an uncompressed ``.tar`` or a ``.zip`` of images with no
  labels (Flickr style); files are taken in sorted path order.

``folder`` and ``flat`` images are converted to RGB (ImageNet holds some grey and CMYK JPEGs).
``split`` is ``train``, ``test`` or ``all`` (train then test) for the fixed data sets; for ``folder`` and
``flat`` it only names the output (e.g. ``val``). ``resize.fit_size`` brings an image to the packed size.
"""

from __future__ import annotations

import re
from pathlib import Path

from data_modules.readers.base import Reader
from data_modules.readers.cifar import cifar_reader
from data_modules.readers.files import flat_reader, folder_reader
from data_modules.readers.idx import idx_reader
from vitkd.errors import VitkdInputError

__all__ = ["FORMATS", "NATIVE_SIZE", "Reader", "open_reader"]

FORMATS = ("mnist", "fashion-mnist", "emnist", "cifar10", "cifar100", "folder", "flat")
NATIVE_SIZE = {"mnist": 28, "fashion-mnist": 28, "emnist": 28, "cifar10": 32, "cifar100": 32}  # folder/flat: none
_NAME = r"[A-Za-z0-9_-]+"


def open_reader(
    fmt: str,
    src: str | Path,
    split: str = "train",
    emnist_split: str = "byclass",
    label_set: str = "fine",
    name: str | None = None,
) -> Reader:
    """The reader of ``src`` in format ``fmt`` (one of ``FORMATS``)."""
    src = Path(src)
    if fmt not in FORMATS:
        raise VitkdInputError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    if name is not None and not re.fullmatch(_NAME, name):
        raise VitkdInputError(
            f"--name {name!r} may hold only letters, digits, '_' and '-' (it becomes file names, keys and the src tag)"
        )
    if not re.fullmatch(_NAME, split):
        raise VitkdInputError(f"--split {split!r} may hold only letters, digits, '_' and '-'")
    if not src.exists():
        raise VitkdInputError(f"{fmt} source {src} does not exist: check the SRC path")
    if fmt in ("mnist", "fashion-mnist", "emnist"):
        return idx_reader(fmt, src, split, emnist_split, name)
    if fmt in ("cifar10", "cifar100"):
        return cifar_reader(fmt, src, split, label_set, name)
    return folder_reader(src, split, name) if fmt == "folder" else flat_reader(src, split, name)
