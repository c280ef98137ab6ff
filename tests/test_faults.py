"""Fault injection: damaged wild data, kills and signals in the middle of a run, a full disk, two runs in
one run directory. Each fault is tried, survived or not, and whether data was lost, is recorded in a
table printed at the end of the session and written to ``runs/faults/summary.json``.

``make test`` runs one try of each fault but the signals; ``make faults`` also runs the ``soak`` tests:
kills at five or more random points of each stage, two runs started together, SIGTERM and SIGUSR1.
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
        "--config",
        "experiments/digits/select.yaml",
        "--model.init_args.teacher_ckpt",
        str(teacher),
        "--model.init_args.probe_blocks",
        "[0, 1]",
        "--model.init_args.num_keep",
        str(num_keep),
        "--data.init_args.wild_urls",
        urls,
        "--run_dir",
        str(run_dir),
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
    assert (
        again["shards_scored_this_run"] == 1
        and again["num_scored"] == m["num_scored"]
        and again["skipped_samples"] == m["skipped_samples"]
    )
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

    samples = [
        {"__key__": s["__key__"], **{k: v for k, v in s.items() if not k.startswith("__")}} for s in _read(tars[2])
    ]
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
    with pytest.raises(
        VitkdInputError,
        match=r"num_keep 121 is larger than the wild pool \(120 samples in 3 shards, counted from their meta.json",
    ):
        select(tiny_teacher, tiny_pool, 121, tmp_path)
    assert not (tmp_path / "score_parts").exists() and not (tmp_path / "config.yaml").exists()
    folder, tars = copy_pool(tiny_pool, tmp_path / "nometa")
    (folder / "meta.json").unlink()  # counted from the tar headers instead
    with pytest.raises(VitkdInputError, match=r"num_keep 121 is larger than the wild pool \(120 samples"):
        select(tiny_teacher, pool_url(folder), 121, tmp_path / "b")
    assert not (tmp_path / "b" / "score_parts").exists()


# -- kills and resumes -------------------------------------------------------------------------
QUIET = {**os.environ, "PYTHONWARNINGS": "ignore", "WANDB_MODE": "disabled"}


def teacher_args(epochs: int = 4) -> list[str]:
    return [
        "--config",
        "experiments/digits/teacher.yaml",
        "--model.init_args.arch",
        "test_vit_patch4_16",
        "--model.init_args.measure_batch_size",
        "0",
        "--model.init_args.warmup_epochs",
        "0",
        "--model.init_args.lr",
        "5e-3",
        "--trainer.max_epochs",
        str(epochs),
        "--trainer.limit_train_batches",
        "8",
        "--trainer.log_every_n_steps",
        "1",
    ]


def student_args(teacher, selected: str, epochs: int = 4) -> list[str]:
    return [
        "--config",
        "experiments/digits/attention_probe.yaml",
        "--model.init_args.arch",
        "test_vit_patch4_16",
        "--model.init_args.teacher_ckpt",
        str(teacher),
        "--model.init_args.probe_pairs",
        "[[0, 0], [1, 1]]",
        "--model.init_args.measure_batch_size",
        "0",
        "--data.init_args.train_urls",
        selected,
        "--data.init_args.val_fraction",
        "0.2",
        "--data.init_args.batch_size",
        "16",
        "--trainer.max_epochs",
        str(epochs),
        "--trainer.log_every_n_steps",
        "1",
    ]


def generator_args(teacher, epochs: int = 4) -> list[str]:
    # one intra-op thread as the digits configs: the in-process runs would otherwise inherit theirs, the killed one not
    return [
        "--config",
        "experiments/generator/transformer_gan.yaml",
        "--torch_threads",
        "1",
        "--model.init_args.teacher_ckpt",
        str(teacher),
        "--model.init_args.generator_kwargs",
        "{patch_size: 4, embed_dim: 16, depth: 1, num_heads: 2}",
        "--model.init_args.arch",
        "test_vit_patch4_16",
        "--model.init_args.batch_size",
        "8",
        "--model.init_args.steps_per_epoch",
        "40",
        "--model.init_args.student_steps",
        "1",
        "--model.init_args.val_samples",
        "16",
        "--model.init_args.grid_samples",
        "4",
        "--model.init_args.probe_blocks",
        "[0, 1]",
        "--model.init_args.patch_pairs",
        "[[0, 0], [1, 1]]",
        "--trainer.max_epochs",
        str(epochs),
        "--trainer.log_every_n_steps",
        "1",
    ]


def start(args: list[str], run_dir: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "vitkd.fit", *TINY, *args, "--run_dir", str(run_dir)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env or QUIET,
    )


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> bool:
    end = time.time() + timeout
    while time.time() < end and proc.poll() is None:
        if path.exists():
            return True
        time.sleep(0.01)
    return path.exists() and proc.poll() is None


def kill_at(
    args: list[str], run_dir: Path, delay: float, sig: int = signal.SIGKILL, env: dict | None = None
) -> tuple[bool, subprocess.Popen, str]:
    """Start a run, send ``sig`` ``delay`` s after its first checkpoint; (False when it ended before, the
    process, its stderr)."""
    proc = start(args, run_dir, env)
    ok = wait_for(run_dir / "checkpoints" / "last.ckpt", proc)
    time.sleep(delay)
    ok = ok and proc.poll() is None
    if ok:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return ok, proc, err


def figures(m: dict, run_dir: Path, key: str) -> dict:
    """metrics.json's figures, the best epoch, and the validation curve (every epoch's figure, to the last digit)."""
    import torch

    out = {k: v for k, v in m.items() if k.startswith(("test/", "best_val/")) or k == "epochs"}
    out["best_epoch"] = torch.load(run_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)[
        "epoch"
    ]
    out["curve"] = {r["epoch"]: r[key] for r in csv.DictReader(open(run_dir / "metrics.csv")) if r.get(key)}
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    out["last_weights"] = [float(v.double().sum()) for v in state.values() if v.is_floating_point()]
    return out


def epochs_logged_once(run_dir: Path, key: str) -> bool:
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    val = [int(r["epoch"]) for r in rows if r.get(key)]
    steps = [int(r["step"]) for r in rows if r.get("train/loss")]
    return val == sorted(set(val)) and steps == sorted(set(steps))


DIFFS: list[str] = []  # the figures a resumed run got otherwise, for the failure message


def kill_and_resume(
    args: list[str], reference: dict, ref_dir: Path, run_dir: Path, delay: float, key: str
) -> tuple[bool, bool] | None:
    """SIGKILL a run ``delay`` s after its first checkpoint, resume it from last.ckpt; (same figures, each epoch
    logged once), or None when the run ended before the kill."""
    killed, _, _ = kill_at(args, run_dir, delay)
    if not killed:
        shutil.rmtree(run_dir)
        return None
    import torch

    last = run_dir / "checkpoints" / "last.ckpt"
    if torch.load(last, map_location="cpu", weights_only=False)["epoch"] + 1 >= int(
        args[args.index("--trainer.max_epochs") + 1]
    ):
        shutil.rmtree(run_dir)  # killed after its last epoch: a resume would train nothing again
        return None
    m = fit(*args, "--ckpt_path", str(last), "--run_dir", str(run_dir))
    got, want = figures(m, run_dir, key), figures(reference, ref_dir, key)
    DIFFS.extend(f"{run_dir.name} {k}: {got.get(k)} != {v}" for k, v in want.items() if got.get(k) != v)
    return got == want, epochs_logged_once(run_dir, key)


@pytest.fixture(scope="module")
def teacher_reference(tmp_path_factory) -> tuple[dict, Path]:
    """The uninterrupted teacher run every teacher kill and signal is compared with."""
    run = tmp_path_factory.mktemp("reference") / "teacher"
    return fit(*teacher_args(), "--run_dir", str(run)), run


@pytest.fixture(scope="module")
def tiny_selection(tiny_teacher, tiny_pool, tmp_path_factory) -> str:
    run = tmp_path_factory.mktemp("selection")
    return select(tiny_teacher, tiny_pool, 100, run)["selected_urls"]


def _stage_args(stage: str, teacher, selection) -> tuple[list[str], str]:
    if stage == "teacher":
        return teacher_args(), "val/acc"
    if stage == "student":
        return student_args(teacher, selection), "val/acc"
    return generator_args(teacher), "val/agree"


def _kill_resume_tries(stage, tries, tiny_teacher, tiny_selection, tmp_path, fault_log, teacher_reference):
    args, key = _stage_args(stage, tiny_teacher, tiny_selection)
    if stage == "teacher":  # the uninterrupted run of these arguments, shared with the signal tests
        reference, ref_dir = teacher_reference
    else:
        ref_dir = tmp_path / "reference"
        reference = fit(*args, "--run_dir", str(ref_dir))
    rng = np.random.default_rng(int(time.time()))
    results = []
    for i in range(tries * 3):  # a kill that lands after the run ended is no try
        if len(results) == tries:
            break
        got = kill_and_resume(args, reference, ref_dir, tmp_path / f"run{i}", float(rng.uniform(0.0, 0.6)), key)
        if got is not None:
            results.append(got)
            record(fault_log, f"SIGKILL {stage} + resume", survived=all(got), data_lost=not got[1])
    assert len(results) == tries, "the kills landed after the runs ended: lengthen the runs"
    assert all(same for same, _ in results), (
        f"a resumed {stage} run ended with other figures than the uninterrupted one: {DIFFS}"
    )
    assert all(once for _, once in results), "metrics.csv logs an epoch twice after a resume"


@pytest.mark.parametrize("stage", ["teacher", "student", "generator"])
def test_sigkill_then_resume_reproduces(stage, tiny_teacher, tiny_selection, tmp_path, fault_log, teacher_reference):
    _kill_resume_tries(stage, 1, tiny_teacher, tiny_selection, tmp_path, fault_log, teacher_reference)


@pytest.mark.soak
@pytest.mark.parametrize("stage", ["teacher", "student", "generator"])
def test_soak_sigkill_at_random_points(stage, tiny_teacher, tiny_selection, tmp_path, fault_log, teacher_reference):
    _kill_resume_tries(stage, 5, tiny_teacher, tiny_selection, tmp_path, fault_log, teacher_reference)


# -- a full disk -------------------------------------------------------------------------------
class FullDisk:
    """A file whose writes fail with ENOSPC after ``room`` bytes, as on a full disk."""

    def __init__(self, f, room: int = 4096):
        self._f, self._room = f, room

    def write(self, data):
        self._room -= len(data)
        if self._room < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def fill_disk_for(monkeypatch, match) -> None:
    """Files opened for writing whose path ``match`` accepts fail as on a full disk."""
    import builtins

    real_open = builtins.open

    def fake_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return FullDisk(f) if any(c in mode for c in "wa") and match(str(file)) else f

    monkeypatch.setattr(builtins, "open", fake_open)


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch, fault_log):
    from vitkd.io import DiskFullError

    run = tmp_path / "teacher"
    fit(*teacher_args(1), "--run_dir", str(run))
    last = run / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    (run / "metrics.json").unlink()
    fill_disk_for(monkeypatch, lambda p: ".last.ckpt." in p)
    with pytest.raises(
        DiskFullError,
        match=r"no space left on the device writing .*last.ckpt \(.* free there\): .*the previous last.ckpt is kept",
    ) as err:
        fit(*teacher_args(2), "--ckpt_path", str(last), "--run_dir", str(run))
    monkeypatch.undo()
    assert "\n" not in str(err.value)
    kept = last.read_bytes() == before and not list(run.rglob("*.tmp"))
    record(fault_log, "full disk during a checkpoint", survived=True, data_lost=not kept)
    assert kept, "the previous checkpoint is intact and no temporary file is left"


def test_full_disk_while_writing_shards_keeps_the_previous_set(tmp_path, monkeypatch, fault_log):
    from data_modules.shards import encode_png, write_shards
    from vitkd.io import DiskFullError

    samples = [{"__key__": f"k{i:03d}", "png": encode_png(np.full((8, 8), i, np.uint8))} for i in range(30)]
    out = tmp_path / "pool"
    write_shards(samples, out, pattern="wild-%06d.tar", maxcount=10)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    fill_disk_for(monkeypatch, lambda p: p.endswith("wild-000001.tar"))
    with pytest.raises(
        DiskFullError,
        match=r"no space left on the device writing .*pool \(.* free there\): .*the previous pool is kept",
    ):
        write_shards(samples[::-1], out, pattern="wild-%06d.tar", maxcount=10)
    monkeypatch.undo()
    kept = {p.name: p.read_bytes() for p in out.iterdir()} == before and [p.name for p in tmp_path.iterdir()] == [
        "pool"
    ]
    record(fault_log, "full disk during shard writing", survived=True, data_lost=not kept)
    assert kept, "the previous shards are intact and no temporary folder is left"


# -- two runs in one run directory --------------------------------------------------------------
def test_a_run_directory_in_use_is_refused(tmp_path, fault_log):
    from vitkd.fit import RunDirLock

    run = tmp_path / "teacher"
    holder = RunDirLock(run)  # another run holds it
    (run / "config.yaml").write_text("the other run's\n")
    try:
        with pytest.raises(
            VitkdInputError,
            match=r"--run_dir .*teacher is in use by another vitkd run: wait for it to end, or pass another --run_dir",
        ):
            fit(*teacher_args(1), "--run_dir", str(run))
    finally:
        holder.release()
    mixed = (
        sorted(p.name for p in run.iterdir()) != ["config.yaml"]
        or (run / "config.yaml").read_text() != "the other run's\n"
    )
    record(fault_log, "two runs in one run_dir", survived=not mixed, data_lost=mixed)
    assert not mixed, "the refused run wrote nothing"


@pytest.mark.soak
def test_soak_two_runs_started_together(tmp_path, fault_log):
    for i in range(3):
        run = tmp_path / f"r{i}"
        procs = [start(teacher_args(2), run) for _ in range(2)]
        outs = [p.communicate(timeout=600) for p in procs]
        codes = sorted(p.returncode for p in procs)
        refused = [e for _, e in outs if "is in use by another vitkd run" in e or "already holds a run" in e]
        ok = (
            codes == [0, 2]
            and len(refused) == 1
            and epochs_logged_once(run, "val/acc")
            and json.loads((run / "metrics.json").read_text())["epochs"] == 2
        )
        record(fault_log, "two runs in one run_dir", survived=ok, data_lost=not ok)
        assert ok, outs


# -- SIGTERM and the SLURM requeue -------------------------------------------------------------
@pytest.mark.soak  # a 4-epoch run stopped and resumed: in make faults, kept out of make test's time
def test_sigterm_stops_with_a_checkpoint_that_resumes(teacher_reference, tmp_path, fault_log):
    reference, ref_dir = teacher_reference
    run = tmp_path / "teacher"
    stopped, proc, err = kill_at(teacher_args(), run, 0.1, sig=signal.SIGTERM)
    assert stopped, "the run ended before the signal"
    lines = [ln for ln in err.splitlines() if ln.startswith("vitkd:")]
    assert (
        proc.returncode == 143 and lines and lines[-1].startswith("vitkd: stopped by SIGTERM: resume with --ckpt_path")
    ), err[-2000:]
    m = fit(*teacher_args(), "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--run_dir", str(run))
    same = figures(m, run, "val/acc") == figures(reference, ref_dir, "val/acc")
    record(fault_log, "SIGTERM during training", survived=same, data_lost=not epochs_logged_once(run, "val/acc"))
    assert same and epochs_logged_once(run, "val/acc")


@pytest.mark.soak  # a 4-epoch run stopped and resumed: in make faults, kept out of make test's time
def test_sigusr1_slurm_requeue_resumes_from_the_last_epoch(teacher_reference, tmp_path, monkeypatch, fault_log):
    reference, ref_dir = teacher_reference
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"  # SLURM requeues the job and ends this one: here the job is killed
    scontrol.write_text('#!/bin/sh\necho "$@" > "$(dirname "$0")/requeued"\nkill -9 $PPID\n')
    scontrol.chmod(0o755)
    slurm = {
        "SLURM_NTASKS": "1",
        "SLURM_JOB_NAME": "vitkd-faults",
        "SLURM_JOB_ID": "4242",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
    }
    env = {**QUIET, **slurm, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    run = tmp_path / "teacher"
    signalled, proc, err = kill_at(teacher_args(), run, 0.1, sig=signal.SIGUSR1, env=env)
    assert signalled, "the run ended before the signal"
    assert (bin_dir / "requeued").read_text().split() == ["requeue", "4242"], err[-2000:]
    assert list(run.glob("hpc_ckpt_*.ckpt")), "Lightning saved its requeue checkpoint"
    for k, v in slurm.items():  # the requeued job: the same command, no --ckpt_path
        monkeypatch.setenv(k, v)
    m = fit(*teacher_args(), "--run_dir", str(run))
    same = figures(m, run, "val/acc") == figures(reference, ref_dir, "val/acc")
    record(
        fault_log,
        "SIGUSR1 (SLURM requeue) during training",
        survived=same,
        data_lost=not epochs_logged_once(run, "val/acc"),
    )
    assert same and epochs_logged_once(run, "val/acc")
