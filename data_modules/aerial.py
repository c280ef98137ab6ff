"""The embedded detection default: a small-object "aerial" set made on first use.

Objects of ``CLASSES`` (a disk, a square, a triangle, and a handwritten digit glyph from scikit-learn's
digits), 1–4 per image, 6–14 px on 64 px images, in random bright colours, pasted without overlap on crops
of the natural images that ship with scikit-image (``skimage.data``) and scikit-learn
(``load_sample_images``): the crops are large (96–320 px) and scaled down, a view from above. Written once,
atomically, as COCO JSON + PNG images with fixed train/val/test splits under
``data/aerial-v{VERSION}-{sizes}-s{seed}/``. Backgrounds come from the same few photos in every split (the
crops differ); objects, colours and places are drawn independently per image.
"""

from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from data_modules.coco import CocoDataModule
from vitkd.io import atomic_dir, build_once, write_json

VERSION = 1
CLASSES = ("disk", "square", "triangle", "digit")
SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2, "wild": 3}


def backgrounds() -> list[np.ndarray]:
    """RGB uint8 photos from scikit-image and scikit-learn (grey ones repeated over three channels)."""
    import skimage.data as sd
    from sklearn.datasets import load_sample_images

    photos = [sd.astronaut(), sd.coffee(), sd.chelsea(), sd.rocket(), sd.immunohistochemistry(), sd.hubble_deep_field()]
    photos += [np.repeat(g()[..., None], 3, axis=2) for g in (sd.camera, sd.brick, sd.grass, sd.gravel)]
    photos += list(load_sample_images().images)
    return [np.ascontiguousarray(p[..., :3]).astype(np.uint8) for p in photos]


def _glyphs() -> np.ndarray:
    from sklearn.datasets import load_digits

    return load_digits().images / 16.0  # (1797, 8, 8) in [0, 1]


def object_mask(kind: str, size: int, rng: np.random.Generator, glyphs: np.ndarray) -> Image.Image:
    """An L-mode mask (255 = object) of one object, ``size`` px square canvas."""
    m = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(m)
    s = size - 1
    if kind == "disk":
        d.ellipse([0, 0, s, s], fill=255)
    elif kind == "square":
        d.rectangle([0, 0, s, s], fill=255)
    elif kind == "triangle":
        d.polygon([(0, s), (s, s), (s / 2, 0)], fill=255)
    else:
        g = glyphs[rng.integers(len(glyphs))]
        m = (
            Image.fromarray((g * 255).astype(np.uint8))
            .resize((size, size), Image.BILINEAR)
            .point(lambda v: 255 if v > 90 else 0)
        )
    return m


def make_image(
    rng: np.random.Generator,
    photos: list[np.ndarray],
    glyphs: np.ndarray,
    img_size: int,
    max_objects: int,
    min_size: int,
    max_size: int,
):
    """One image and its COCO annotations (bbox xywh pixels, category index)."""
    photo = photos[rng.integers(len(photos))]
    h, w = photo.shape[:2]
    crop = int(rng.integers(96, min(320, h, w) + 1))
    y0, x0 = int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
    bg = Image.fromarray(photo[y0 : y0 + crop, x0 : x0 + crop]).resize((img_size, img_size), Image.BILINEAR)
    bg = Image.fromarray((np.asarray(bg, dtype=np.float32) * 0.7).astype(np.uint8))  # dimmed: objects stand out
    anns, taken = [], []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _try in range(20):
            size = int(rng.integers(min_size, max_size + 1))
            x, y = int(rng.integers(0, img_size - size + 1)), int(rng.integers(0, img_size - size + 1))
            if all(x + size + 1 < a or a + b + 1 < x or y + size + 1 < c or c + e + 1 < y for a, c, b, e in taken):
                break
        else:
            continue
        k = int(rng.integers(len(CLASSES)))
        mask = object_mask(CLASSES[k], size, rng, glyphs)
        bbox = mask.getbbox()
        if bbox is None:
            continue
        rgb = tuple(
            int(255 * v) for v in colorsys.hsv_to_rgb(float(rng.random()), 0.8 + 0.2 * float(rng.random()), 1.0)
        )
        bg.paste(Image.new("RGB", (size, size), rgb), (x, y), mask)
        taken.append((x, y, size, size))
        anns.append(([x + bbox[0], y + bbox[1], bbox[2] - bbox[0], bbox[3] - bbox[1]], k))
    return bg, anns


def generate_aerial(
    out_dir: str | Path,
    sizes: dict[str, int],
    seed: int = 0,
    img_size: int = 64,
    max_objects: int = 4,
    min_size: int = 6,
    max_size: int = 14,
) -> Path:
    """Write ``{split}.json`` (COCO) and ``images/{split}/*.png`` for each split, atomically."""
    photos, glyphs = backgrounds(), _glyphs()
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)]
    with atomic_dir(out_dir) as tmp:
        for split, n in sizes.items():
            rng = np.random.default_rng([seed, SPLIT_SEEDS[split]])
            (tmp / "images" / split).mkdir(parents=True)
            images, annotations = [], []
            for i in range(n):
                image, anns = make_image(rng, photos, glyphs, img_size, max_objects, min_size, max_size)
                name = f"{split}/{i:05d}.png"
                image.save(tmp / "images" / name)
                images.append({"id": i + 1, "file_name": name, "width": img_size, "height": img_size})
                for bbox, k in anns:
                    annotations.append(
                        {
                            "id": len(annotations) + 1,
                            "image_id": i + 1,
                            "category_id": k + 1,
                            "bbox": bbox,
                            "area": bbox[2] * bbox[3],
                            "iscrowd": 0,
                        }
                    )
            write_json(tmp / f"{split}.json", {"images": images, "annotations": annotations, "categories": categories})
    return Path(out_dir)


def generate_wild(out_dir: str | Path, n: int, seed: int = 0, img_size: int = 64) -> Path:
    """``n`` more images of the same kind, drawn from their own seed, as PNGs with no annotations (an
    unlabeled pool for data-free distillation), written atomically."""
    photos, glyphs = backgrounds(), _glyphs()
    rng = np.random.default_rng([seed, SPLIT_SEEDS["wild"]])
    with atomic_dir(out_dir) as tmp:
        for i in range(n):
            image, _ = make_image(rng, photos, glyphs, img_size, 4, 6, 14)
            image.save(tmp / f"{i:05d}.png")
    return Path(out_dir)


class AerialDataModule(CocoDataModule):
    """The embedded aerial set (made on first use under ``data_dir``), served as a COCO-format set.

    Args:
        data_dir: where the set is written (``data/`` by default).
        num_train, num_val, num_test: images per split.
        seed: seed of the set (fixed splits for a given seed and sizes).
        img_size: 64 (the set is drawn at this size).
        batch_size, num_workers: DataLoader settings.
        wild_images: train on this many unlabeled images of the same kind instead (their own seed, no
            annotations written; ``train_labeled`` is False), for data-free distillation; 0 = the labelled split.
    """

    num_classes = len(CLASSES)

    def __init__(
        self,
        data_dir: str = "data",
        num_train: int = 6000,
        num_val: int = 200,
        num_test: int = 200,
        seed: int = 0,
        img_size: int = 64,
        in_chans: int = 3,
        batch_size: int = 32,
        num_workers: int = 0,
        wild_images: int = 0,
    ):
        self.root = Path(data_dir) / f"aerial-v{VERSION}-{num_train}-{num_val}-{num_test}-{img_size}px-s{seed}"
        self.sizes, self.seed, self.aerial_img_size = (
            {"train": num_train, "val": num_val, "test": num_test},
            seed,
            img_size,
        )
        r = self.root
        super().__init__(
            train_images=str(r / "images"),
            val_images=str(r / "images"),
            test_images=str(r / "images"),
            num_classes=len(CLASSES),
            img_size=img_size,
            in_chans=in_chans,
            batch_size=batch_size,
            num_workers=num_workers,
        )
        self.wild_root = Path(data_dir) / f"aerial-wild-v{VERSION}-{wild_images}-{img_size}px-s{seed}"
        self.wild_images = wild_images
        if wild_images > 0:
            self.train_unlabeled, self.train_labeled = str(self.wild_root), False
        self.sources = {s: (str(r / "images"), str(r / f"{s}.json"), None) for s in ("train", "val", "test")}
        self.categories = list(range(1, len(CLASSES) + 1))

    def prepare_data(self) -> None:
        build_once(
            self.root,
            lambda: generate_aerial(self.root, self.sizes, self.seed, self.aerial_img_size),
            done=self.root / "test.json",
        )
        if self.wild_images > 0:
            build_once(
                self.wild_root,
                lambda: generate_wild(self.wild_root, self.wild_images, self.seed, self.aerial_img_size),
                done=self.wild_root / f"{self.wild_images - 1:05d}.png",
            )

    def dataset(self, split: str):
        self.prepare_data()
        return super().dataset(split)
