"""Packers: tiny files written exactly as the real data sets ship → pack → stream back → same count,
labels and pixels; resume, crash safety and one-line errors."""

import gzip
import json
import pickle
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from data_modules import shards
from vitkd import pack as packer
from vitkd.errors import VitkdInputError

RNG = np.random.default_rng(0)


# -- writers of the real formats ------------------------------------------------------------------


def write_idx(path, array: np.ndarray, gz: bool = True) -> None:
    """IDX: 2 zero bytes, type 0x08 (ubyte), ndim, big-endian int32 dims, then the raw bytes."""
    head = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes()
    data = head + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def make_mnist(root, n_train=23, n_test=7, gz=True):
    sets = {}
    for part, n in (("train", n_train), ("t10k", n_test)):
        x, y = RNG.integers(0, 256, (n, 28, 28), dtype=np.uint8), RNG.integers(0, 10, n).astype(np.uint8)
        write_idx(root / f"{part}-images-idx3-ubyte", x, gz)
        write_idx(root / f"{part}-labels-idx1-ubyte", y, gz)
        sets[part] = (x, y)
    return sets


def make_emnist_letters(root, n=12):
    """EMNIST stores each image transposed, and letters labels are 1..26."""
    upright = RNG.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = RNG.integers(1, 27, n).astype(np.uint8)
    write_idx(root / "gzip" / "emnist-letters-train-images-idx3-ubyte", upright.transpose(0, 2, 1))
    write_idx(root / "gzip" / "emnist-letters-train-labels-idx1-ubyte", labels)
    return upright, labels


def _dump(path, d: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(d, f, protocol=2)


def make_cifar10(root, per_batch=3):
    """cifar-10-batches-py/: data_batch_1..5, test_batch (bytes keys, data N×3072 CHW), batches.meta."""
    folder = root / "cifar-10-batches-py"
    xs, ys = [], []
    for b in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = RNG.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = RNG.integers(0, 10, per_batch).tolist()
        _dump(
            folder / b,
            {b"batch_label": b.encode(), b"labels": labels, b"data": data, b"filenames": [b"x.png"] * per_batch},
        )
        xs.append(data)
        ys.append(labels)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    _dump(folder / "batches.meta", {b"label_names": names, b"num_cases_per_batch": per_batch, b"num_vis": 3072})

    def chw(d):
        return d.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)

    return chw(np.concatenate(xs[:5])), np.concatenate(ys[:5]), chw(xs[5]), np.asarray(ys[5])


def make_cifar100_targz(root, n=6):
    folder = root / "cifar-100-python"
    out = {}
    for part in ("train", "test"):
        data = RNG.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine, coarse = RNG.integers(0, 100, n).tolist(), RNG.integers(0, 20, n).tolist()
        _dump(
            folder / part,
            {
                b"filenames": [b"a.png"] * n,
                b"batch_label": b"x",
                b"fine_labels": fine,
                b"coarse_labels": coarse,
                b"data": data,
            },
        )
        out[part] = (data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.asarray(fine), np.asarray(coarse))
    _dump(
        folder / "meta",
        {
            b"fine_label_names": [f"f{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"c{i}".encode() for i in range(20)],
        },
    )
    archive = root / "cifar-100-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-100-python")
    return archive, out


def make_jpeg_tree(root):
    """ImageNet-style class folders of JPEGs (odd sizes, a grey one, an upper-case .JPEG) and a PNG."""
    files = {}
    for k, cls in enumerate(["n01440764", "n01443537", "n01484850"]):
        for i in range(3):
            h, w = int(RNG.integers(30, 60)), int(RNG.integers(30, 60))
            img = Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8))
            if i == 1:
                img = img.convert("L")
            ext = ("JPEG", "jpg", "png")[i]
            path = root / cls / f"{cls}_{i}.{ext}"
            path.parent.mkdir(parents=True, exist_ok=True)
            img.save(path, format="PNG" if ext == "png" else "JPEG", quality=90)
            files[path] = k
    (root / "n01440764" / "notes.txt").write_text("not an image")
    return files


def expected_resized(path, size: int) -> np.ndarray:
    """What PIL decodes from the source file after the same direct resize (box shrinking, bicubic enlarging)."""
    with Image.open(path) as img:
        method = Image.Resampling.BOX if min(img.size) >= size else Image.Resampling.BICUBIC
        return np.asarray(img.convert("RGB").resize((size, size), method))


def read_back(meta: dict) -> list[tuple[str, np.ndarray, int | None, str | None]]:
    urls = shards.expand_urls(meta["url"])
    return [
        (s["__key__"], np.asarray(shards.decode_image(s)), shards.read_int(s), shards.read_str(s))
        for s in shards.raw_samples(urls)
    ]


# -- every format, read back ----------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_mnist_gzip_idx(tmp_path, workers):
    sets = make_mnist(tmp_path / "MNIST" / "raw")
    meta = packer.pack("mnist", tmp_path / "MNIST", tmp_path / "out", shard_size=5, workers=workers, progress=False)
    got = read_back(meta)
    x, y = sets["train"]
    assert meta["shards"] == 5 and list(meta["shard_counts"].values()) == [5, 5, 5, 5, 3] and meta["num_samples"] == 23
    assert meta["url"] == str(tmp_path / "out" / "mnist-train-{000000..000004}.tar") and meta["classes"] == list(
        "0123456789"
    )
    assert [k for k, *_ in got] == [f"mnist-train-{i:07d}" for i in range(23)]
    assert np.array_equal(np.stack([g[1] for g in got]), x) and [g[2] for g in got] == y.tolist()
    assert {g[3] for g in got} == {"mnist-train"}
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["shard_counts"] == meta["shard_counts"]
    assert shards.shard_counts(shards.expand_urls(meta["url"]))[str(tmp_path / "out" / "mnist-train-000004.tar")] == 3


def test_a_damaged_member_header_is_an_error_not_the_end_of_the_shard(tmp_path):
    """Each member has a pax header before its own, so a bit flipped in a member's header makes tarfile raise
    (the readers count the shard as damaged) where a plain ustar header would end the shard there silently."""
    make_mnist(tmp_path / "MNIST" / "raw")
    meta = packer.pack("mnist", tmp_path / "MNIST", tmp_path / "out", shard_size=5, workers=1, progress=False)
    shard = shards.expand_urls(meta["url"])[0]
    with tarfile.open(shard) as tar:
        member = tar.getmembers()[4]  # the third sample's first file
    data = bytearray(open(shard, "rb").read())
    data[member.offset_data - 512 + 3] ^= 0x10  # in its name: the header's checksum fails
    open(shard, "wb").write(bytes(data))
    with pytest.raises(tarfile.ReadError), tarfile.open(shard) as tar:
        tar.getmembers()


def test_mnist_plain_idx_test_and_all_splits(tmp_path):
    sets = make_mnist(tmp_path / "raw", gz=False)
    test = read_back(packer.pack("mnist", tmp_path / "raw", tmp_path / "test", split="test", progress=False))
    assert (
        np.array_equal(np.stack([g[1] for g in test]), sets["t10k"][0])
        and [g[2] for g in test] == sets["t10k"][1].tolist()
    )
    assert test[0][0] == "mnist-test-0000000" and test[0][3] == "mnist-test"
    both = read_back(
        packer.pack("mnist", tmp_path / "raw", tmp_path / "all", split="all", shard_size=10, workers=2, progress=False)
    )
    assert np.array_equal(np.stack([g[1] for g in both]), np.concatenate([sets["train"][0], sets["t10k"][0]]))


def test_mnist_resized_to_32(tmp_path):
    x, _ = make_mnist(tmp_path)["train"]
    got = read_back(packer.pack("mnist", tmp_path, tmp_path / "out", size=32, limit=4, progress=False))
    assert len(got) == 4 and got[0][1].shape == (32, 32)
    assert np.array_equal(got[2][1], np.asarray(Image.fromarray(x[2]).resize((32, 32), Image.Resampling.BICUBIC)))


def test_emnist_letters_transposed_and_shifted(tmp_path):
    upright, labels = make_emnist_letters(tmp_path / "emnist")
    meta = packer.pack(
        "emnist", tmp_path / "emnist", tmp_path / "out", emnist_split="letters", shard_size=5, workers=2, progress=False
    )
    got = read_back(meta)
    assert meta["src"] == "emnist-letters-train" and meta["classes"][:2] == ["Aa", "Bb"] and meta["num_classes"] == 26
    assert np.array_equal(np.stack([g[1] for g in got]), upright), (
        "EMNIST images are stored transposed; packed ones are upright"
    )
    assert [g[2] for g in got] == (labels.astype(int) - 1).tolist()
    assert {g[3] for g in got} == {"emnist-letters-train"}


def test_emnist_mapping_file_names_classes(tmp_path):
    x = RNG.integers(0, 256, (4, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "emnist-byclass-test-images-idx3-ubyte", x.transpose(0, 2, 1), gz=False)
    write_idx(tmp_path / "emnist-byclass-test-labels-idx1-ubyte", np.array([0, 10, 36, 61], dtype=np.uint8), gz=False)
    (tmp_path / "emnist-byclass-mapping.txt").write_text(
        "".join(
            f"{i} {ord(c)}\n" for i, c in enumerate("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
        )
    )
    meta = packer.pack("emnist", tmp_path, tmp_path / "out", split="test", progress=False)
    got = read_back(meta)
    assert [meta["classes"][g[2]] for g in got] == ["0", "A", "a", "z"] and np.array_equal(got[3][1], x[3])


@pytest.mark.parametrize("workers", [1, 2])
def test_cifar10_pickle_batches(tmp_path, workers):
    x, y, xt, yt = make_cifar10(tmp_path)
    meta = packer.pack("cifar10", tmp_path, tmp_path / "out", shard_size=4, workers=workers, progress=False)
    got = read_back(meta)
    assert meta["num_samples"] == 15 and meta["classes"][0] == "airplane" and meta["size"] == 32
    assert np.array_equal(np.stack([g[1] for g in got]), x) and [g[2] for g in got] == y.tolist()
    test = read_back(
        packer.pack("cifar10", tmp_path / "cifar-10-batches-py", tmp_path / "test", split="test", progress=False)
    )
    assert np.array_equal(np.stack([g[1] for g in test]), xt) and [g[2] for g in test] == yt.tolist()


def test_cifar100_targz_fine_and_coarse(tmp_path):
    archive, sets = make_cifar100_targz(tmp_path)
    fine = packer.pack("cifar100", archive, tmp_path / "fine", progress=False)
    got = read_back(fine)
    assert (
        np.array_equal(np.stack([g[1] for g in got]), sets["train"][0])
        and [g[2] for g in got] == sets["train"][1].tolist()
    )
    assert fine["classes"][:2] == ["f0", "f1"] and fine["num_classes"] == 100
    coarse = packer.pack("cifar100", archive, tmp_path / "coarse", split="test", label_set="coarse", progress=False)
    assert [g[2] for g in read_back(coarse)] == sets["test"][2].tolist() and coarse["num_classes"] == 20


@pytest.mark.parametrize("workers", [1, 2])
def test_jpeg_class_folders(tmp_path, workers):
    files = make_jpeg_tree(tmp_path / "train")
    meta = packer.pack(
        "folder",
        tmp_path / "train",
        tmp_path / "out",
        size=16,
        shard_size=4,
        workers=workers,
        name="imagenet16-train",
        progress=False,
    )
    got = read_back(meta)
    order = sorted(files, key=lambda p: (p.parent.name, p.name))
    assert meta["classes"] == ["n01440764", "n01443537", "n01484850"] and len(got) == len(files) == 9
    assert meta["url"].endswith("imagenet16-train-{000000..000002}.tar") and {g[3] for g in got} == {"imagenet16-train"}
    assert [g[2] for g in got] == [files[p] for p in order]
    for (_, img, _, _), path in zip(got, order):
        assert img.shape == (16, 16, 3) and np.array_equal(img, expected_resized(path, 16)), path


def test_flat_tar_of_jpegs(tmp_path):
    files = make_jpeg_tree(tmp_path / "imgs")
    archive = tmp_path / "flickr.tar"
    with tarfile.open(archive, "w") as tar:
        for p in files:
            tar.add(p, arcname=f"./images/{p.name}")
        tar.add(tmp_path / "imgs" / "n01440764" / "notes.txt", arcname="./images/notes.txt")
    meta = packer.pack("flat", archive, tmp_path / "out", shard_size=4, workers=2, progress=False)
    got = read_back(meta)
    order = sorted(files, key=lambda p: p.name)
    assert meta["classes"] is None and meta["src"] == "flat-train" and len(got) == 9
    assert all(g[2] is None for g in got)
    for (_, img, _, _), path in zip(got, order):
        assert np.array_equal(img, expected_resized(path, 32))


def test_flat_folder_center_crop_jpg(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    Image.fromarray(RNG.integers(0, 256, (20, 40, 3), dtype=np.uint8)).save(tmp_path / "a" / "b" / "wide.jpg")
    Image.fromarray(RNG.integers(0, 256, (40, 20, 3), dtype=np.uint8)).save(tmp_path / "a" / "tall.png")
    meta = packer.pack(
        "flat", tmp_path / "a", tmp_path / "out", size=8, crop="center", image_format="jpg", progress=False
    )
    samples = list(shards.raw_samples(shards.expand_urls(meta["url"])))
    assert len(samples) == 2 and all("jpg" in s and "cls" not in s for s in samples)
    assert all(shards.decode_image(s).size == (8, 8) for s in samples)


def test_folder_labels_dropped_for_wild_use(tmp_path):
    make_jpeg_tree(tmp_path / "train")
    meta = packer.pack("folder", tmp_path / "train", tmp_path / "out", labels=False, progress=False)
    assert meta["classes"] is None and all(g[2] is None for g in read_back(meta))


# -- resume, crash safety ---------------------------------------------------------------------------


def test_resume_rewrites_only_the_missing_shard_identically(tmp_path):
    make_mnist(tmp_path / "raw")
    meta = packer.pack("mnist", tmp_path / "raw", tmp_path / "out", shard_size=5, workers=2, progress=False)
    paths = [tmp_path / "out" / f for f in meta["shard_counts"]]
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in paths}
    paths[2].unlink()
    paths[3].write_bytes(paths[3].read_bytes()[:700])  # a damaged shard (e.g. copied half-way) is rewritten too
    (tmp_path / "out" / "meta.json").unlink()
    again = packer.pack("mnist", tmp_path / "raw", tmp_path / "out", shard_size=5, workers=2, progress=False)
    assert again == meta
    for p in paths:
        if p not in (paths[2], paths[3]):
            assert p.stat().st_mtime_ns == before[p][0], f"{p.name} was rewritten"
        assert p.read_bytes() == before[p][1], f"{p.name} differs after resuming"


def test_crash_leaves_no_partial_shard(tmp_path, monkeypatch):
    make_mnist(tmp_path / "raw")
    real_write, calls = packer.wds.TarWriter.write, {"n": 0}

    def failing_write(self, sample):
        calls["n"] += 1
        if calls["n"] > 12:  # shards 0 and 1 complete, shard 2 dies after 2 samples
            raise RuntimeError("simulated crash")
        return real_write(self, sample)

    monkeypatch.setattr(packer.wds.TarWriter, "write", failing_write)
    with pytest.raises(RuntimeError, match="simulated crash"):
        packer.pack("mnist", tmp_path / "raw", tmp_path / "out", shard_size=5, workers=1, progress=False)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("*.tar")) == ["mnist-train-000000.tar", "mnist-train-000001.tar"]
    assert all(packer.shard_samples(p) == 5 for p in out.glob("*.tar"))
    assert not (out / "meta.json").exists() and not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
    monkeypatch.setattr(packer.wds.TarWriter, "write", real_write)
    meta = packer.pack("mnist", tmp_path / "raw", tmp_path / "out", shard_size=5, workers=1, progress=False)
    assert len(read_back(meta)) == 23


def test_other_options_into_same_out_refused_unless_overwrite(tmp_path):
    make_mnist(tmp_path / "raw")
    packer.pack("mnist", tmp_path / "raw", tmp_path / "out", shard_size=5, progress=False)
    with pytest.raises(VitkdInputError, match="shard_size"):
        packer.pack("mnist", tmp_path / "raw", tmp_path / "out", shard_size=4, progress=False)
    meta = packer.pack("mnist", tmp_path / "raw", tmp_path / "out", shard_size=4, overwrite=True, progress=False)
    assert (
        sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == sorted(meta["shard_counts"]) and meta["shards"] == 6
    )
    (tmp_path / "selected").mkdir()
    (tmp_path / "selected" / "meta.json").write_text('{"num_samples": 3}')  # another writer's folder
    with pytest.raises(VitkdInputError, match="holds shards of another pack"):
        packer.pack("mnist", tmp_path / "raw", tmp_path / "selected", progress=False)


# -- command line and bad input ---------------------------------------------------------------------


def test_cli_prints_url_and_errors_in_one_line(tmp_path):
    make_mnist(tmp_path / "raw")
    argv = [
        sys.executable,
        "-m",
        "vitkd.pack",
        "mnist",
        str(tmp_path / "raw"),
        str(tmp_path / "out"),
        "--shard-size",
        "10",
        "--workers",
        "2",
    ]
    ok = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert ok.stdout.strip() == str(tmp_path / "out" / "mnist-train-{000000..000002}.tar")
    raw = tmp_path / "raw"
    (raw / "t10k-images-idx3-ubyte.gz").write_bytes(
        (raw / "t10k-labels-idx1-ubyte.gz").read_bytes()
    )  # labels under the images name
    bad = subprocess.run(
        [sys.executable, "-m", "vitkd.pack", "mnist", str(tmp_path / "raw"), str(tmp_path / "o2"), "--split", "test"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [ln for ln in bad.stderr.splitlines() if ln.startswith("vitkd: error:")]
    assert bad.returncode == 2 and len(lines) == 1, bad.stderr[-2000:]
    assert "t10k-images-idx3-ubyte.gz is not an IDX images (0x00000803) file (magic 0x00000801)" in lines[0]


def _error(capsys, *argv) -> str:
    assert packer.main(list(argv)) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("pack ")]  # all but the progress bar
    assert len(lines) == 1 and lines[0].startswith("vitkd: error: "), err
    return lines[0]


def test_bad_inputs(tmp_path, capsys):
    make_cifar10(tmp_path / "c")
    (tmp_path / "c" / "cifar-10-batches-py" / "data_batch_3").unlink()
    assert "cifar-10-batches-py/data_batch_3 is missing" in _error(
        capsys, "cifar10", str(tmp_path / "c"), str(tmp_path / "o")
    )
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    assert "holds no .jpg/.jpeg/.png files" in _error(capsys, "folder", str(tmp_path / "empty"), str(tmp_path / "o"))
    assert "has no class sub-folders" in _error(capsys, "folder", str(tmp_path / "empty" / "cls"), str(tmp_path / "o"))
    assert "train-images-idx3-ubyte(.gz) not found" in _error(
        capsys, "mnist", str(tmp_path / "empty"), str(tmp_path / "o")
    )
    make_mnist(tmp_path / "m")
    (tmp_path / "file").write_text("x")
    assert "cannot create OUT" in _error(capsys, "mnist", str(tmp_path / "m"), str(tmp_path / "file" / "out"))
    assert "is a file" in _error(capsys, "mnist", str(tmp_path / "m"), str(tmp_path / "file"))
    with gzip.open(tmp_path / "m" / "train-images-idx3-ubyte.gz", "rb") as f:
        raw = f.read()
    with gzip.open(tmp_path / "m" / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(raw[:-100])
    assert "is truncated" in _error(capsys, "mnist", str(tmp_path / "m"), str(tmp_path / "o"))
    (tmp_path / "broken" / "a").mkdir(parents=True)
    (tmp_path / "broken" / "a" / "x.jpg").write_bytes(b"not a jpeg")
    Image.new("RGB", (4, 4)).save(tmp_path / "broken" / "a" / "w.jpg")
    line = _error(capsys, "flat", str(tmp_path / "broken"), str(tmp_path / "o3"), "--shard-size", "1", "--workers", "2")
    assert "cannot decode image a/x.jpg" in line and "not an image PIL can read" in line
    assert not list((tmp_path / "o3").glob("*-000001.tar")) and not (tmp_path / "o3" / "meta.json").exists()
    gz = tmp_path / "imgs.tar.gz"
    with tarfile.open(gz, "w:gz") as tar:
        tar.add(tmp_path / "broken" / "a" / "x.jpg", arcname="x.jpg")
    assert "decompress it first" in _error(capsys, "flat", str(gz), str(tmp_path / "o4"))
    assert "CIFAR batch cifar-100-python/train is missing" in _error(capsys, "cifar100", str(gz), str(tmp_path / "o5"))
    assert "is not an uncompressed tar" in _error(capsys, "flat", str(tmp_path / "file"), str(tmp_path / "o6"))
    (tmp_path / "rand.tar.gz").write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    line = _error(
        capsys, "cifar10", str(tmp_path / "rand.tar.gz"), str(tmp_path / "o7")
    )  # tarfile lists one failure per line
    assert "cannot read" in line and "rand.tar.gz as a tar archive (file could not be opened successfully)" in line


def test_bad_arguments_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        packer.main(["imagenet", "src", "out"])
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        exit_.value.code == 2
        and len(err) == 1
        and err[0].startswith("vitkd: error: argument FORMAT: invalid choice: 'imagenet'")
    )
