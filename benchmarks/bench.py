"""``make bench``: vitkd's selector and distillation step side by side with reference-style loops.

    python -m benchmarks.bench [--quick] [--threads N] [--scale none|100k|1m] [--out benchmarks/results]
    python -m benchmarks.bench --only generator   # the data-free generator row alone, in a results file of its own

Writes ``benchmarks/results/<machine>-<YYYY-MM-DD>.json`` and prints a table. Every figure is measured in
this one run on this machine: images/s of the selector's scoring and of one distillation step (vitkd vs the
loops in ``benchmarks/reference.py``), for the embedded digits presets and the paper's pair; the selector's
wall time and peak RSS at 100k and 1M wild samples (the real CLI, in a child process); FLOPs per image and
the share of this device's matmul peak (measured here too) each rate reaches at the precision it runs at.
Targets are reported, never asserted.
Timings: warm-up, then the median of per-iteration wall times, the device synchronised around each.

One benchmark per module: ``selector``, ``distill``, ``flops``, ``scale``, ``generator``, ``pack_bench``,
``stream``; what they share (presets, timer, machine name, ``finish()``) is ``benchmarks.common``.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import HEADLINE_PRESET, PRESETS, finish, header
from benchmarks.distill import bench_distill
from benchmarks.flops import bench_flops, matmul_peak
from benchmarks.generator import bench_generator
from benchmarks.pack_bench import bench_pack
from benchmarks.scale import bench_scale
from benchmarks.selector import bench_selector
from benchmarks.stream import bench_stream
from vitkd.errors import OneLineParser
from vitkd.models import create_model

# the paper pair's: selector and distillation step (teacher every step, as with augmented inputs) as shares of the
# matmul peak at their precision, the step also against the reference loop
TARGETS = {
    "selector_fraction_of_peak": 0.70,
    "distill_every_step_fraction_of_peak": 0.40,
    "distill_speedup_ratio_teacher_every_step": 3.0,
    "scale_memory_ratio_max": 1.1,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = OneLineParser(prog="python -m benchmarks.bench", description=__doc__.split("\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help="few iterations, smaller paper-pair batches, selector at 100k only"
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads on CPU (default 1, the project's setting for these models)",
    )
    ap.add_argument(
        "--scale",
        choices=["none", "100k", "1m"],
        default=None,
        help="selector-at-scale runs (default 100k; 1m adds the 1M-sample run, ~15 min on one CPU core)",
    )
    ap.add_argument("--presets", nargs="+", choices=list(PRESETS), default=list(PRESETS))
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument(
        "--only",
        choices=["all", "generator"],
        default="all",
        help="generator: only the data-free generator row (a results file of its own)",
    )
    return ap.parse_args(argv)


def chosen_presets(names: list[str], quick: bool, device: torch.device) -> dict[str, dict]:
    """Copies of the named presets; ``--quick`` shrinks the paper pair's batches, a CPU run its iterations."""
    presets = {k: copy.deepcopy(PRESETS[k]) for k in names}
    if quick:  # the reference's batch shrinks too: its 256 batch is slow on a CPU
        presets.get("paper", {}).update(select_batch={"cpu": 64, "cuda": 1024}, ref_select_batch=64, distill_batch=32)
    elif device.type == "cpu":
        presets.get("paper", {}).update(iters=4)
    return presets


def bench_presets(res: dict[str, Any], presets: dict[str, dict], device: torch.device, warmup: int, iters: int) -> None:
    """Selector, distillation step and FLOPs of each preset, on a freshly initialised teacher."""
    res["selector"], res["distill"], res["flops"] = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, p in presets.items():
            ckpt = Path(tmp) / f"{name}_teacher.pt"
            teacher = create_model(
                p["teacher"], img_size=p["img_size"], in_chans=p["in_chans"], num_classes=p["num_classes"]
            )
            torch.save(teacher.state_dict(), ckpt)
            it = p.get("iters", iters)
            print(f"[{name}] selector ...", flush=True)
            res["selector"][name] = bench_selector(p, ckpt, device, warmup, it)
            print(f"[{name}] distillation step ...", flush=True)
            res["distill"][name] = bench_distill(p, ckpt, device, 1 if it < iters else warmup, it)
            peaks = {q: res["peak"][q]["flop_per_s"] for q in ("bf16", "fp32")}
            res["flops"][name] = bench_flops(p, device, res["selector"][name], res["distill"][name], peaks)


def judge(res: dict[str, Any], presets: dict[str, dict]) -> None:
    """The headline ratios (the paper pair's, else the first preset's), per preset, and the targets."""
    head = HEADLINE_PRESET if HEADLINE_PRESET in presets else next(iter(presets))
    res["headline_preset"] = head
    res["selector_speedup_ratio"] = res["selector"][head]["speedup_ratio"]
    res["distill_speedup_ratio"] = res["distill"][head]["speedup_ratio"]
    res["distill_speedup_ratio_definition"] = res["distill"][head]["vitkd_best_config"]
    res["distill_speedup_ratio_teacher_every_step"] = res["distill"][head]["speedup_ratio_teacher_every_step"]
    if "speedup_ratio_augmented_fixed_views" in res["distill"][head]:  # reported beside the target's definition
        res["distill_speedup_ratio_augmented_fixed_views"] = res["distill"][head]["speedup_ratio_augmented_fixed_views"]
    for name in presets:
        res[f"selector_speedup_ratio_{name}"] = res["selector"][name]["speedup_ratio"]
        res[f"distill_speedup_ratio_{name}"] = res["distill"][name]["speedup_ratio"]
        every_step = res["distill"][name]["speedup_ratio_teacher_every_step"]
        res[f"distill_speedup_ratio_teacher_every_step_{name}"] = every_step
    if head != HEADLINE_PRESET:  # the targets are stated for the paper's pair; a run without it does not judge them
        why = f"the targets are for the {HEADLINE_PRESET!r} preset, which this run did not measure"
        res["targets"] = {"not_judged": why}
        return
    f = res["flops"][head]
    res["selector_fraction_of_peak"] = f["selector_vitkd_fraction_of_peak"]
    res["selector_peak_precision"] = f["selector_vitkd_peak_precision"]
    res["distill_every_step_fraction_of_peak"] = f["distill_vitkd_fraction_of_peak"]
    res["distill_every_step_peak_precision"] = f["distill_vitkd_peak_precision"]
    res["targets"] = {}
    for key in ("selector_fraction_of_peak", "distill_every_step_fraction_of_peak"):
        res["targets"][key] = {"target": TARGETS[key], "value": res[key], "met": res[key] >= TARGETS[key]}
    key = "distill_speedup_ratio_teacher_every_step"
    res["targets"][key] = {"target": TARGETS[key], "value": res[key], "met": res[key] >= TARGETS[key]}
    if "memory_ratio_1m_over_100k" in res["scale"]:
        m, top = res["scale"]["memory_ratio_1m_over_100k"], TARGETS["scale_memory_ratio_max"]
        res["targets"]["scale_memory_ratio_1m_over_100k"] = {"target_max": top, "value": m, "met": m <= top}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    threads = args.threads or (1 if device.type == "cpu" else torch.get_num_threads())
    torch.set_num_threads(threads)
    warmup, iters = (1, 2) if args.quick else (2, 7)
    presets = chosen_presets(args.presets, args.quick, device)
    torch.manual_seed(0)
    res = header(device, threads, args.quick, presets)
    print(
        f"bench on {res['machine']} ({res['device']}, {threads} threads), load {res['load_average_before']}", flush=True
    )
    res["peak"] = {"bf16": matmul_peak(device, torch.bfloat16), "fp32": matmul_peak(device, torch.float32, reps=3)}
    quick = "-quick" if args.quick else ""
    if args.only == "generator":
        res["generator"] = bench_generator(device, warmup, iters, threads, args.quick)
        return finish(res, Path(args.out), "-generator" + quick)
    bench_presets(res, presets, device, warmup, iters)
    scale = args.scale or "100k"
    print(f"selector at scale ({scale}) ...", flush=True)
    res["scale"] = bench_scale(scale, threads, levers=not args.quick)
    res["generator"] = bench_generator(device, warmup, iters, threads, args.quick)
    res["pack"] = bench_pack()
    res["stream"] = bench_stream()
    judge(res, presets)
    return finish(res, Path(args.out), quick)


if __name__ == "__main__":
    main()
