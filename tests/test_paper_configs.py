"""The paper settings ship as configs: each parses, and the MNIST + EMNIST chain runs end to end on tiny
files written in the real IDX format (pack → teacher → selection → student), with tiny models on CPU."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import fit

from vitkd.pack import pack

PAPER = sorted(Path("experiments/paper").glob("*/*.yaml"))


def _write_idx(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """IDX as distributed by MNIST/EMNIST: big-endian magic 0x803 / 0x801, dims, then uint8 data, gzipped."""
    with gzip.open(f"{path}-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">IIII", 0x803, *images.shape) + images.astype(np.uint8).tobytes())
    with gzip.open(f"{path}-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">II", 0x801, len(labels)) + labels.astype(np.uint8).tobytes())


def test_every_paper_config_parses():
    assert len(PAPER) == 12
    for cfg in PAPER:
        with pytest.raises(SystemExit) as exit_:
            fit("--config", str(cfg), "--print_config")
        assert exit_.value.code in (0, None), cfg


def _digits_like(rng, n: int) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, 10, n)
    images = np.zeros((n, 28, 28), np.uint8)
    for i, y in enumerate(labels):  # a class-dependent bar, so there is something to learn
        images[i, 4 + 2 * y : 7 + 2 * y, 6:22] = 255
    return images, labels


@pytest.mark.slow
def test_mnist_emnist_chain_on_packed_idx(tmp_path):
    rng = np.random.default_rng(0)
    raw = tmp_path / "raw"
    raw.mkdir()
    _write_idx(raw / "train", *_digits_like(rng, 200))
    _write_idx(raw / "t10k", *_digits_like(rng, 60))
    emnist = rng.integers(0, 256, (90, 28, 28)).astype(np.uint8)
    _write_idx(raw / "emnist-byclass-train", emnist, rng.integers(0, 62, 90))
    _write_idx(raw / "emnist-byclass-test", emnist[:30], rng.integers(0, 62, 30))
    packed = tmp_path / "packed"
    train = pack("mnist", raw, packed / "mnist-train", split="train", shard_size=64, workers=1, progress=False)["url"]
    test = pack("mnist", raw, packed / "mnist-test", split="test", shard_size=64, workers=1, progress=False)["url"]
    wild = pack("emnist", raw, packed / "emnist", split="all", shard_size=40, workers=1, progress=False)["url"]

    tiny = [
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "1",
        "--trainer.precision",
        "32-true",
        "--data.init_args.num_workers",
        "0",
        "--data.init_args.batch_size",
        "32",
    ]
    run = tmp_path / "runs"
    fit(
        "--config",
        "experiments/paper/mnist/teacher.yaml",
        *tiny,
        "--model.init_args.arch",
        "test_vit_patch4_16",
        "--trainer.max_epochs",
        "2",
        "--data.init_args.train_urls",
        train,
        "--data.init_args.test_urls",
        test,
        "--data.init_args.val_fraction",
        "0.2",
        "--model.init_args.measure_batch_size",
        "0",
        "--run_dir",
        str(run / "teacher"),
    )
    teacher = run / "teacher" / "checkpoints" / "best.ckpt"
    sel = fit(
        "--config",
        "experiments/paper/mnist/select.yaml",
        *tiny,
        "--model.init_args.teacher_ckpt",
        str(teacher),
        "--model.init_args.probe_blocks",
        "[0, 1]",
        "--model.init_args.num_keep",
        "80",
        "--data.init_args.wild_urls",
        wild,
        "--run_dir",
        str(run / "select"),
    )
    assert sel["num_scored"] == 120 and sel["num_kept"] == 80 and "precision" not in sel
    student = fit(
        "--config",
        "experiments/paper/mnist/student.yaml",
        *tiny,
        "--model.init_args.arch",
        "test_vit_patch4_16",
        "--model.init_args.teacher_ckpt",
        str(teacher),
        "--model.init_args.probe_pairs",
        "[[0, 0], [1, 1]]",
        "--model.init_args.measure_batch_size",
        "0",
        "--trainer.max_epochs",
        "1",
        "--data.init_args.train_urls",
        sel["selected_urls"],
        "--data.init_args.test_urls",
        test,
        "--data.init_args.val_fraction",
        "0.2",
        "--run_dir",
        str(run / "student"),
    )
    assert 0.0 <= student["test/acc"] <= 1.0 and student["train_batches_per_rank"] == [-(-int(80 * 0.8) // 32)]
