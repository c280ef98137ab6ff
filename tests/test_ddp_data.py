"""Data under DDP and at scale: exact-once evaluation, equal training lengths per rank, resumable and
rank-count-independent selection, damaged data counted. Multi-process runs use torchrun on loopback (gloo, CPU)."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import fit

from data_modules import shards
from data_modules.stream import ShardStream
from vitkd.errors import VitkdInputError


def _pool(out: Path, sizes: list[int], classes: int = 10) -> str:
    """Uneven shards of random 8×8 images: key ``k<i>``, png, src, and the cls label ``i % classes``."""
    import webdataset as wds

    rng = np.random.default_rng(1)
    out.mkdir(parents=True, exist_ok=True)
    i = 0
    for s, n in enumerate(sizes):
        with wds.TarWriter(str(out / f"wild-{s:06d}.tar")) as w:
            for _ in range(n):
                img = (rng.random((8, 8)) * 255).astype(np.uint8)
                sample = {
                    "__key__": f"k{i:05d}",
                    "png": shards.encode_png(img),
                    "src": "digit" if i % 3 == 0 else "noise",
                }
                sample["cls"] = str(i % classes)
                w.write(sample)
                i += 1
    return str(out / f"wild-{{000000..{len(sizes) - 1:06d}}}.tar")


def _held_out(key: str, fraction: float) -> bool:
    return int(hashlib.md5(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


@pytest.mark.parametrize("sizes", [[30, 5, 50, 17, 41], [60]])  # more shards than ranks, and fewer
def test_eval_stream_every_sample_once_over_ranks(tmp_path, sizes):
    n = sum(sizes)
    urls = shards.expand_urls(_pool(tmp_path, sizes, classes=n))  # cls = the sample's index: it names the sample
    seen = []
    for rank in range(2):
        ds = ShardStream(urls, 1, 8, part="val", val_fraction=0.3, rank=rank, world_size=2)
        seen.append([int(y) for _, y in ds])
    expected = {i for i in range(n) if _held_out(f"k{i:05d}", 0.3)}
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(expected)
    assert all(seen)  # both ranks evaluate something


def test_train_stream_same_length_on_every_rank_and_reshuffled(tmp_path):
    urls = shards.expand_urls(_pool(tmp_path, [30, 5, 50, 17, 41]))
    per_rank = 143 // 2
    epochs = {}
    for rank in range(2):
        ds = ShardStream(urls, 1, 8, rank=rank, world_size=2, shuffle_seed=7, epoch_samples=per_rank)
        assert len(ds) == per_rank
        epochs[rank] = [[int(y) for _, y in ds] for _ in range(3)]
        assert [len(e) for e in epochs[rank]] == [per_rank] * 3
    # the seeded shard permutation deals different shards to a rank from one epoch to the next
    assert Counter(epochs[0][0]) != Counter(epochs[0][1]) or Counter(epochs[0][1]) != Counter(epochs[0][2])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_2_nodes(args: list[str], timeout: int = 300) -> None:
    """Two torchrun 'nodes' of one process each on loopback, as a 2-node cluster job would run."""
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--nproc_per_node",
                "1",
                "--node_rank",
                str(r),
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                str(port),
                "-m",
                "vitkd.fit",
                *args,
                "--trainer.num_nodes",
                "2",
                "--trainer.devices",
                "1",
                "--trainer.strategy",
                "ddp",
                "--trainer.accelerator",
                "cpu",
                "--trainer.enable_progress_bar",
                "false",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]


def _select_args(teacher, urls, run_dir, keep=60) -> list[str]:
    return [
        "--config",
        "experiments/digits/select.yaml",
        "--model.init_args.teacher_ckpt",
        str(teacher),
        "--model.init_args.probe_blocks",
        "[0, 1]",
        "--model.init_args.num_keep",
        str(keep),
        "--data.init_args.wild_urls",
        urls,
        "--data.init_args.eval_batch_size",
        "16",
        "--run_dir",
        str(run_dir),
    ]


@pytest.mark.slow
def test_two_node_selection_equals_one_process(tiny_teacher, tmp_path):
    urls = _pool(tmp_path / "pool", [40, 7, 33, 40, 25])
    one = fit(*_select_args(tiny_teacher, urls, tmp_path / "one"))
    _torchrun_2_nodes(_select_args(tiny_teacher, urls, tmp_path / "two"))
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    rows1 = list(csv.DictReader(open(tmp_path / "one" / "scores.csv")))
    rows2 = list(csv.DictReader(open(tmp_path / "two" / "scores.csv")))
    assert [r["key"] for r in rows1] == [r["key"] for r in rows2] and len(rows1) == 145
    assert [r["selected"] for r in rows1] == [r["selected"] for r in rows2]
    assert np.allclose([float(r["value"]) for r in rows1], [float(r["value"]) for r in rows2], atol=1e-6)
    assert two["world_size"] == 2 and two["num_kept"] == one["num_kept"] == 60 and two["precision"] == one["precision"]

    def kept(d):
        return sorted(s["__key__"] for s in shards.raw_samples(shards.expand_urls(d)))

    assert kept(two["selected_urls"]) == kept(one["selected_urls"])


@pytest.mark.slow
def test_two_node_student_fit_equal_batches_and_exact_validation(tiny_teacher, tmp_path):
    urls = _pool(tmp_path / "pool", [40, 7, 33, 40, 25])
    _torchrun_2_nodes(
        [
            "--config",
            "experiments/digits/attention_probe.yaml",
            "--model.init_args.arch",
            "test_vit_patch4_16",
            "--model.init_args.teacher_ckpt",
            str(tiny_teacher),
            "--model.init_args.probe_pairs",
            "[[0, 0], [1, 1]]",
            "--model.init_args.measure_batch_size",
            "0",
            "--data.init_args.train_urls",
            urls,
            "--data.init_args.val_fraction",
            "0.2",
            "--data.init_args.batch_size",
            "16",
            "--trainer.max_epochs",
            "2",
            "--run_dir",
            str(tmp_path / "student"),
        ]
    )
    m = json.loads((tmp_path / "student" / "metrics.json").read_text())
    held_out = sum(_held_out(f"k{i:05d}", 0.2) for i in range(145))
    per_rank = int(145 * 0.8) // 2
    assert m["train_batches_per_rank"] == [-(-per_rank // 16)] * 2  # same count on both ranks, no hang
    assert m["val_samples_per_epoch"] == held_out  # each held-out sample validated exactly once
    assert 0.0 <= m["test/acc"] <= 1.0


def test_selection_resumes_without_rescoring(tiny_teacher, tmp_path):
    urls = _pool(tmp_path / "pool", [20, 20, 20, 20])
    first = fit(*_select_args(tiny_teacher, urls, tmp_path / "run", keep=10))
    assert first["shards_scored_this_run"] == 4
    parts = sorted((tmp_path / "run" / "score_parts").glob("part-*.npz"))
    before = {p.name: p.stat().st_mtime_ns for p in parts}
    scores = (tmp_path / "run" / "scores.csv").read_text()
    run = tmp_path / "run"
    # a finished selection is not replaced by a rerun, whatever it asks for
    config = (run / "config.yaml").read_text()
    with pytest.raises(VitkdInputError, match="already holds a run \\(metrics.json\\).*--overwrite true") as refused:
        fit(*_select_args(tiny_teacher, urls, run, keep=5))
    assert "--ckpt_path" not in str(refused.value), "a selection has no checkpoint to resume from"
    assert (run / "scores.csv").read_text() == scores and (run / "config.yaml").read_text() == config
    parts[2].unlink()  # as if the run had been killed while scoring the third shard (before metrics.json)
    (run / "metrics.json").unlink()
    again = fit(*_select_args(tiny_teacher, urls, run, keep=10))
    assert again["shards_scored_this_run"] == 1
    assert {p.name: p.stat().st_mtime_ns for p in parts if p.name != parts[2].name} == {
        k: v for k, v in before.items() if k != parts[2].name
    }
    assert (run / "scores.csv").read_text() == scores
    # a different teacher setting must not silently mix with the saved scores, and the refused run writes nothing
    (run / "metrics.json").unlink()
    config = (run / "config.yaml").read_text()
    with pytest.raises(VitkdInputError, match="holds scores computed differently \\(lambda_n changed\\)"):
        fit(*_select_args(tiny_teacher, urls, run, keep=10), "--model.init_args.lambda_n", "0.5")
    assert (run / "config.yaml").read_text() == config
    # --overwrite rescores everything with the new setting
    fresh = fit(
        *_select_args(tiny_teacher, urls, run, keep=10), "--model.init_args.lambda_n", "0.5", "--overwrite", "true"
    )
    assert fresh["shards_scored_this_run"] == 4 and "lambda_n: 0.5" in (run / "config.yaml").read_text()
    # ... and keeps scores computed the same way: another num_keep only re-selects
    fewer = fit(
        *_select_args(tiny_teacher, urls, run, keep=5), "--model.init_args.lambda_n", "0.5", "--overwrite", "true"
    )
    assert fewer["shards_scored_this_run"] == 0 and fewer["num_kept"] == 5


def _damaged_pool(out: Path) -> str:
    urls = shards.expand_urls(_pool(out, [20, 20, 20]))
    data = Path(urls[1]).read_bytes()
    Path(urls[1]).write_bytes(data[: len(data) // 2])  # truncated mid-shard
    # a sample whose png bytes do not decode
    import webdataset as wds

    samples = list(wds.WebDataset(urls[2], shardshuffle=False))
    with wds.TarWriter(urls[2]) as w:
        for s in samples:
            out_s = {k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"}
            if s["__key__"] == "k00045":
                out_s["png"] = out_s["png"][:40]
            w.write(out_s)
    return "{" + ",".join(urls) + "}"


def test_damaged_shard_and_corrupt_image_are_counted_or_raise(tiny_teacher, tmp_path):
    urls = _damaged_pool(tmp_path / "pool")
    m = fit(*_select_args(tiny_teacher, urls, tmp_path / "run", keep=5))
    assert m["damaged_shards"] == 1 and m["corrupt_images"] == 1
    assert (
        20 + 19 < m["num_scored"] < 60 - 1
    )  # the intact shard, the readable half of the truncated one, all but one of the third
    with pytest.raises(VitkdInputError, match="damaged shard|undecodable image"):
        fit(*_select_args(tiny_teacher, urls, tmp_path / "strict", keep=5), "--data.init_args.strict", "true")


@pytest.mark.parametrize("part", ["train", "val"])
def test_memory_cache_yields_the_same_epochs_without_reading_the_shards_again(tmp_path, part):
    root = tmp_path / "pool"
    urls = shards.expand_urls(_pool(root, [30, 5, 50, 17, 41], classes=143))  # cls names the sample
    # 120 > the ~100 training samples: the first epoch reads (and caches) every shard
    kw = dict(part=part, val_fraction=0.3, shuffle_seed=7, epoch_samples=120 if part == "train" else None)

    def epochs(ds, n):
        return [[int(y) for _, y in ds] for _ in range(n)]

    plain = epochs(ShardStream(urls, 1, 8, **kw), 3)
    cached = ShardStream(urls, 1, 8, memory_cache=True, **kw)
    first = epochs(cached, 1)
    for tar in root.glob("*.tar"):  # later epochs must come from memory alone
        tar.unlink()
    assert first + epochs(cached, 2) == plain  # same samples, same per-epoch shuffles
    assert not any(cached.skips.counts().values())  # no shard was found missing (it would be skipped and counted)
    assert plain[0] != plain[1] or part == "val"  # training epochs are still reshuffled
