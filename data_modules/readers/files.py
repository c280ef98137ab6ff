"""Encoded image files: ImageNet-style class folders (``folder``) and unlabeled Flickr-style dumps (``flat``:
a folder, an uncompressed ``.tar`` or a ``.zip``). Images are decoded to RGB when read (ImageNet holds some
grey and CMYK JPEGs)."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from data_modules.readers.base import Reader
from vitkd.errors import VitkdInputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


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
            if self.kind == "tar":
                opened = open(self.root, "rb")
            else:
                opened = zipfile.ZipFile(self.root) if self.kind == "zip" else None
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
                raise VitkdInputError(
                    f"cannot decode image {entry[0]} in {self.root} ({why}): "
                    "replace or delete it, then rerun (add --overwrite after deleting)"
                ) from None
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
        raise VitkdInputError(
            f"folder source {src} is not a folder: pass a folder with one sub-folder of images per class"
        )
    classes = sorted(d.name for d in src.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise VitkdInputError(f"{src} has no class sub-folders: use format 'flat' for images without labels")
    entries = [
        (f"{c}/{f.name}", k)
        for k, c in enumerate(classes)
        for f in sorted((src / c).iterdir())
        if f.is_file() and _is_image(f.name)
    ]
    if not entries:
        raise VitkdInputError(
            f"{src} holds no .jpg/.jpeg/.png files in its class sub-folders: "
            "pass the folder of class sub-folders (e.g. ImageNet's train/)"
        )
    return FileReader(name or f"folder-{split}", classes, src, entries, "dir", {"format": "folder", "split": split})


def flat_reader(src: Path, split: str = "train", name: str | None = None) -> FileReader:
    """Unlabeled images: a folder (recursive), an uncompressed .tar or a .zip, in sorted name order."""
    info = {"format": "flat", "split": split}
    if src.is_dir():
        kind = "dir"
        relative = (p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
        entries = sorted((n, None) for n in relative if _is_image(n))
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
            raise VitkdInputError(
                f"{src} is not an uncompressed tar or zip of images: decompress it first "
                "(e.g. gunzip it to a .tar) or extract it to a folder"
            ) from None
    else:
        raise VitkdInputError(f"flat source {src} does not exist: pass a folder, .tar or .zip of images")
    if not entries:
        raise VitkdInputError(
            f"{src} holds no .jpg/.jpeg/.png files: pass the folder, .tar or .zip that holds the images"
        )
    return FileReader(name or f"flat-{split}", None, src, entries, kind, info)
