"""Readers of the paper data sets' real file formats, for ``python -m vitkd.pack``.

Every reader is a ``Reader``: ``len(reader)`` images in a fixed order, ``reader.read(start, stop)`` yields
``(key, image, label)`` with ``image`` a uint8 array (H×W grey or H×W×3 RGB, the source's own size) and
``label`` an int index into ``reader.classes`` (None where the source has no labels). Keys are
``{name}-{index:07d}``, so the same source always gives the same keys. ``name`` is also the ``src`` tag.

Formats (``open_reader(format, src, ...)``):

* ``mnist``: IDX files ``train-images-idx3-ubyte`` / ``train-labels-idx1-ubyte`` (test: ``t10k-...``), plain
  or ``.gz``, anywhere under ``src`` (e.g. torchvision's ``MNIST/raw/``).
* ``fashion-mnist``: Fashion-MNIST (Xiao et al., "Fashion-MNIST: a Novel Image Dataset for Benchmarking
  Machine Learning Algorithms", arXiv:1708.07747): the same IDX file names as MNIST (e.g. Debian's
  ``/usr/share/datasets/fashion-mnist``), class names ``FASHION_CLASSES``; default name ``fashion-mnist-{split}``.
* ``emnist``: ``emnist-{split}-{train|test}-images-idx3-ubyte(.gz)`` for the splits byclass, bymerge,
  balanced, letters, digits, mnist. EMNIST stores every image transposed (column-major) relative to MNIST;
  the reader transposes it back, so packed images are upright like MNIST's. ``letters`` labels are 1..26 in
  the files; they are shifted to 0..25 so that every packed ``cls`` indexes ``classes`` (``"Aa"`` .. ``"Zz"``).
  Class names come from ``emnist-{split}-mapping.txt`` when it is there, else from the built-in tables.
* ``cifar10`` / ``cifar100``: the python pickle batches (``cifar-10-batches-py/data_batch_1..5``,
  ``test_batch``; ``cifar-100-python/train``, ``test``, with ``fine_labels`` or ``coarse_labels``), given as
  the folder or as the ``.tar.gz`` archive. Pickle is the format the data set ships in (torchvision loads it
  the same way); only pack archives you trust.
* ``folder``: ``src/<class>/*.jpg|jpeg|png`` (ImageNet style); classes sorted by name give the indices.
* ``flat``: a folder (searched recursively), an uncompressed ``.tar`` or a ``.zip`` of images with no labels
  (Flickr style); files are taken in sorted path order.

``folder`` and ``flat`` images are converted to RGB (ImageNet holds some grey and CMYK JPEGs).
``split`` is ``train``, ``test`` or ``all`` (train then test) for the fixed data sets; for ``folder`` and
``flat`` it only names the output (e.g. ``val``).
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
import re
import string
import tarfile
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vitkd.errors import VitkdInputError

FORMATS = ("mnist", "fashion-mnist", "emnist", "cifar10", "cifar100", "folder", "flat")
EMNIST_SPLITS = ("byclass", "bymerge", "balanced", "letters", "digits", "mnist")
FIXED_SPLITS = ("train", "test", "all")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
NATIVE_SIZE = {"mnist": 28, "fashion-mnist": 28, "emnist": 28, "cifar10": 32, "cifar100": 32}  # folder/flat: no single size
IDX_IMAGES, IDX_LABELS = 0x00000803, 0x00000801

_DIGITS, _UPPER, _LOWER = list(string.digits), list(string.ascii_uppercase), list(string.ascii_lowercase)
_MERGED = _DIGITS + _UPPER + list("abdefghnqrt")  # bymerge/balanced merge 15 lowercase letters into uppercase
EMNIST_CLASSES = {
    "byclass": _DIGITS + _UPPER + _LOWER,
    "bymerge": _MERGED,
    "balanced": _MERGED,
    "letters": [upper + lower for upper, lower in zip(_UPPER, _LOWER)],
    "digits": _DIGITS,
    "mnist": _DIGITS,
}
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class Reader:
    """A source of ``len(self)`` images in a fixed order; see the module docstring."""

    format: str = ""

    def __init__(self, name: str, classes: list[str] | None):
        self.name, self.classes = name, classes

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[str, np.ndarray, int | None]]:
        raise NotImplementedError

    def key(self, i: int) -> str:
        return f"{self.name}-{i:07d}"

    def describe(self) -> dict:
        """What identifies the source (written into meta.json; compared when a pack resumes)."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        return hashlib.sha1(json.dumps(self.describe(), sort_keys=True).encode()).hexdigest()[:16]


# -- fixed-size data sets held as arrays (MNIST, EMNIST, CIFAR) ---------------------------------------


class ArrayReader(Reader):
    """Images from uint8 arrays in parts (e.g. train then test), labels as int arrays."""

    def __init__(self, name: str, classes: list[str], parts: list[tuple[np.ndarray, np.ndarray]], info: dict, transpose: bool = False):
        super().__init__(name, classes)
        self.parts, self.info, self.transpose = parts, info, transpose
        self.offsets = np.cumsum([0] + [len(x) for x, _ in parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, start: int = 0, stop: int | None = None):
        stop = len(self) if stop is None else min(stop, len(self))
        for p, (images, labels) in enumerate(self.parts):
            lo, hi = max(start, self.offsets[p]), min(stop, self.offsets[p + 1])
            for i in range(lo, hi):
                img = images[i - self.offsets[p]]
                yield self.key(i), np.ascontiguousarray(img.T if self.transpose else img), int(labels[i - self.offsets[p]])

    def describe(self) -> dict:
        return {**self.info, "num_images": len(self)}


def _split_parts(split: str, fmt: str) -> tuple[str, ...]:
    if split not in FIXED_SPLITS:
        raise VitkdInputError(f"--split {split} is not a split of {fmt}: use one of {', '.join(FIXED_SPLITS)}")
    return ("train", "test") if split == "all" else (split,)


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
                raise VitkdInputError(f"{path} is not an IDX {kind} file (magic {got}): pass the original, un-renamed MNIST/Fashion-MNIST/EMNIST files")
            ndim = head[3]
            dims = tuple(int(d) for d in np.frombuffer(f.read(4 * ndim), dtype=">i4"))
            data = None if opener is open else f.read()
    except (OSError, EOFError) as err:
        raise VitkdInputError(f"cannot read {path} ({err}): download it again") from None
    size, header = int(np.prod(dims)), 4 + 4 * ndim
    if data is None:
        if path.stat().st_size != header + size:
            raise VitkdInputError(f"{path} holds {path.stat().st_size - header} data bytes, its header says {size} {dims}: the file is truncated, download it again")
        return np.memmap(path, dtype=np.uint8, mode="r", offset=header, shape=dims)
    if len(data) != size:
        raise VitkdInputError(f"{path} holds {len(data)} data bytes, its header says {size} {dims}: the file is truncated, download it again")
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


def _emnist_classes(src: Path, emnist_split: str) -> tuple[list[str], int]:
    """Class names and the label of the first class (1 for ``letters``), from the mapping file if present."""
    found = sorted(src.rglob(f"emnist-{emnist_split}-mapping.txt"))
    if not found:
        return EMNIST_CLASSES[emnist_split], 1 if emnist_split == "letters" else 0
    rows = [ln.split() for ln in found[0].read_text().splitlines() if ln.strip()]
    labels = [int(r[0]) for r in rows]
    return ["".join(chr(int(c)) for c in r[1:]) for r in sorted(rows, key=lambda r: int(r[0]))], min(labels)


def idx_reader(fmt: str, src: Path, split: str = "train", emnist_split: str = "byclass", name: str | None = None) -> ArrayReader:
    """MNIST, Fashion-MNIST or EMNIST IDX files → ArrayReader (EMNIST transposed upright, labels shifted to start at 0)."""
    parts, files = [], []
    if fmt == "emnist":
        if emnist_split not in EMNIST_SPLITS:
            raise VitkdInputError(f"--emnist-split {emnist_split} is not an EMNIST split: use one of {', '.join(EMNIST_SPLITS)}")
        classes, first = _emnist_classes(src, emnist_split)
        tag = f"emnist-{emnist_split}"
    else:
        classes, first, tag = (FASHION_CLASSES, 0, fmt) if fmt == "fashion-mnist" else (_DIGITS, 0, "mnist")
    for part in _split_parts(split, fmt):
        if fmt == "emnist":
            base = f"emnist-{emnist_split}-{part}"
            img_p, lab_p = _find(src, [f"{base}-images-idx3-ubyte"], fmt), _find(src, [f"{base}-labels-idx1-ubyte"], fmt)
        else:
            base = "train" if part == "train" else "t10k"
            img_p = _find(src, [f"{base}-images-idx3-ubyte", f"{base}-images.idx3-ubyte"], fmt)
            lab_p = _find(src, [f"{base}-labels-idx1-ubyte", f"{base}-labels.idx1-ubyte"], fmt)
        images, labels = read_idx(img_p, IDX_IMAGES), read_idx(lab_p, IDX_LABELS)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise VitkdInputError(f"{img_p} {tuple(images.shape)} and {lab_p} {tuple(labels.shape)} do not match: images must be (N, H, W) with N labels")
        labels = labels.astype(np.int64) - first
        if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
            raise VitkdInputError(f"{lab_p} has labels outside {first}..{first + len(classes) - 1}: it is not the {tag} labels file")
        parts.append((images, labels))
        files += [img_p.name, lab_p.name]
    info = {"format": fmt, "split": split, "files": files, "label_offset": first}
    if fmt == "emnist":
        info["emnist_split"] = emnist_split
    return ArrayReader(name or f"{tag}-{split}", classes, parts, info, transpose=fmt == "emnist")


def _unpickle(raw: bytes, where: str) -> dict:
    try:
        d = pickle.loads(raw, encoding="bytes")
    except Exception as err:  # any unpickling failure means the file is not a CIFAR batch
        raise VitkdInputError(f"{where} is not a CIFAR python pickle batch ({type(err).__name__}): pass the 'python version' archive or folder") from None
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}


def cifar_reader(fmt: str, src: Path, split: str = "train", label_set: str = "fine", name: str | None = None) -> ArrayReader:
    """CIFAR-10/100 python pickle batches (folder or .tar.gz) → ArrayReader of H×W×3 images."""
    folder = "cifar-10-batches-py" if fmt == "cifar10" else "cifar-100-python"
    batches = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]} if fmt == "cifar10" else {"train": ["train"], "test": ["test"]}
    meta_name = "batches.meta" if fmt == "cifar10" else "meta"
    if label_set not in ("fine", "coarse"):
        raise VitkdInputError(f"--label-set {label_set} is not a CIFAR-100 label set: use fine or coarse")
    label_key = "labels" if fmt == "cifar10" else f"{label_set}_labels"
    wanted = [b for part in _split_parts(split, fmt) for b in batches[part]]
    raw = _cifar_files(src, folder, wanted + [meta_name], fmt)
    parts = []
    for b in wanted:
        if b not in raw:
            raise VitkdInputError(f"CIFAR batch {folder}/{b} is missing in {src}: pass the complete {folder} folder or its .tar.gz")
        d = _unpickle(raw[b], f"{src}:{b}")
        if "data" not in d or label_key not in d:
            raise VitkdInputError(f"{src}:{b} has no '{label_key}' or 'data' entry: it is not a {fmt} batch (is it the other CIFAR?)")
        data = np.asarray(d["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072:
            raise VitkdInputError(f"{src}:{b} data has shape {data.shape}, not (N, 3072): pass the original CIFAR python batches")
        parts.append((data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.asarray(d[label_key], dtype=np.int64)))
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
            raise VitkdInputError(f"cannot read {src} as a tar archive ({reason}): pass cifar-*-python.tar.gz or the extracted {folder} folder") from None
        return out
    if not src.is_dir():
        raise VitkdInputError(f"{fmt} source {src} does not exist: pass the {folder} folder or its .tar.gz archive")
    base = src / folder if (src / folder).is_dir() else src
    return {n: (base / n).read_bytes() for n in names if (base / n).is_file()}


# -- image files (ImageNet-style folders, Flickr-style dumps) -----------------------------------------


class FileReader(Reader):
    """Encoded images in a folder, an uncompressed tar or a zip; decoded (to RGB) when read.

    ``entries`` are (name, label) with name a path relative to ``root`` (folder), or a member name
    (tar: with its data offset and size, so each worker process seeks on its own file handle).
    """

    def __init__(self, name: str, classes: list[str] | None, root: Path, entries: list, kind: str, info: dict):
        super().__init__(name, classes)
        self.root, self.entries, self.kind, self.info = root, entries, kind, info
        self._handle: tuple[int, object] | None = None

    def __len__(self) -> int:
        return len(self.entries)

    def __getstate__(self):
        return {**self.__dict__, "_handle": None}  # open files are per process

    def _container(self):
        if self._handle is None or self._handle[0] != os.getpid():
            opened = open(self.root, "rb") if self.kind == "tar" else zipfile.ZipFile(self.root) if self.kind == "zip" else None
            self._handle = (os.getpid(), opened)
        return self._handle[1]

    def _bytes(self, entry) -> bytes:
        if self.kind == "dir":
            return (self.root / entry[0]).read_bytes()
        if self.kind == "zip":
            return self._container().read(entry[0])
        f = self._container()
        f.seek(entry[2])
        return f.read(entry[3])

    def read(self, start: int = 0, stop: int | None = None):
        stop = len(self) if stop is None else min(stop, len(self))
        for i in range(start, stop):
            entry = self.entries[i]
            try:
                with Image.open(io.BytesIO(self._bytes(entry))) as img:
                    arr = np.asarray(img.convert("RGB"))
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
                why = "not an image PIL can read" if isinstance(err, UnidentifiedImageError) else str(err)
                raise VitkdInputError(f"cannot decode image {entry[0]} in {self.root} ({why}): replace or delete it, then rerun (add --overwrite after deleting)") from None
            yield self.key(i), arr, entry[1]

    def describe(self) -> dict:
        names = hashlib.sha1("\n".join(e[0] for e in self.entries).encode()).hexdigest()[:16]
        return {**self.info, "num_images": len(self), "file_list_sha1": names}


def _is_image(name: str) -> bool:
    parts = name.replace("\\", "/").split("/")
    return name.lower().endswith(IMAGE_SUFFIXES) and not any(p.startswith(".") and p not in (".", "..") for p in parts)


def folder_reader(src: Path, split: str = "train", name: str | None = None) -> FileReader:
    """``src/<class>/*.jpg|jpeg|png``; classes sorted by name → 0, 1, ...; hidden files skipped."""
    if not src.is_dir():
        raise VitkdInputError(f"folder source {src} is not a folder: pass a folder with one sub-folder of images per class")
    classes = sorted(d.name for d in src.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise VitkdInputError(f"{src} has no class sub-folders: use format 'flat' for images without labels")
    entries = [(f"{c}/{f.name}", k) for k, c in enumerate(classes) for f in sorted((src / c).iterdir()) if f.is_file() and _is_image(f.name)]
    if not entries:
        raise VitkdInputError(f"{src} holds no .jpg/.jpeg/.png files in its class sub-folders: pass the folder of class sub-folders (e.g. ImageNet's train/)")
    return FileReader(name or f"folder-{split}", classes, src, entries, "dir", {"format": "folder", "split": split})


def flat_reader(src: Path, split: str = "train", name: str | None = None) -> FileReader:
    """Unlabeled images: a folder (recursive), an uncompressed .tar or a .zip, in sorted name order."""
    info = {"format": "flat", "split": split}
    if src.is_dir():
        kind = "dir"
        entries = sorted((p.relative_to(src).as_posix(), None) for p in src.rglob("*") if p.is_file() and _is_image(p.relative_to(src).as_posix()))
    elif zipfile.is_zipfile(src):
        kind = "zip"
        with zipfile.ZipFile(src) as z:
            entries = sorted((n, None) for n in z.namelist() if _is_image(n))
    elif src.is_file():
        kind = "tar"
        try:
            with tarfile.open(src, "r:") as tar:
                entries = sorted((m.name, None, m.offset_data, m.size) for m in tar if m.isfile() and _is_image(m.name))
        except tarfile.ReadError:
            raise VitkdInputError(f"{src} is not an uncompressed tar or zip of images: decompress it first (e.g. gunzip it to a .tar) or extract it to a folder") from None
    else:
        raise VitkdInputError(f"flat source {src} does not exist: pass a folder, .tar or .zip of images")
    if not entries:
        raise VitkdInputError(f"{src} holds no .jpg/.jpeg/.png files: pass the folder, .tar or .zip that holds the images")
    return FileReader(name or f"flat-{split}", None, src, entries, kind, info)


# -- one entry point ---------------------------------------------------------------------------------


def open_reader(fmt: str, src: str | Path, split: str = "train", emnist_split: str = "byclass", label_set: str = "fine", name: str | None = None) -> Reader:
    """The reader of ``src`` in format ``fmt`` (one of ``FORMATS``)."""
    src = Path(src)
    if fmt not in FORMATS:
        raise VitkdInputError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    if name is not None and not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise VitkdInputError(f"--name {name!r} may hold only letters, digits, '_' and '-' (it becomes file names, keys and the src tag)")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", split):
        raise VitkdInputError(f"--split {split!r} may hold only letters, digits, '_' and '-'")
    if not src.exists():
        raise VitkdInputError(f"{fmt} source {src} does not exist: check the SRC path")
    if fmt in ("mnist", "fashion-mnist", "emnist"):
        return idx_reader(fmt, src, split, emnist_split, name)
    if fmt in ("cifar10", "cifar100"):
        return cifar_reader(fmt, src, split, label_set, name)
    return folder_reader(src, split, name) if fmt == "folder" else flat_reader(src, split, name)


def fit_size(image: np.ndarray, size: int | None, resample: str = "auto", crop: str = "none") -> np.ndarray:
    """Resize a uint8 image to ``size``×``size`` (unchanged if it already is, or if ``size`` is 0/None).

    ``crop="none"``: direct resize, aspect ratio not kept (how ImageNet-32 and the paper's code resize);
    ``crop="center"``: shorter side to ``size``, then a center crop (``PIL.ImageOps.fit``).
    ``resample="auto"``: box filter when shrinking (the area average ImageNet-32 uses), bicubic when enlarging.
    """
    h, w = image.shape[:2]
    if not size or (h == size and w == size):
        return image
    if resample == "auto":
        resample = "box" if min(h, w) >= size else "bicubic"
    method = getattr(Image.Resampling, resample.upper())
    img = Image.fromarray(image)
    out = ImageOps.fit(img, (size, size), method=method) if crop == "center" else img.resize((size, size), method)
    return np.asarray(out)
