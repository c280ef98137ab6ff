"""``python -m vitkd.pack FORMAT SRC OUT``: pack a data set in its real format into webdataset shards.

FORMAT is one of ``mnist``, ``fashion-mnist``, ``emnist``, ``cifar10``, ``cifar100``, ``folder`` (ImageNet-style class
folders) or ``flat`` (unlabeled images in a folder, .tar or .zip, Flickr style); the readers live in
``data_modules/readers/``. Output: ``OUT/{name}-%06d.tar`` shards whose samples hold ``__key__``, ``png``
(or ``jpg``), ``cls`` (where labels exist) and ``src`` (= ``name``, e.g. ``emnist-byclass-train``), and
``OUT/meta.json`` (samples per shard, classes, source, the brace URL the DataModules take). The URL is
printed on stdout.

Sample ``i`` goes to shard ``i // shard_size``, decided before anything is written. ``--workers``
processes each write whole shards under a temporary name and rename them when complete, so a crash never
leaves a partial ``.tar``. Rerunning the same command resumes: shards already complete are kept, the
others are written (identically: keys, order and tar headers do not depend on time or worker).
``meta.json`` is written last. Rerunning with other options or other inputs into the same OUT is refused
unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import re
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from data_modules.readers import FORMATS, NATIVE_SIZE, Reader, open_reader
from data_modules.readers.idx import EMNIST_SPLITS
from data_modules.readers.resize import fit_size
from data_modules.shards import encode_png, shard_url
from vitkd.errors import OneLineParser, VitkdInputError
from vitkd.io import atomic_path, write_json

PLAN_FILE = ".pack-plan.json"  # the options of the pack in progress, compared when it resumes
TAR_MTIME = 946684800  # fixed member time (2000-01-01) so a rewritten shard is byte-identical
RESAMPLE = ("auto", "box", "bicubic", "bilinear", "lanczos", "nearest")
_UMASK = os.umask(0o022)
os.umask(_UMASK)
DEFAULT_SHARD_SIZE = 5000  # ~10-25 MB of 32×32 PNGs; MNIST train → 12 shards, ImageNet 1.28M → 257


def encode(image: np.ndarray, image_format: str) -> bytes:
    if image_format == "png":
        return encode_png(image)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@dataclass
class ShardJob:
    """Everything a worker needs to write shard ``j`` (picklable; sent once per worker)."""

    reader: Reader
    out: Path
    counts: list[int]
    shard_size: int
    size: int | None
    resample: str
    crop: str
    image_format: str
    labels: bool

    def path(self, j: int) -> Path:
        return self.out / f"{self.reader.name}-{j:06d}.tar"

    def samples(self, j: int):
        src = self.reader.name.encode()
        start = j * self.shard_size
        for key, image, label in self.reader.read(start, start + self.counts[j]):
            sample = {
                "__key__": key,
                self.image_format: encode(fit_size(image, self.size, self.resample, self.crop), self.image_format),
                "src": src,
            }
            if self.labels and label is not None:
                sample["cls"] = str(label).encode()
            yield sample

    def write(self, j: int) -> tuple[int, int]:
        """Write shard ``j`` under a temporary name; it gets its final name only once complete."""
        n = 0
        with atomic_path(self.path(j)) as tmp:
            # a float member time gives each member a pax header (as write_shards' do), so a damaged member
            # header makes tarfile raise where a plain ustar header would end the shard there silently
            with wds.TarWriter(str(tmp), encoder=False, mtime=float(TAR_MTIME)) as sink:
                for sample in self.samples(j):
                    sink.write(sample)
                    n += 1
            if n != self.counts[j]:
                raise RuntimeError(f"shard {j}: read {n} samples, planned {self.counts[j]}")
            os.chmod(tmp, 0o666 & ~_UMASK)  # the temporary file is private (0600); shards are data to share
        return j, n


def shard_samples(path: Path) -> int | None:
    """Samples in a shard file (from its tar headers), None if it cannot be read as a tar."""
    try:
        with tarfile.open(path, "r:") as tar:
            return len({m.name.split(".", 1)[0] for m in tar if m.isfile()})
    except (tarfile.TarError, OSError):
        return None


_JOB: ShardJob | None = None


def _init_worker(job: ShardJob) -> None:
    global _JOB
    _JOB = job


def _write_shard(j: int) -> tuple[int, int]:
    return _JOB.write(j)


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _prepare_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise VitkdInputError(f"OUT {out} is a file: pass a folder for the shards")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise VitkdInputError(f"cannot create OUT {out} ({err.strerror}): pass a writable folder") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise VitkdInputError(f"OUT {out} is not writable: pass a writable folder")


def _own_shards(out: Path, prefix: str) -> list[Path]:
    return [p for p in out.glob(f"{prefix}-*.tar") if re.fullmatch(rf"{re.escape(prefix)}-\d{{6}}\.tar", p.name)]


def _check_plan(out: Path, plan: dict, overwrite: bool) -> None:
    """Refuse to mix shards of different packs in one OUT; ``overwrite`` deletes the earlier pack."""
    old = None
    for f in (out / PLAN_FILE, out / "meta.json"):
        if f.is_file():
            try:
                old = json.loads(f.read_text()).get("plan") or {}  # {}: a meta.json not written by the packer
            except (json.JSONDecodeError, AttributeError):
                old = {}
            break
    if old is None or old == plan:  # nothing recorded: complete shards are kept if their count is right
        return
    if not overwrite:
        differs = sorted(k for k in set(plan) | set(old or {}) if (old or {}).get(k) != plan.get(k))
        raise VitkdInputError(
            f"OUT {out} holds shards of another pack (differs in: {', '.join(differs) or 'unknown'}): "
            "pass a new OUT, or --overwrite to replace them"
        )
    for prefix in {plan["name"], (old or {}).get("name") or plan["name"]}:
        for p in _own_shards(out, prefix):
            p.unlink()
    for f in (out / PLAN_FILE, out / "meta.json"):
        f.unlink(missing_ok=True)


def pack(
    fmt: str,
    src: str | Path,
    out: str | Path,
    size: int | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    workers: int | None = None,
    split: str = "train",
    emnist_split: str = "byclass",
    label_set: str = "fine",
    name: str | None = None,
    image_format: str = "png",
    resample: str = "auto",
    crop: str = "none",
    labels: bool = True,
    limit: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Pack ``src`` into ``out``; returns the meta.json contents. See the module docstring."""
    if shard_size < 1:
        raise VitkdInputError(f"--shard-size {shard_size} must be at least 1")
    if limit is not None and limit < 1:
        raise VitkdInputError(f"--limit {limit} must be at least 1")
    if size is not None and size < 0:
        raise VitkdInputError(f"--size {size} must be positive (0 keeps each image's own size)")
    reader = open_reader(fmt, src, split=split, emnist_split=emnist_split, label_set=label_set, name=name)
    size = (NATIVE_SIZE.get(fmt) or 32) if size is None else (size or None)
    n = len(reader) if limit is None else min(limit, len(reader))
    counts = [min(shard_size, n - s) for s in range(0, n, shard_size)]
    out = Path(out)
    _prepare_out(out)
    labelled = labels and reader.classes is not None
    plan = {
        "name": reader.name,
        "source": reader.describe(),
        "num_samples": n,
        "shard_size": shard_size,
        "size": size,
        "resample": resample,
        "crop": crop,
        "image_format": image_format,
        "labels": labelled,
    }
    _check_plan(out, plan, overwrite)
    for stale in out.glob(f".{reader.name}-*.tar.*.tmp"):  # left by a killed run; never a final name
        stale.unlink(missing_ok=True)
    write_json(out / PLAN_FILE, {"plan": plan})

    job = ShardJob(reader, out, counts, shard_size, size, resample, crop, image_format, labelled)
    pending = [j for j, c in enumerate(counts) if shard_samples(job.path(j)) != c]
    done = n - sum(counts[j] for j in pending)
    workers = max(1, min(workers or default_workers(), len(pending)))
    with tqdm(
        total=n, initial=done, unit="img", desc=f"pack {reader.name}", disable=not progress, dynamic_ncols=True
    ) as bar:
        if workers == 1:
            for j in pending:
                bar.update(job.write(j)[1])
        else:
            # fork shares the loaded arrays with the workers; elsewhere the job is pickled to each worker
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            with ctx.Pool(workers, initializer=_init_worker, initargs=(job,)) as pool:
                for _, k in pool.imap_unordered(_write_shard, pending):
                    bar.update(k)

    files = [job.path(j).name for j in range(len(counts))]
    meta = {
        "format": fmt,
        "source": str(src),
        "split": split,
        "src": reader.name,
        "url": shard_url(out, len(counts), reader.name),
        "pattern": shard_url("", len(counts), reader.name),
        "num_samples": n,
        "shards": len(counts),
        "shard_counts": dict(zip(files, counts)),
        "classes": reader.classes if labelled else None,
        "num_classes": len(reader.classes) if labelled else None,
        "size": size,
        "image_format": image_format,
        "plan": plan,
        "created_by": "vitkd.pack",
    }
    if fmt == "emnist":
        meta["emnist_split"] = emnist_split
    write_json(out / "meta.json", meta)
    (out / PLAN_FILE).unlink(missing_ok=True)
    print(
        f"packed {n} images into {len(counts)} shards ({len(counts) - len(pending)} already done) in {out}",
        file=sys.stderr,
    )
    return meta


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python -m vitkd.pack", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("fmt", metavar="FORMAT", choices=FORMATS, help=f"one of {', '.join(FORMATS)}")
    p.add_argument(
        "src",
        metavar="SRC",
        help="the data set as downloaded: folder, or archive (.tar.gz for CIFAR; .tar/.zip for flat)",
    )
    p.add_argument("out", metavar="OUT", help="output folder for the shards and meta.json")
    p.add_argument(
        "--size",
        type=int,
        default=None,
        help=(
            "side of the stored square images (default: 28 for MNIST/Fashion-MNIST/EMNIST, 32 otherwise; "
            "0 keeps each image's size)"
        ),
    )
    p.add_argument(
        "--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help=f"samples per shard (default {DEFAULT_SHARD_SIZE})"
    )
    p.add_argument("--workers", type=int, default=None, help="processes writing shards (default: usable CPUs)")
    p.add_argument(
        "--split",
        default="train",
        help=(
            "train, test or all (train then test) for the fixed data sets; only a name for folder/flat (default train)"
        ),
    )
    p.add_argument(
        "--emnist-split",
        default="byclass",
        choices=EMNIST_SPLITS,
        help="EMNIST split (default byclass: all 62 classes; with --split all, the paper's 814K wild images)",
    )
    p.add_argument("--label-set", default="fine", choices=("fine", "coarse"), help="CIFAR-100 labels (default fine)")
    p.add_argument(
        "--name",
        default=None,
        help="shard prefix, key prefix and src tag (default FORMAT-SPLIT; emnist-EMNIST_SPLIT-SPLIT for EMNIST)",
    )
    p.add_argument(
        "--format",
        dest="image_format",
        default="png",
        choices=("png", "jpg"),
        help="stored image encoding (default png, lossless)",
    )
    p.add_argument(
        "--resample",
        default="auto",
        choices=RESAMPLE,
        help="resize filter (default auto: box when shrinking, bicubic when enlarging)",
    )
    p.add_argument(
        "--crop",
        default="none",
        choices=("none", "center"),
        help="none: direct resize to size×size (ImageNet-32); center: shorter side then center crop",
    )
    p.add_argument(
        "--no-labels",
        dest="labels",
        action="store_false",
        help="write no cls (e.g. a labelled set used as a wild pool)",
    )
    p.add_argument("--limit", type=int, default=None, help="pack only the first N images")
    p.add_argument("--overwrite", action="store_true", help="replace shards of a different earlier pack in OUT")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        meta = pack(**vars(args))
    except VitkdInputError as err:
        print(f"vitkd: error: {err}", file=sys.stderr)
        return 2
    print(meta["url"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
