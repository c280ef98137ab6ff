"""``make bench-gpu``: the paper pair's selector and distillation step at bf16 on one GPU, at the largest batch
that fits, with their share of the device's bf16 peak, and the shard loader's decoding rate per worker count.

    python -m benchmarks.gpu [--device cuda|cpu] [--quick] [--out benchmarks/results]

Writes ``<out>/gpu-<device>-<YYYY-MM-DD>.json`` and prints a table. Batch search: the batch doubles from
``--start-batch`` until the device runs out of memory or ``--max-batch``; the largest that ran is timed.
MFU: FLOPs per image (``torch.utils.flop_counter``, unfused attention; probe and losses not counted) × images/s
over the measured bf16 matmul peak (on a CPU, the faster of its bf16 and fp32 matmul peaks), and over the
datasheet peak where the device is known. Goals are reported, never asserted. ``--device cpu --quick`` runs the
same steps at toy sizes (the tests run it).
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import resource
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from benchmarks.common import PRESETS, autocast, header, rate, timed
from benchmarks.distill import distill_optimizer, distill_stage, train_step
from benchmarks.flops import matmul_peak, train_flops_per_image
from data_modules import shards
from data_modules.shard_datamodule import ShardDataModule
from vitkd.efficient.measure import cpu_model, flops_per_image, sync
from vitkd.errors import OneLineParser
from vitkd.io import write_json
from vitkd.models import create_model
from vitkd.stages import AttentionProbeSelector

PRESET = "paper"
# Dense bf16 tensor-core peaks (no sparsity) from NVIDIA's datasheets: H100 SXM and H200 989 TFLOP/s (1,979 with
# sparsity), H100 PCIe 756, A100 312. Keys: substrings of torch.cuda.get_device_name(), lowercase.
DATASHEET_BF16 = {
    "h200": 989e12,
    "h100 80gb hbm3": 989e12,  # the H100 SXM's device name
    "h100 sxm": 989e12,
    "h100 pcie": 756e12,
    "a100": 312e12,
}
SELECTOR_MFU_GOAL = 0.30
LOADER_BATCH = 256


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = OneLineParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--quick", action="store_true", help="toy sizes: batch search to 2, one timed iteration, 2 shards")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="folder of the results JSON")
    ap.add_argument("--start-batch", type=int, default=None, help="first batch of the search (default 256; quick 1)")
    ap.add_argument("--max-batch", type=int, default=None, help="cap of the batch search (default 65536; quick 2)")
    ap.add_argument("--iters", type=int, default=None, help="timed iterations (default 10; quick 1)")
    ap.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=None,
        help="DataLoader workers to try (default 0 1 2 4 8 16; quick 0 1)",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's; 1 on cpu)")
    args = ap.parse_args(argv)
    if args.device not in ("cuda", "cpu"):
        ap.error(f"--device {args.device}: use cuda or cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here (torch.cuda.is_available() is False); use --device cpu")
    q = args.quick
    args.start_batch = args.start_batch or (1 if q else 256)
    args.max_batch = args.max_batch or (2 if q else 65536)
    args.iters = args.iters or (1 if q else 10)
    args.warmup = 1 if q else 3
    args.workers = sorted(set(args.workers if args.workers is not None else ([0, 1] if q else [0, 1, 2, 4, 8, 16])))
    args.workers = [w for w in args.workers if w <= (os.cpu_count() or 1)]
    return args


# -- device -------------------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def datasheet_peak(name: str) -> float | None:
    return next((v for k, v in DATASHEET_BF16.items() if k in name.lower()), None)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def peak_memory(device: torch.device, t: dict[str, Any]) -> dict[str, Any]:
    """GPU: ``max_memory_allocated`` over the timed iterations (``timed`` resets it); CPU: the process's peak RSS."""
    if device.type == "cuda":
        return {"peak_memory_mb": t["max_memory_allocated_mb"], "peak_memory_kind": "torch.cuda.max_memory_allocated"}
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"peak_memory_mb": rss_mb, "peak_memory_kind": "process peak RSS (not reset per measurement)"}


# -- batch search and timing --------------------------------------------------------------------
def runs(build: Callable[[int], Callable[[], Any]], b: int, device: torch.device) -> dict[str, Any]:
    """One call of ``build(b)``'s function: whether it fitted in memory, and its peak GPU memory."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ok = True
    try:
        build(b)()
        sync(device)
    except torch.cuda.OutOfMemoryError:
        ok = False
    free(device)
    out: dict[str, Any] = {"batch": b, "fits": ok}
    if device.type == "cuda" and ok:
        out["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def largest_batch(
    build: Callable[[int], Callable[[], Any]], device: torch.device, args: argparse.Namespace
) -> dict[str, Any]:
    """Double the batch from ``start_batch`` until out of memory or past ``max_batch``; time the largest that ran
    (halving it while the timed run itself runs out of memory)."""
    tried, b = [], args.start_batch
    while b <= args.max_batch:
        tried.append(runs(build, b, device))
        if not tried[-1]["fits"]:
            break
        b *= 2
    fits = [t["batch"] for t in tried if t["fits"]]
    if not fits:
        raise SystemExit(f"vitkd: error: batch {args.start_batch} does not fit in memory: pass a smaller --start-batch")
    b = max(fits)
    while True:
        try:
            t = timed(build(b), device, args.warmup, args.iters)
            break
        except torch.cuda.OutOfMemoryError:
            pass
        free(device)
        tried.append({"batch": b, "fits": False, "when": "timing"})
        if b // 2 < args.start_batch:
            raise SystemExit(f"vitkd: error: no batch from {args.start_batch} fits when timed")
        b //= 2
    free(device)
    capped = tried[-1]["fits"]
    return {**rate(t, b), **peak_memory(device, t), "batch_search": tried, "batch_capped_by_max": capped}


def with_mfu(r: dict[str, Any], flops: int, peaks: dict[str, float | None]) -> dict[str, Any]:
    achieved = flops * r["images_per_s"]
    r.update(flops_per_image=flops, flop_per_s=achieved)
    for name, peak in peaks.items():
        r[f"mfu_{name}"] = achieved / peak if peak else None
    return r


# -- the two steps --------------------------------------------------------------------------------
def selector_builder(sel: AttentionProbeSelector, p: dict, device: torch.device, true_bf16: bool):
    """What the selector's ``predict_step`` runs per batch: score, then the columns to host numpy. bf16 autocast
    (``--trainer.precision bf16-mixed``), or with the module and inputs in bf16 (``bf16-true``)."""
    shape = (p["in_chans"], p["img_size"], p["img_size"])

    def build(b: int) -> Callable[[], Any]:
        x = torch.randn(b, *shape, device=device, dtype=torch.bfloat16 if true_bf16 else torch.float32)

        def fn():
            with torch.inference_mode(), autocast(device, "fp32" if true_bf16 else "bf16"):
                cols = sel.score(x)
            return {k: v.float().cpu().numpy() for k, v in cols.items()}

        return fn

    return build


def bench_selector(p: dict, ckpt: Path, device: torch.device, args, flops: int, peaks: dict) -> dict[str, Any]:
    sel = AttentionProbeSelector(
        teacher_ckpt=str(ckpt),
        teacher_arch=p["teacher"],
        num_keep=1,
        img_size=p["img_size"],
        in_chans=p["in_chans"],
        num_classes=p["num_classes"],
        probe_blocks=p["probe_blocks"],
        probe_head="mean",
        lambda_a=[0.05] * len(p["probe_blocks"]),
    ).to(device)
    out = {"bf16_mixed": with_mfu(largest_batch(selector_builder(sel, p, device, False), device, args), flops, peaks)}
    sel.to(torch.bfloat16)
    out["bf16_true"] = with_mfu(largest_batch(selector_builder(sel, p, device, True), device, args), flops, peaks)
    return out


def bench_distill(p: dict, ckpt: Path, device: torch.device, args, flops: int, peaks: dict) -> dict[str, Any]:
    """One ProbeDistillation training step, bf16 autocast, the teacher run every step (augmented inputs)."""
    stage = distill_stage(p, ckpt, device)
    stage.train()
    opt = distill_optimizer(stage)
    shape = (p["in_chans"], p["img_size"], p["img_size"])

    def build(b: int) -> Callable[[], None]:
        opt.zero_grad(set_to_none=True)  # a step cut short by running out of memory leaves gradients behind
        return train_step(stage, opt, (torch.randn(b, *shape, device=device), None), device, "bf16")

    return with_mfu(largest_batch(build, device, args), flops, peaks)


# -- data loader ----------------------------------------------------------------------------------
def write_pool(folder: Path, p: dict, n_shards: int, per_shard: int) -> list[str]:
    """Synthetic random RGB images (png) as wild-pool shards, written by the project's shard writer."""
    rng = np.random.default_rng(0)
    side, c = p["img_size"], p["in_chans"]
    pngs = [shards.encode_png(rng.integers(0, 256, (side, side, c), dtype=np.uint8)) for _ in range(256)]
    samples = (
        {"__key__": f"{i:08d}", "png": pngs[i % len(pngs)], "cls": str(i % p["num_classes"])}
        for i in range(n_shards * per_shard)
    )
    return [str(u) for u in shards.write_shards(samples, folder, pattern="wild-%06d.tar", maxcount=per_shard)]


def loader_rate(urls: list[str], p: dict, workers: int, seconds: float) -> dict[str, Any]:
    """Decoded images/s of the selector's scoring loader (``ShardDataModule.scoring_loader``) over ``urls``
    (read again and again until ``seconds`` have passed); the clock starts at the first batch."""
    dm = ShardDataModule(
        img_size=p["img_size"], in_chans=p["in_chans"], eval_batch_size=LOADER_BATCH, num_workers=workers
    )
    t_start = time.perf_counter()
    it = iter(dm.scoring_loader(urls * 1000))
    first = next(it)
    t0 = time.perf_counter()
    images, elapsed = 0, 0.0
    for batch in it:
        images += len(batch["key"])
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            break
    del it
    if not len(first["key"]) or not images:
        raise RuntimeError(f"the shard loader decoded no images from {urls[0]}")
    return {
        "images": images,
        "seconds": elapsed,
        "images_per_s": images / elapsed,
        "first_batch_s": t0 - t_start,
        "batch": LOADER_BATCH,
    }


def bench_loader(p: dict, args, tmp: Path) -> dict[str, Any]:
    n_shards, per_shard, seconds = (2, 64, 0.5) if args.quick else (32, 1024, 3.0)
    t0 = time.perf_counter()
    urls = write_pool(tmp / "wild", p, n_shards, per_shard)
    out: dict[str, Any] = {
        "reader": "data_modules.shard_datamodule.ShardDataModule.scoring_loader (png decode, PNG CRC check, to tensor)",
        "shards": len(urls),
        "images_per_shard": per_shard,
        "write_s": time.perf_counter() - t0,
        "seconds_per_count": seconds,
        "workers": {},
    }
    for w in args.workers:
        print(f"loader, {w} workers ...", flush=True)
        out["workers"][str(w)] = loader_rate(urls, p, w, seconds)
    return out


# -- results --------------------------------------------------------------------------------------
def goals(res: dict[str, Any]) -> dict[str, Any]:
    """Reported, never asserted."""
    sel = max(res["selector"].items(), key=lambda kv: kv[1]["images_per_s"])
    mfu_key = "mfu_datasheet" if sel[1].get("mfu_datasheet") else "mfu_measured_peak"
    mfu = sel[1][mfu_key]
    need = sel[1]["images_per_s"]
    keep_up = [int(w) for w, r in res["loader"]["workers"].items() if r["images_per_s"] >= need]
    return {
        "selector_mfu": {
            "goal": f"selector >= {SELECTOR_MFU_GOAL:.0%} MFU",
            "selector": sel[0],
            "against": mfu_key,
            "value": mfu,
            "met": mfu >= SELECTOR_MFU_GOAL,
        },
        "loaders_keep_up": {
            "goal": "decoded images/s of the shard loader >= the selector's images/s",
            "selector": sel[0],
            "selector_images_per_s": need,
            "fewest_workers": min(keep_up) if keep_up else None,
            "met": bool(keep_up),
        },
    }


def print_table(res: dict[str, Any]) -> None:
    def pct(v):
        return f"{v:.1%}" if v is not None else "-"

    print(f"\n{res['device_name']}, torch {res['torch']}, CUDA {res['cuda']}, {res['cores']} x {res['cpu']}")
    print(f"{'measurement':<22}{'batch':>8}{'img/s':>12}{'MFU meas.':>11}{'MFU sheet':>11}{'peak MB':>10}")
    rows = [(f"selector {k}", r) for k, r in res["selector"].items()] + [("distill bf16", res["distill"])]
    for name, r in rows:
        print(
            f"{name:<22}{r['batch']:>8}{r['images_per_s']:>12.0f}{pct(r['mfu_measured_peak']):>11}"
            f"{pct(r['mfu_datasheet']):>11}{r['peak_memory_mb']:>10.0f}"
        )
    for w, r in res["loader"]["workers"].items():
        print(f"{'loader ' + w + ' workers':<22}{r['batch']:>8}{r['images_per_s']:>12.0f}")
    for g in res["goals"].values():
        print(f"goal {g['goal']}: {'met' if g['met'] else 'not met'}")
    print(f"wall {res['wall_s']:.0f} s")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    t_start = time.perf_counter()
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    p = PRESETS[PRESET]
    name = device_name(device)
    res: dict[str, Any] = header(device, torch.get_num_threads(), args.quick, {PRESET: p})
    res.update(device_name=name, device_slug=slug(name), cuda=torch.version.cuda)
    shape = (p["in_chans"], p["img_size"], p["img_size"])
    kw = dict(img_size=p["img_size"], in_chans=p["in_chans"], num_classes=p["num_classes"])
    teacher, student = create_model(p["teacher"], **kw).to(device), create_model(p["student"], **kw).to(device)
    t_fwd, s_train = flops_per_image(teacher, shape), train_flops_per_image(student, shape)
    res["flops_per_image"] = {
        "selector": t_fwd,
        "distill_step": t_fwd + s_train,
        "convention": "torch.utils.flop_counter matmul/conv FLOPs (2 per multiply-add), unfused attention; "
        "the selector: the teacher's forward; the step: that plus the student's forward and backward; "
        "probe and losses not counted",
    }
    print("bf16 matmul peak ...", flush=True)
    n, reps = (256, 3) if args.quick else ((8192, 20) if device.type == "cuda" else (2048, 5))
    res["peak"] = {"measured_bf16_matmul": matmul_peak(device, torch.bfloat16, n=n, reps=reps)}
    peak = res["peak"]["measured_bf16_matmul"]["flop_per_s"]
    if device.type == "cpu":  # a CPU without bf16 units converts to fp32 (oneDNN): its peak is the faster of the two
        res["peak"]["measured_fp32_matmul"] = matmul_peak(device, torch.float32, n=n, reps=reps)
        peak = max(peak, res["peak"]["measured_fp32_matmul"]["flop_per_s"])
    sheet = datasheet_peak(name) if device.type == "cuda" else None
    res["peak"].update(measured_peak_flop_per_s=peak, datasheet_bf16_flop_per_s=sheet)
    peaks = {"measured_peak": peak, "datasheet": sheet}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "teacher.pt"
        torch.save(teacher.state_dict(), ckpt)  # a fresh random teacher: speed does not depend on its weights
        del teacher, student
        print("selector ...", flush=True)
        res["selector"] = bench_selector(p, ckpt, device, args, t_fwd, peaks)
        free(device)  # the selector's models are gone once it returns
        print("distillation step ...", flush=True)
        res["distill"] = bench_distill(p, ckpt, device, args, t_fwd + s_train, peaks)
        free(device)
        res["loader"] = bench_loader(p, args, Path(tmp))
    res["goals"] = goals(res)
    res["wall_s"] = time.perf_counter() - t_start
    path = args.out / f"gpu-{res['device_slug']}-{res['date']}.json"
    write_json(path, res)
    print_table(res)
    print(f"wrote {path}")
    return res


if __name__ == "__main__":
    main()
