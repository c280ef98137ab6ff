"""What every benchmark of ``make bench`` shares: the model presets, the timer, the machine's name and the
header of a results file, and ``finish()``, which writes ``<out>/<machine>-<date><suffix>.json`` and prints
the table."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from benchmarks.table import table
from vitkd.efficient.measure import cpu_model, sync
from vitkd.io import write_json

# Model pairs and batch sizes. On CUDA vitkd scores 1024 at a time; on a CPU smaller batches stay in cache and
# measured faster for the paper pair in bf16, so vitkd scores the paper pair 64 at a time there and is also timed
# at the reference's batch (256).
PRESETS: dict[str, dict[str, Any]] = {
    "digits": dict(
        teacher="digits_teacher_patch4_16",
        student="digits_student_patch4_16",
        img_size=16,
        in_chans=1,
        num_classes=10,
        probe_blocks=[1, 3],
        probe_pairs=[[1, 1], [3, 3], [5, 5]],
        relation_norm="channel",
        select_batch={"cpu": 1024, "cuda": 1024},
        ref_select_batch=256,
        distill_batch=128,
    ),
    "paper": dict(
        teacher="deit_xsmall_patch4_32",
        student="deit_xtiny_patch4_32",
        img_size=32,
        in_chans=3,
        num_classes=10,
        probe_blocks=[3, 7],
        probe_pairs=[[3, 3], [7, 7], [11, 11]],
        relation_norm="token",
        select_batch={"cpu": 64, "cuda": 1024},
        ref_select_batch=256,
        distill_batch=64,
    ),
}
HEADLINE_PRESET = "paper"
TIMING = "warm-up iterations, then the median of per-iteration wall times (time.perf_counter), device synchronised"


# -- timing ---------------------------------------------------------------------------------------
def timed(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> dict[str, float]:
    """Median and best per-iteration wall time of ``fn``, synchronised before the clock starts and stops."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    out = {"median_s": statistics.median(times), "best_s": min(times), "iters": iters, "warmup": warmup}
    if device.type == "cuda":
        out["max_memory_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def rate(t: dict[str, float], batch: int) -> dict[str, float]:
    return {**t, "batch": batch, "images_per_s": batch / t["median_s"], "images_per_s_best": batch / t["best_s"]}


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# -- machine and results file -------------------------------------------------------------------
def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu-{os.cpu_count()}c-{cpu_model()}"
    name = re.sub(r"\((r|tm)\)|processor|cpu @.*", "", name.lower())
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def header(device: torch.device, threads: int, quick: bool, presets: dict[str, dict]) -> dict[str, Any]:
    """The first keys of a results file: the machine, the software, the date and the presets measured."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "machine": machine_name(device),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": gpu or "cpu",
        "gpu": gpu or "not lent to this task",
        "threads": threads,
        "date": dt.date.today().isoformat(),
        "quick": quick,
        "load_average_before": load_average(),
        "timing": TIMING,
        "headline_preset": HEADLINE_PRESET,
        "presets": presets,
    }


def finish(res: dict[str, Any], out: Path, suffix: str) -> dict[str, Any]:
    """Load after the run, ``<out>/<machine>-<date><suffix>.json``, and the table."""
    res["load_average_after"] = load_average()
    path = out / f"{res['machine']}-{res['date']}{suffix}.json"
    write_json(path, res)
    print(table(res))
    print(f"wrote {path}")
    return res
