"""MNIST, Fashion-MNIST and EMNIST in their IDX files: ``read_idx``, the class tables, ``idx_reader``.

Fashion-MNIST: Xiao et al., "Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine Learning
Algorithms", arXiv:1708.07747. EMNIST stores every image transposed (column-major) relative to MNIST; the
reader transposes it back, and shifts the ``letters`` labels (1..26 in the files) to start at 0.
"""

from __future__ import annotations

import gzip
import string
from pathlib import Path

import numpy as np

from data_modules.readers.base import ArrayReader, split_parts
from vitkd.errors import VitkdInputError

EMNIST_SPLITS = ("byclass", "bymerge", "balanced", "letters", "digits", "mnist")
IDX_IMAGES, IDX_LABELS = 0x00000803, 0x00000801

DIGITS, _UPPER, _LOWER = list(string.digits), list(string.ascii_uppercase), list(string.ascii_lowercase)
_MERGED = DIGITS + _UPPER + list("abdefghnqrt")  # bymerge/balanced merge 15 lowercase letters into uppercase
EMNIST_CLASSES = {
    "byclass": DIGITS + _UPPER + _LOWER,
    "bymerge": _MERGED,
    "balanced": _MERGED,
    "letters": [upper + lower for upper, lower in zip(_UPPER, _LOWER)],
    "digits": DIGITS,
    "mnist": DIGITS,
}
FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def _find(src: Path, stems: list[str], what: str) -> Path:
    """The first of ``stems`` (plain before ``.gz``) in ``src`` or any folder below it."""
    if not src.is_dir():
        raise VitkdInputError(f"{what} source {src} is not a folder: pass the folder holding {stems[0]}(.gz)")
    for stem in stems:
        for name in (stem, stem + ".gz"):
            if (src / name).is_file():
                return src / name
            found = sorted(src.rglob(name))
            if found:
                return found[0]
    raise VitkdInputError(f"{stems[0]}(.gz) not found under {src}: pass the folder that holds the {what} IDX files")


def read_idx(path: Path, magic: int) -> np.ndarray:
    """An IDX file (big-endian header: magic ``0x0000080D`` with D dims, then D int32 sizes, then uint8
    data), plain or gzipped. Plain files are memory-mapped; gzipped ones are decompressed into memory."""
    kind = "images (0x00000803)" if magic == IDX_IMAGES else "labels (0x00000801)"
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4 or int.from_bytes(head, "big") != magic:
                got = f"0x{int.from_bytes(head, 'big'):08x}" if len(head) == 4 else "a truncated header"
                raise VitkdInputError(
                    f"{path} is not an IDX {kind} file (magic {got}): "
                    "pass the original, un-renamed MNIST/Fashion-MNIST/EMNIST files"
                )
            ndim = head[3]
            dims = tuple(int(d) for d in np.frombuffer(f.read(4 * ndim), dtype=">i4"))
            data = None if opener is open else f.read()
    except (OSError, EOFError) as err:
        raise VitkdInputError(f"cannot read {path} ({err}): download it again") from None
    size, header = int(np.prod(dims)), 4 + 4 * ndim
    if data is None:
        if path.stat().st_size != header + size:
            raise VitkdInputError(
                f"{path} holds {path.stat().st_size - header} data bytes, its header says {size} "
                f"{dims}: the file is truncated, download it again"
            )
        return np.memmap(path, dtype=np.uint8, mode="r", offset=header, shape=dims)
    if len(data) != size:
        raise VitkdInputError(
            f"{path} holds {len(data)} data bytes, its header says {size} {dims}: "
            "the file is truncated, download it again"
        )
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


def _emnist_classes(src: Path, emnist_split: str) -> tuple[list[str], int]:
    """Class names and the label of the first class (1 for ``letters``), from the mapping file if present."""
    found = sorted(src.rglob(f"emnist-{emnist_split}-mapping.txt"))
    if not found:
        return EMNIST_CLASSES[emnist_split], 1 if emnist_split == "letters" else 0
    rows = [ln.split() for ln in found[0].read_text().splitlines() if ln.strip()]
    labels = [int(r[0]) for r in rows]
    return ["".join(chr(int(c)) for c in r[1:]) for r in sorted(rows, key=lambda r: int(r[0]))], min(labels)


def _part_files(fmt: str, src: Path, part: str, emnist_split: str) -> tuple[Path, Path]:
    """The images and labels files of one part (``train`` or ``test``)."""
    if fmt == "emnist":
        base = f"emnist-{emnist_split}-{part}"
        return _find(src, [f"{base}-images-idx3-ubyte"], fmt), _find(src, [f"{base}-labels-idx1-ubyte"], fmt)
    base = "train" if part == "train" else "t10k"
    img_p = _find(src, [f"{base}-images-idx3-ubyte", f"{base}-images.idx3-ubyte"], fmt)
    lab_p = _find(src, [f"{base}-labels-idx1-ubyte", f"{base}-labels.idx1-ubyte"], fmt)
    return img_p, lab_p


def idx_reader(
    fmt: str, src: Path, split: str = "train", emnist_split: str = "byclass", name: str | None = None
) -> ArrayReader:
    """MNIST, Fashion-MNIST or EMNIST IDX files → ArrayReader (EMNIST transposed upright, labels shifted to
    start at 0)."""
    parts, files = [], []
    if fmt == "emnist":
        if emnist_split not in EMNIST_SPLITS:
            raise VitkdInputError(
                f"--emnist-split {emnist_split} is not an EMNIST split: use one of {', '.join(EMNIST_SPLITS)}"
            )
        classes, first = _emnist_classes(src, emnist_split)
        tag = f"emnist-{emnist_split}"
    else:
        classes, first, tag = (FASHION_CLASSES, 0, fmt) if fmt == "fashion-mnist" else (DIGITS, 0, "mnist")
    for part in split_parts(split, fmt):
        img_p, lab_p = _part_files(fmt, src, part, emnist_split)
        images, labels = read_idx(img_p, IDX_IMAGES), read_idx(lab_p, IDX_LABELS)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise VitkdInputError(
                f"{img_p} {tuple(images.shape)} and {lab_p} {tuple(labels.shape)} do not match: "
                "images must be (N, H, W) with N labels"
            )
        labels = labels.astype(np.int64) - first
        if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
            raise VitkdInputError(
                f"{lab_p} has labels outside {first}..{first + len(classes) - 1}: it is not the {tag} labels file"
            )
        parts.append((images, labels))
        files += [img_p.name, lab_p.name]
    info = {"format": fmt, "split": split, "files": files, "label_offset": first}
    if fmt == "emnist":
        info["emnist_split"] = emnist_split
    return ArrayReader(name or f"{tag}-{split}", classes, parts, info, transpose=fmt == "emnist")
