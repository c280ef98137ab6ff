"""Detection data: COCO-format sets (image folder + instances JSON) and detection webdataset shards.

A sample is ``(image, target)``: the image a float tensor (C, img_size, img_size) scaled to [−1, 1]; the target
``{"labels": (T,) int64 in 0..K-1, "boxes": (T, 4) normalised cxcywh, "image_id": int}``. Box formats are
converted only in ``vitkd.detection.box_ops``.

Detection shards (webdataset): ``__key__``; ``png`` or ``jpg``; ``json`` = ``{"width": W, "height": H,
"annotations": [{"bbox": [x, y, w, h], "category_id": k}, ...]}`` with COCO pixel boxes and ``category_id``
already the class index 0..K-1. ``coco_to_shards`` writes them from a COCO set.

Bad entries fail early with one line naming them: a missing image file (checked for every image when the set
is opened), an annotation outside its image or of non-positive size, an unknown image or category id.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import lightning.pytorch as pl
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset

from data_modules import transforms
from data_modules.shards import decode_image, expand_urls, raw_samples, write_shards
from vitkd.detection.box_ops import coco_to_normalized
from vitkd.errors import VitkdInputError

BOX_TOLERANCE = 0.5  # pixels a box may stick out of its image (rounding in exported sets)


def check_box(bbox, width: float, height: float, where: str) -> None:
    """One-line error for a COCO ``[x, y, w, h]`` box that is malformed or outside its ``width``×``height`` image."""
    if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4):
        raise VitkdInputError(f"{where}: bbox {bbox!r} is not [x, y, w, h]: fix the annotation")
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        raise VitkdInputError(f"{where}: bbox {list(bbox)} has non-positive size: fix or drop the annotation")
    if x < -BOX_TOLERANCE or y < -BOX_TOLERANCE or x + w > width + BOX_TOLERANCE or y + h > height + BOX_TOLERANCE:
        raise VitkdInputError(
            f"{where}: bbox {list(bbox)} lies outside the {width:g}x{height:g} image: fix or clip the annotation"
        )


def to_tensor(image: Image.Image, img_size: int, in_chans: int) -> torch.Tensor:
    """The shared pipeline (``data_modules.transforms.to_tensor``) after PIL's resize: detection images are
    photographs shrunk many times, which PIL filters over the whole footprint and ``F.interpolate`` would alias."""
    image = image.convert("L" if in_chans == 1 else "RGB")
    if image.size != (img_size, img_size):
        image = image.resize((img_size, img_size), Image.BILINEAR)
    return transforms.to_tensor(image, in_chans, img_size)


def make_target(anns: list[tuple[list, int]], width: float, height: float, image_id: int) -> dict:
    boxes = torch.tensor([a[0] for a in anns], dtype=torch.float32).reshape(-1, 4)
    return {
        "labels": torch.tensor([a[1] for a in anns], dtype=torch.int64),
        "boxes": coco_to_normalized(boxes, width, height),
        "image_id": int(image_id),
    }


def category_ids(data: dict) -> list[int]:
    """Sorted category ids of a loaded COCO JSON (class index = position in this list)."""
    return sorted(int(c["id"]) for c in data["categories"])


def load_json(ann_file: str | Path) -> dict:
    path = Path(ann_file)
    if not path.is_file():
        raise VitkdInputError(f"COCO annotation file {path} does not exist: pass the instances JSON of the split")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise VitkdInputError(
            f"COCO annotation file {path} is not valid JSON ({err.msg} at line {err.lineno}): repair or re-export it"
        ) from err
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise VitkdInputError(f"COCO annotation file {path} has no '{key}' list: give a COCO instances JSON")
    return data


class CocoDetection(Dataset):
    """A COCO instances JSON over an image folder (``file_name`` relative to ``image_root``).

    ``data`` is the JSON already loaded from ``ann_file`` (the data module reads the train JSON once for its
    categories); only the parsed entries are kept, not the JSON.
    """

    def __init__(
        self,
        image_root: str | Path,
        ann_file: str | Path,
        img_size: int,
        in_chans: int = 3,
        categories: list[int] | None = None,
        data: dict | None = None,
    ):
        self.root, self.ann_file, self.img_size, self.in_chans = Path(image_root), Path(ann_file), img_size, in_chans
        data = data if data is not None else load_json(ann_file)
        cats = categories if categories is not None else category_ids(data)
        self.cat_index = {c: i for i, c in enumerate(cats)}
        self.images = []
        by_id = {}
        for img in data["images"]:
            try:
                entry = {
                    "id": int(img["id"]),
                    "file_name": str(img["file_name"]),
                    "width": float(img["width"]),
                    "height": float(img["height"]),
                }
            except (KeyError, TypeError, ValueError) as err:
                raise VitkdInputError(
                    f"{self.ann_file}: image entry {img!r} lacks id/file_name/width/height: fix the entry"
                ) from err
            if not (self.root / entry["file_name"]).is_file():
                raise VitkdInputError(
                    f"{self.ann_file}: image id {entry['id']} file {entry['file_name']!r} not found under {self.root}: "
                    "add the file or remove the entry"
                )
            by_id[entry["id"]] = entry
            self.images.append(entry)
        self.anns: dict[int, list[tuple[list, int]]] = {e["id"]: [] for e in self.images}
        for ann in data["annotations"]:
            where = f"{self.ann_file}: annotation id {ann.get('id')} (image id {ann.get('image_id')})"
            img = by_id.get(ann.get("image_id"))
            if img is None:
                raise VitkdInputError(f"{where}: unknown image id: fix the annotation's image_id")
            if ann.get("category_id") not in self.cat_index:
                raise VitkdInputError(f"{where}: unknown category id {ann.get('category_id')}: add it to 'categories'")
            check_box(ann.get("bbox"), img["width"], img["height"], where)
            if not ann.get("iscrowd", 0):
                self.anns[img["id"]].append((list(ann["bbox"]), self.cat_index[ann["category_id"]]))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        img = self.images[i]
        with Image.open(self.root / img["file_name"]) as image:
            x = to_tensor(image, self.img_size, self.in_chans)
        return x, make_target(self.anns[img["id"]], img["width"], img["height"], img["id"])


class UnlabeledImages(Dataset):
    """Every PNG/JPEG image under a folder (sorted), each with an empty target: training images the teacher
    labels (data-free detection distillation)."""

    SUFFIXES = (".png", ".jpg", ".jpeg")

    def __init__(self, root: str | Path, img_size: int, in_chans: int = 3):
        self.root, self.img_size, self.in_chans = Path(root), img_size, in_chans
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in self.SUFFIXES)
        if not self.files:
            raise VitkdInputError(f"train_unlabeled {self.root}: no .png/.jpg image found: pass a folder of images")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        with Image.open(self.files[i]) as image:
            x = to_tensor(image, self.img_size, self.in_chans)
        return x, make_target([], 1, 1, i + 1)


class DetectionShards(IterableDataset):
    """Detection webdataset shards (format in the module docstring), in shard order (``shuffle`` buffers samples)."""

    def __init__(
        self,
        urls: str | list[str],
        img_size: int,
        in_chans: int = 3,
        num_classes: int | None = None,
        shuffle: int = 0,
        seed: int = 0,
    ):
        self.urls = expand_urls(urls)
        self.img_size, self.in_chans, self.num_classes, self.shuffle, self.seed = (
            img_size,
            in_chans,
            num_classes,
            shuffle,
            seed,
        )
        self.epoch = 0

    def decode(self, sample: dict, index: int):
        where = f"shard sample {sample.get('__key__')!r} in {sample.get('__url__')}"
        if "json" not in sample:
            raise VitkdInputError(f"{where} has no json entry: detection shards need the boxes in a 'json' field")
        try:
            meta = json.loads(sample["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise VitkdInputError(f"{where}: the json entry is not valid JSON: repack the shard") from err
        image = decode_image(sample)
        width, height = float(meta.get("width", image.width)), float(meta.get("height", image.height))
        anns = []
        for ann in meta.get("annotations", []):
            check_box(ann.get("bbox"), width, height, where)
            k = int(ann.get("category_id", -1))
            if k < 0 or (self.num_classes is not None and k >= self.num_classes):
                raise VitkdInputError(
                    f"{where}: category_id {k} is not a class index 0..{(self.num_classes or 1) - 1}: "
                    "repack with class indices"
                )
            anns.append((list(ann["bbox"]), k))
        return to_tensor(image, self.img_size, self.in_chans), make_target(
            anns, width, height, int(meta.get("image_id", index))
        )

    def __iter__(self) -> Iterator:
        rng = np.random.default_rng(self.seed + self.epoch)
        self.epoch += 1
        buf = []
        for i, sample in enumerate(raw_samples(self.urls)):
            item = self.decode(sample, i)
            if self.shuffle <= 0:
                yield item
                continue
            buf.append(item)
            if len(buf) >= self.shuffle:
                yield buf.pop(int(rng.integers(len(buf))))
        while buf:
            yield buf.pop(int(rng.integers(len(buf))))


def coco_to_shards(
    image_root: str | Path, ann_file: str | Path, out_dir: str | Path, prefix: str = "det", maxcount: int = 1000
) -> list[Path]:
    """Write a COCO set as detection shards (original image bytes; class indices in ``category_id``)."""
    ds = CocoDetection(image_root, ann_file, img_size=1)
    inv = {i: c for c, i in ds.cat_index.items()}

    def samples():
        for img in ds.images:
            path = ds.root / img["file_name"]
            ext = "png" if path.suffix.lower() == ".png" else "jpg"
            anns = [{"bbox": b, "category_id": k} for b, k in ds.anns[img["id"]]]
            meta = {"width": img["width"], "height": img["height"], "image_id": img["id"], "annotations": anns}
            yield {"__key__": f"{img['id']:08d}", ext: path.read_bytes(), "json": json.dumps(meta)}

    return write_shards(
        samples(),
        out_dir,
        pattern=f"{prefix}-%06d.tar",
        maxcount=maxcount,
        meta={"categories": [inv[i] for i in sorted(inv)]},
    )


def collate(batch: list) -> tuple[torch.Tensor, list[dict]]:
    """Images stacked; targets kept as a list (their box counts differ)."""
    return torch.stack([b[0] for b in batch]), [b[1] for b in batch]


class CocoDataModule(pl.LightningDataModule):
    """COCO-format detection data: for each split either an image folder + instances JSON or shard URLs.

    Args:
        train_images, train_json, val_images, val_json, test_images, test_json: COCO sets per split.
        train_urls, val_urls, test_urls: detection shards per split (used where the JSON is not given).
        num_classes: object classes K; read from the train JSON's categories when not given (needed for shards).
        img_size: images are resized to img_size × img_size (boxes are normalised, so they follow).
        in_chans: 3 (RGB) or 1 (grey).
        batch_size, num_workers: DataLoader settings.
        shuffle_buffer: sample shuffle buffer for training shards.
        train_unlabeled: a folder of images to train on instead, without labels (``train_labeled`` is then
            False: only a stage that takes its targets from a teacher accepts it).
    """

    def __init__(
        self,
        train_images: str | None = None,
        train_json: str | None = None,
        val_images: str | None = None,
        val_json: str | None = None,
        test_images: str | None = None,
        test_json: str | None = None,
        train_urls: str | None = None,
        val_urls: str | None = None,
        test_urls: str | None = None,
        num_classes: int | None = None,
        img_size: int = 64,
        in_chans: int = 3,
        batch_size: int = 32,
        num_workers: int = 0,
        shuffle_buffer: int = 500,
        train_unlabeled: str | None = None,
    ):
        super().__init__()
        self.train_unlabeled = train_unlabeled
        self.train_labeled = train_unlabeled is None
        self.sources = {
            "train": (train_images, train_json, train_urls),
            "val": (val_images, val_json, val_urls),
            "test": (test_images, test_json, test_urls),
        }
        self.img_size, self.in_chans, self.batch_size, self.num_workers, self.shuffle_buffer = (
            img_size,
            in_chans,
            batch_size,
            num_workers,
            shuffle_buffer,
        )
        # the train JSON is read once: its categories are needed now (num_classes), its entries at setup
        self._loaded = {"train": load_json(train_json)} if train_json else {}
        self.categories = category_ids(self._loaded["train"]) if train_json else None
        if num_classes is None:
            if self.categories is None:
                raise VitkdInputError(
                    "CocoDataModule needs num_classes with shards: pass --data.init_args.num_classes K"
                )
            num_classes = len(self.categories)
        self.num_classes = num_classes
        self.datasets: dict = {}

    def dataset(self, split: str):
        if split not in self.datasets:
            images, ann_file, urls = self.sources[split]
            if split == "train" and self.train_unlabeled:
                self.datasets[split] = UnlabeledImages(self.train_unlabeled, self.img_size, self.in_chans)
            elif ann_file:
                if not images:
                    raise VitkdInputError(
                        f"{split}_json is given without {split}_images: pass the image folder of the split"
                    )
                self.datasets[split] = CocoDetection(
                    images, ann_file, self.img_size, self.in_chans, self.categories, self._loaded.pop(split, None)
                )
            elif urls:
                self.datasets[split] = DetectionShards(
                    urls,
                    self.img_size,
                    self.in_chans,
                    self.num_classes,
                    shuffle=self.shuffle_buffer if split == "train" else 0,
                )
            else:
                raise VitkdInputError(
                    f"no {split} data: pass --data.init_args.{split}_json and {split}_images, or {split}_urls"
                )
        return self.datasets[split]

    def setup(self, stage: str) -> None:
        for split in {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}.get(stage, ()):
            self.dataset(split)

    def _loader(self, split: str) -> DataLoader:
        ds = self.dataset(split)
        shuffle = split == "train" and not isinstance(ds, IterableDataset)
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=collate,
            drop_last=False,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
