"""The selector at scale: wall time and peak RSS of the real selection CLI, in a child process, on 100k and
1M synthetic wild samples (``benchmarks.wild``), and the CLI levers tried on the 100k selection."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import torch

from benchmarks.wild import SHARD_SIZE, wild_pool
from vitkd.models import create_model

POOL = "data/bench/wild-1m"
SIZES = {"none": [], "100k": [100_000], "1m": [100_000, 1_000_000]}
# CLI levers tried on the 100k selection (the default run uses experiments/digits/select.yaml as it is)
SCALE_LEVERS = {
    "fp32": ["--trainer.precision", "32-true"],
    "bf16_true": ["--trainer.precision", "bf16-true"],
    "one_loader_worker": ["--data.init_args.num_workers", "1"],
    "bf16_true_compile": ["--trainer.precision", "bf16-true", "--model.init_args.compile", "true"],
}


def teacher_for_cli(tmp: Path) -> tuple[Path, list[str]]:
    demo = Path("runs/demo/teacher/checkpoints/best.ckpt")
    if demo.is_file():
        return demo, []
    path = tmp / "digits_teacher.pt"
    torch.save(create_model("digits_teacher_patch4_16", img_size=16, in_chans=1, num_classes=10).state_dict(), path)
    return path, ["--model.init_args.teacher_arch", "digits_teacher_patch4_16"]


def run_selection(
    urls: str, num_keep: int, ckpt: Path, extra: list[str], run_dir: Path, threads: int
) -> dict[str, Any]:
    """Wall time and peak RSS (sum over the child's process tree, polled every 50 ms) of one CLI selection."""
    cmd = [
        sys.executable,
        "-m",
        "vitkd.fit",
        "--config",
        "experiments/digits/select.yaml",
        "--data.init_args.wild_urls",
        urls,
        "--model.init_args.num_keep",
        str(num_keep),
        "--model.init_args.teacher_ckpt",
        str(ckpt),
        *extra,
        "--torch_threads",
        str(threads),
        "--run_dir",
        str(run_dir),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "WANDB_MODE": "disabled"}
    log_path = run_dir.with_name(run_dir.name + ".log")  # a file, not a pipe: a full pipe would stall the child
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        ps, peak = psutil.Process(proc.pid), 0
        while proc.poll() is None:
            with contextlib.suppress(psutil.Error):
                peak = max(peak, sum(q.memory_info().rss for q in [ps, *ps.children(recursive=True)]))
            time.sleep(0.05)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"selection failed ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
    return {"wall_s": wall, "peak_rss_mb": peak / 2**20, "num_keep": num_keep, "images_per_s": None}


def pool_urls(n: int) -> str:
    """The brace URL of the pool's first ``n`` samples."""
    return f"{POOL}/wild-{{000000..{n // SHARD_SIZE - 1:06d}}}.tar"


def bench_scale(scale: str, threads: int, levers: bool = True) -> dict[str, Any]:
    sizes = SIZES[scale]
    if not sizes:
        return {"skipped": "--scale none"}
    out: dict[str, Any] = {"pool": f"{POOL} (8x8 grayscale noise PNGs, resized to 16x16)", "shard_size": SHARD_SIZE}
    t0 = time.perf_counter()
    wild_pool(POOL, max(sizes))
    out["pool_build_s"] = time.perf_counter() - t0
    Path("data/bench").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir="data/bench") as tmp:
        ckpt, extra = teacher_for_cli(Path(tmp))
        out["teacher"] = str(ckpt)
        for n in sizes:
            r = run_selection(pool_urls(n), 10_000, ckpt, extra, Path(tmp) / f"sel-{n}", threads)
            r["images_per_s"] = n / r["wall_s"]
            out[str(n)] = r
        if levers and 100_000 in sizes:
            for name, args in SCALE_LEVERS.items():
                r = run_selection(
                    pool_urls(100_000), 10_000, ckpt, [*extra, *args], Path(tmp) / f"sel-100k-{name}", threads
                )
                r.update(images_per_s=100_000 / r["wall_s"], args=" ".join(args))
                out[f"100000_{name}"] = r
    if "1000000" in out:
        out["memory_ratio_1m_over_100k"] = out["1000000"]["peak_rss_mb"] / out["100000"]["peak_rss_mb"]
        out["time_ratio_1m_over_100k"] = out["1000000"]["wall_s"] / out["100000"]["wall_s"]
    return out
