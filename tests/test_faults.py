"""Fault injection: damaged wild data, kills and signals in the middle of a run, a full disk, two runs in
one run directory. Each fault is tried, survived or not, and whether data was lost, is recorded in a
table printed at the end of the session and written to ``runs/faults/summary.json``.

``make test`` runs one try of each fault; ``make faults`` also runs the ``soak`` tests: kills at five or
more random points of each stage.
"""
from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import fit
from vitkd.errors import VitkdInputError

ROOT = Path(__file__).resolve().parent.parent
TINY = ("--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false")


# -- the summary table -------------------------------------------------------------------------
def record(fault_log: dict, fault: str, survived: bool, data_lost: bool = False) -> None:
    row = fault_log.setdefault(fault, {"fault": fault, "tries": 0, "survived": 0, "data lost": 0})
    row["tries"] += 1
    row["survived"] += int(survived)
    row["data lost"] += int(data_lost)


# -- damaged wild data -------------------------------------------------------------------------
def copy_pool(pool: str, dest: Path) -> tuple[Path, list[Path]]:
    """The tiny pool's shards and meta.json copied into ``dest``; returns the folder and the shard paths."""
    src = Path(pool).parent
    dest.mkdir(parents=True)
    for f in src.iterdir():
        shutil.copy(f, dest / f.name)
    return dest, sorted(dest.glob("wild-*.tar"))


def member_data_offset(shard: Path, name: str) -> int:
    with tarfile.open(shard) as tar:
        return tar.getmember(name).offset_data


def flip(path: Path, offset: int, mask: int = 0x01) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


def select(teacher, urls: str, num_keep: int, run_dir: Path, *extra: str) -> dict:
    return fit(
        "--config", "experiments/digits/select.yaml",
        "--model.init_args.teacher_ckpt", str(teacher),
        "--model.init_args.probe_blocks", "[0, 1]",
        "--model.init_args.num_keep", str(num_keep),
        "--data.init_args.wild_urls", urls,
        "--run_dir", str(run_dir),
        *extra,
    )


def pool_url(folder: Path) -> str:
    return str(folder / "wild-{000000..000002}.tar")


def test_truncated_shard_is_counted_and_the_rest_selected(tiny_teacher, tiny_pool, tmp_path, capfd, fault_log):
    folder, tars = copy_pool(tiny_pool, tmp_path / "pool")
    size = tars[1].stat().st_size
    with open(tars[1], "r+b") as f:
        f.truncate(size // 2)
    m = select(tiny_teacher, pool_url(folder), 30, tmp_path / "sel")
    err = capfd.readouterr().err
    rows = list(csv.DictReader(open(tmp_path / "sel" / "scores.csv")))
    keys = {r["key"] for r in rows}
    # shards 0 and 2 whole (s0000-s0039, s0080-s0119), shard 1 up to the cut
    assert {f"s{i:04d}" for i in [*range(40), *range(80, 120)]} <= keys
    read_of_1 = sorted(k for k in keys if "s0040" <= k < "s0080")
    assert 0 < len(read_of_1) < 40 and read_of_1 == [f"s{i:04d}" for i in range(40, 40 + len(read_of_1))]
    assert m["num_scored"] == len(rows) == 80 + len(read_of_1) and m["num_kept"] == 30
    assert m["damaged_shards"] == 1 and m["skipped_samples"] == 40 - len(read_of_1)
    assert list(m["skipped_by_shard"]) == [str(tars[1])] and m["skipped_by_shard"][str(tars[1])]["damaged"]
    warnings = [ln for ln in err.splitlines() if ln.startswith("vitkd: warning:")]
    assert len(warnings) == 1 and str(tars[1]) in warnings[0] and "ReadError" in warnings[0], err[-2000:]
    # a rerun after a crash: the damaged shard's part is reused, neither rescored nor lost
    (tmp_path / "sel" / "metrics.json").unlink()
    (tmp_path / "sel" / "score_parts" / "part-000002.npz").unlink()
    again = select(tiny_teacher, pool_url(folder), 30, tmp_path / "sel")
    assert again["shards_scored_this_run"] == 1 and again["num_scored"] == m["num_scored"] and again["skipped_samples"] == m["skipped_samples"]
    assert again["damaged_shards"] == 1
    # strict: the same pool raises, naming the damage
    with pytest.raises(VitkdInputError, match="damaged shard"):
        select(tiny_teacher, pool_url(folder), 30, tmp_path / "strict", "--data.init_args.strict", "true")
    record(fault_log, "truncated shard", True)


def test_bit_flipped_and_zero_byte_shards_and_images(tiny_teacher, tiny_pool, tmp_path, fault_log):
    folder, tars = copy_pool(tiny_pool, tmp_path / "pool")
    # shard 0: a bit flipped in the tar header of s0005.png (its checksum fails: tarfile stops there)
    flip(tars[0], member_data_offset(tars[0], "s0005.png") - 512 + 3)
    # shard 1: zero bytes
    tars[1].write_bytes(b"")
    # shard 2: a bit flipped inside the PNG data of s0090 (its CRC fails), and s0100's PNG emptied
    flip(tars[2], member_data_offset(tars[2], "s0090.png") + 40)
    from data_modules.shards import write_shards

    samples = [{"__key__": s["__key__"], **{k: v for k, v in s.items() if not k.startswith("__")}} for s in _read(tars[2])]
    for s in samples:
        if s["__key__"] == "s0100":
            s["png"] = b""
    write_shards(samples, tmp_path / "rewrite", pattern="wild-%06d.tar", maxcount=100)
    shutil.copy(tmp_path / "rewrite" / "wild-000000.tar", tars[2])
    m = select(tiny_teacher, pool_url(folder), 30, tmp_path / "sel")
    keys = {r["key"] for r in csv.DictReader(open(tmp_path / "sel" / "scores.csv"))}
    expected = {f"s{i:04d}" for i in [*range(40), *range(80, 120)]} - {"s0005", "s0090", "s0100"}
    assert keys == expected, sorted(expected ^ keys)
    assert m["damaged_shards"] == 2 and m["corrupt_images"] == 3 and m["skipped_samples"] == 43
    assert m["skipped_by_shard"][str(tars[1])]["scored"] == 0
    record(fault_log, "bit-flipped shard", True)
    record(fault_log, "zero-byte shard", True)
    record(fault_log, "bit-flipped/zero-byte image", True)


def _read(shard: Path) -> list[dict]:
    from data_modules.shards import SkipCounter, raw_samples

    return list(raw_samples([str(shard)], skips=SkipCounter(), split_by_worker=False))


def test_num_keep_beyond_the_pool_is_refused_before_scoring(tiny_teacher, tiny_pool, tmp_path):
    with pytest.raises(VitkdInputError, match=r"num_keep 121 is larger than the wild pool \(120 samples in 3 shards, counted from their meta.json"):
        select(tiny_teacher, tiny_pool, 121, tmp_path)
    assert not (tmp_path / "score_parts").exists() and not (tmp_path / "config.yaml").exists()
    folder, tars = copy_pool(tiny_pool, tmp_path / "nometa")
    (folder / "meta.json").unlink()  # counted from the tar headers instead
    with pytest.raises(VitkdInputError, match=r"num_keep 121 is larger than the wild pool \(120 samples"):
        select(tiny_teacher, pool_url(folder), 121, tmp_path / "b")
    assert not (tmp_path / "b" / "score_parts").exists()
