"""CIFAR-10 and CIFAR-100 in their python pickle batches, from the folder or the ``.tar.gz`` archive.

Pickle is the format the data sets ship in (torchvision loads them the same way); only pack archives you trust.
"""

from __future__ import annotations

import pickle
import tarfile
from pathlib import Path

import numpy as np

from data_modules.readers.base import ArrayReader, split_parts
from vitkd.errors import VitkdInputError

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _unpickle(raw: bytes, where: str) -> dict:
    try:
        d = pickle.loads(raw, encoding="bytes")
    except Exception as err:  # any unpickling failure means the file is not a CIFAR batch
        raise VitkdInputError(
            f"{where} is not a CIFAR python pickle batch ({type(err).__name__}): "
            "pass the 'python version' archive or folder"
        ) from None
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}


def _cifar_files(src: Path, folder: str, names: list[str], fmt: str) -> dict[str, bytes]:
    """Bytes of the named batch files, from the folder (or its parent) or from the .tar.gz archive."""
    out: dict[str, bytes] = {}
    if src.is_file():
        try:
            with tarfile.open(src) as tar:
                for m in tar:
                    parts = m.name.split("/")
                    if m.isfile() and parts[-1] in names and (len(parts) < 2 or parts[-2] == folder):
                        out[parts[-1]] = tar.extractfile(m).read()
        except (tarfile.TarError, OSError, EOFError) as err:
            reason = str(err).splitlines()[0].rstrip(":") if str(err) else type(err).__name__
            raise VitkdInputError(
                f"cannot read {src} as a tar archive ({reason}): "
                f"pass cifar-*-python.tar.gz or the extracted {folder} folder"
            ) from None
        return out
    if not src.is_dir():
        raise VitkdInputError(f"{fmt} source {src} does not exist: pass the {folder} folder or its .tar.gz archive")
    base = src / folder if (src / folder).is_dir() else src
    return {n: (base / n).read_bytes() for n in names if (base / n).is_file()}


def _batch(raw: dict[str, bytes], b: str, src: Path, folder: str, fmt: str, label_key: str):
    """One batch's (N, 32, 32, 3) images and int64 labels."""
    if b not in raw:
        raise VitkdInputError(
            f"CIFAR batch {folder}/{b} is missing in {src}: pass the complete {folder} folder or its .tar.gz"
        )
    d = _unpickle(raw[b], f"{src}:{b}")
    if "data" not in d or label_key not in d:
        raise VitkdInputError(
            f"{src}:{b} has no '{label_key}' or 'data' entry: it is not a {fmt} batch (is it the other CIFAR?)"
        )
    data = np.asarray(d["data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3072:
        raise VitkdInputError(
            f"{src}:{b} data has shape {data.shape}, not (N, 3072): pass the original CIFAR python batches"
        )
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.asarray(d[label_key], dtype=np.int64)


def cifar_reader(
    fmt: str, src: Path, split: str = "train", label_set: str = "fine", name: str | None = None
) -> ArrayReader:
    """CIFAR-10/100 python pickle batches (folder or .tar.gz) → ArrayReader of H×W×3 images."""
    folder = "cifar-10-batches-py" if fmt == "cifar10" else "cifar-100-python"
    if fmt == "cifar10":
        batches = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    else:
        batches = {"train": ["train"], "test": ["test"]}
    meta_name = "batches.meta" if fmt == "cifar10" else "meta"
    if label_set not in ("fine", "coarse"):
        raise VitkdInputError(f"--label-set {label_set} is not a CIFAR-100 label set: use fine or coarse")
    label_key = "labels" if fmt == "cifar10" else f"{label_set}_labels"
    wanted = [b for part in split_parts(split, fmt) for b in batches[part]]
    raw = _cifar_files(src, folder, wanted + [meta_name], fmt)
    parts = [_batch(raw, b, src, folder, fmt, label_key) for b in wanted]
    n_classes = 10 if fmt == "cifar10" else (100 if label_set == "fine" else 20)
    classes = CIFAR10_CLASSES if fmt == "cifar10" else [str(i) for i in range(n_classes)]
    if meta_name in raw:
        m = _unpickle(raw[meta_name], f"{src}:{meta_name}")
        names = m.get("label_names" if fmt == "cifar10" else f"{label_set}_label_names")
        if names is not None and len(names) == n_classes:
            classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    for _, labels in parts:
        if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
            raise VitkdInputError(f"{src} has {label_key} outside 0..{n_classes - 1}: it is not a {fmt} batch")
    info = {"format": fmt, "split": split, "files": wanted}
    if fmt == "cifar100":
        info["label_set"] = label_set
    return ArrayReader(name or f"{fmt}-{split}", classes, parts, info)
