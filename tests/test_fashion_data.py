"""Fashion-MNIST data path and wild pool on tiny IDX files written here in the real format (gzip): reading,
packing, the splits, the pool builder (counts, tags, labels, shift, determinism) and one-line errors."""

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_pack import write_idx

from data_modules import fashion
from data_modules import fashion_pool as fp
from vitkd.errors import VitkdInputError, demo_main

PER_CLASS, N_TEST = 20, 10
TINY = {"wild_max": 10, "wild_ratio": 10, "val_per_class": 2}  # wild: 10 down to 1 per class
TINY_COUNTS = {"digit": 7, "glyph": 6, "shape": 5, "photo": 4, "texture": 3, "noise": 2}
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


@pytest.fixture
def raw(tmp_path) -> tuple[Path, dict]:
    """The four files, gzipped, PER_CLASS train images per class (shuffled) and N_TEST test images."""
    rng = np.random.default_rng(1)
    y_train = rng.permutation(np.repeat(np.arange(10), PER_CLASS)).astype(np.uint8)
    sets = {
        "train": (rng.integers(0, 256, (len(y_train), 28, 28), dtype=np.uint8), y_train),
        "test": (rng.integers(0, 256, (N_TEST, 28, 28), dtype=np.uint8), rng.integers(0, 10, N_TEST).astype(np.uint8)),
    }
    folder = tmp_path / "fashion"
    for split, (x, y) in sets.items():
        img, lab = fashion.FILES[split]
        write_idx(folder / img, x)
        write_idx(folder / lab, y)
    return folder, sets


def read_shards(paths) -> list[dict]:
    """Every sample of the tar shards, in order: {field: bytes}."""
    out: dict[str, dict] = {}
    for p in sorted(paths):
        with tarfile.open(p) as tar:
            for m in tar:
                key, field = m.name.split(".", 1)
                out.setdefault(key, {"__key__": key})[field] = tar.extractfile(m).read()
    return list(out.values())


def png(sample) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(sample["png"])))


# -- reading and packing ------------------------------------------------------------------------------


def test_idx_round_trip_and_pack(raw, tmp_path):
    folder, sets = raw
    data = fashion.load_fashion(str(folder))
    for split, (x, y) in sets.items():
        assert np.array_equal(data[split][0], x) and np.array_equal(data[split][1], y.astype(np.int64))
        assert data[split][1].dtype == np.int64
    out = tmp_path / "packed"
    argv = [
        sys.executable,
        "-m",
        "vitkd.pack",
        "fashion-mnist",
        str(folder),
        str(out),
        "--shard-size",
        "150",
        "--workers",
        "1",
        "--no-progress",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=ENV)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == str(out / "fashion-mnist-train-{000000..000001}.tar")
    samples = read_shards(out.glob("*.tar"))
    assert len(samples) == len(sets["train"][1])
    assert {s["src"] for s in samples} == {b"fashion-mnist-train"}
    assert [int(s["cls"]) for s in samples] == sets["train"][1].tolist()
    assert np.array_equal(png(samples[5]), sets["train"][0][5])
    assert json.loads((out / "meta.json").read_text())["classes"] == fashion.CLASSES


# -- splits -------------------------------------------------------------------------------------------


def test_splits_disjoint_cover_imbalanced(raw):
    folder, sets = raw
    labels = sets["train"][1].astype(np.int64)
    counts = fashion.wild_class_counts(largest=TINY["wild_max"], ratio=TINY["wild_ratio"])
    idx = fashion.split_indices(labels, counts, TINY["val_per_class"])
    joined = np.concatenate(list(idx.values()))
    assert len(joined) == len(set(joined.tolist())) == len(labels)  # disjoint and all of the train set
    wild = np.bincount(labels[idx["wild"]], minlength=10)
    assert wild.max() >= 10 * wild.min() > 0
    assert np.bincount(labels[idx["val"]], minlength=10).tolist() == [TINY["val_per_class"]] * 10
    splits = fashion.fashion_splits(str(folder), **TINY)
    assert np.array_equal(splits["wild"][1], labels[idx["wild"]]) and np.array_equal(splits["test"][0], sets["test"][0])
    assert sum(len(splits[k][1]) for k in ("wild", "val", "train")) == len(labels)
    real = fashion.wild_class_counts()  # the benchmark's own: 2,500 down to 250, 10,218 in all
    assert (real.max(), real.min(), real.sum()) == (2500, 250, 10218)


# -- the pool -----------------------------------------------------------------------------------------


def test_reacquire_shifts_and_is_deterministic(raw):
    image = raw[1]["train"][0][0]
    a = fp.reacquire(image, np.random.default_rng(3))
    assert a.shape == (28, 28) and a.dtype == np.uint8
    assert np.array_equal(a, fp.reacquire(image, np.random.default_rng(3)))
    assert np.abs(a.astype(int) - image).mean() > 10  # a different acquisition, not the image itself
    assert not np.array_equal(a, fp.reacquire(image, np.random.default_rng(4)))


def test_pool_counts_tags_labels(raw, tmp_path):
    folder, _ = raw
    wild_x, wild_y = fashion.fashion_splits(str(folder), **TINY)["wild"]
    url = fp.generate_fashion_pool(
        tmp_path / "pool", folder, seed=0, shard_size=20, counts=TINY_COUNTS, split_sizes=TINY
    )
    meta = json.loads((tmp_path / "pool" / "meta.json").read_text())
    shards = sorted((tmp_path / "pool").glob("wild-*.tar"))
    assert len(shards) >= 2 and url == str(tmp_path / "pool" / f"wild-{{000000..{len(shards) - 1:06d}}}.tar")
    assert (
        meta["sources"] == {"fashion": len(wild_y), **TINY_COUNTS}
        and meta["version"] == fp.POOL_VERSION
        and meta["seed"] == 0
    )
    assert list(meta["fashion_per_class"].values()) == np.bincount(wild_y, minlength=10).tolist()
    samples = read_shards(shards)
    assert [s["__key__"] for s in samples] == [f"wild{i:07d}" for i in range(len(samples))]
    tags = [s["src"].decode() for s in samples]
    assert {t: tags.count(t) for t in set(tags)} == meta["sources"]
    assert tags[: len(wild_y)] != ["fashion"] * len(wild_y)  # shuffled, not in source order
    assert all(("cls" in s) == (s["src"] == b"fashion") for s in samples)
    assert sorted(int(s["cls"]) for s in samples if "cls" in s) == sorted(wild_y.tolist())
    wild = {img.tobytes() for img in wild_x}
    for s in samples:
        img = png(s)
        assert img.shape == (28, 28) and img.dtype == np.uint8
        assert img.tobytes() not in wild  # every fashion image reacquired; no other source copies one
    for name, seed in (("again", 0), ("s1", 1)):
        fp.generate_fashion_pool(
            tmp_path / name, folder, seed=seed, shard_size=20, counts=TINY_COUNTS, split_sizes=TINY
        )
    assert read_shards((tmp_path / "again").glob("*.tar")) == samples  # the same seed, the same pool
    assert [s["png"] for s in read_shards((tmp_path / "s1").glob("*.tar"))] != [s["png"] for s in samples]


def test_pool_cls_is_the_true_class(raw, tmp_path, monkeypatch):
    """With the acquisition switched off, each fashion sample is its wild image and carries its label."""
    folder, _ = raw
    wild_x, wild_y = fashion.fashion_splits(str(folder), **TINY)["wild"]
    monkeypatch.setattr(fp, "reacquire", lambda image, rng: image)
    fp.generate_fashion_pool(tmp_path / "pool", folder, counts={k: 1 for k in TINY_COUNTS}, split_sizes=TINY)
    label = {img.tobytes(): int(c) for img, c in zip(wild_x, wild_y)}
    found = [
        (label[png(s).tobytes()], int(s["cls"]))
        for s in read_shards((tmp_path / "pool").glob("*.tar"))
        if s["src"] == b"fashion"
    ]
    assert len(found) == len(wild_y) and all(a == b for a, b in found)


# -- bad input ----------------------------------------------------------------------------------------


def _one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


def test_missing_folder_one_line(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere"
    monkeypatch.setenv("FASHION_MNIST_DIR", str(missing))
    with pytest.raises(VitkdInputError) as err:
        fashion.install_fashion()  # the env var names the folder: no apt-get, the error
    line = _one_line(str(err.value))
    assert (
        f"FASHION_MNIST_DIR {missing} is not a folder" in line
        and "set FASHION_MNIST_DIR" in line
        and "train-images-idx3-ubyte.gz" in line
    )
    done = subprocess.run(
        [sys.executable, "-m", "data_modules.fashion_pool", "--data_dir", str(tmp_path / "data")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**ENV, "FASHION_MNIST_DIR": str(missing)},
    )
    assert done.returncode == 1 and done.stdout == ""
    assert _one_line(done.stderr) == f"vitkd: error: {line}"
    assert not (tmp_path / "data").exists()


def test_partial_folder_one_line(raw, tmp_path, monkeypatch):
    folder, _ = raw
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()  # 3 of the 4 files
    monkeypatch.setenv("FASHION_MNIST_DIR", str(folder))
    with pytest.raises(SystemExit) as done:
        demo_main(lambda: fp.main(["--data_dir", str(tmp_path / "data")]))
    line = _one_line(str(done.value.code))
    assert line.startswith(f"vitkd: error: FASHION_MNIST_DIR {folder} lacks t10k-labels-idx1-ubyte (plain or .gz)")
    assert "put the four original IDX files" in line
    with pytest.raises(VitkdInputError, match="lacks t10k-labels-idx1-ubyte"):
        fp.generate_fashion_pool(tmp_path / "pool", split_sizes=TINY)
    assert not (tmp_path / "pool").exists() and not (tmp_path / "data").exists()
