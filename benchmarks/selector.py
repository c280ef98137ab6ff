"""The selector's scoring rate: ``AttentionProbeSelector`` against the reference-style scoring loop."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import autocast, rate, timed
from benchmarks.reference import HookedAttention, reference_model, reference_scores
from vitkd.stages import AttentionProbeSelector


def bench_selector(p: dict, teacher_ckpt: Path, device: torch.device, warmup: int, iters: int) -> dict[str, Any]:
    """Scoring images/s of vitkd and the reference loop, both at each batch size measured; the ratio is taken
    at equal batch (the batch size itself is free: the best one for each side is reported).

    vitkd variants: ``fp32``; ``bf16`` autocast (``--trainer.precision bf16-mixed``); ``bf16_true``, the frozen
    teacher's weights and inputs in bf16 (``--trainer.precision bf16-true``: no per-op weight casts, the
    probe and V still in fp32); ``bf16_true_compiled`` (and ``--model.init_args.compile true``: torch.compile
    with inductor's weight freezing)."""
    lambda_a = [0.05] * len(p["probe_blocks"])
    sel = AttentionProbeSelector(
        teacher_ckpt=str(teacher_ckpt),
        teacher_arch=p["teacher"],
        num_keep=1,
        img_size=p["img_size"],
        in_chans=p["in_chans"],
        num_classes=p["num_classes"],
        probe_blocks=p["probe_blocks"],
        probe_head="mean",
        lambda_a=lambda_a,
    ).to(device)
    shape = (p["in_chans"], p["img_size"], p["img_size"])
    big, ref_b = p["select_batch"][device.type], p["ref_select_batch"]
    batches = sorted({big, ref_b})
    x = torch.randn(max(batches), *shape, device=device)

    def vitkd_fn(b: int, precision: str, score=None):
        xb = x[:b].to(torch.bfloat16) if precision == "bf16_true" else x[:b]
        amp = "fp32" if precision == "bf16_true" else precision
        score = score or sel.score

        def fn():  # what predict_step does per batch: score, then columns to host numpy
            with torch.inference_mode(), autocast(device, amp):
                cols = score(xb)
            return {k: v.float().cpu().numpy() for k, v in cols.items()}

        return fn

    ref = reference_model(sel.teacher).eval()
    hooks = HookedAttention(ref, p["probe_blocks"])

    def ref_fn(b: int):
        def fn():
            with torch.no_grad():
                return reference_scores(ref, hooks, x[:b], p["probe_blocks"], "mean", lambda_a, 0.9)

        return fn

    def time_vitkd(key: str, b: int, variant: str, *args) -> None:
        out[key] = rate(timed(vitkd_fn(b, *args), device, warmup, iters), b)
        timings[key] = (b, variant)

    out: dict[str, Any] = {"vitkd_batch": big, "reference_batch": ref_b, "batches": batches}
    # both sides compute the same values: a check that the comparison is fair
    a, r = vitkd_fn(min(batches), "fp32")(), ref_fn(min(batches))()
    out["value_max_abs_diff_vs_reference"] = float(abs(a["value"] - r["value"].numpy()).max())
    timings: dict[str, tuple[int, str]] = {}  # key -> (batch, variant)
    for b in batches:
        out[f"reference_b{b}"] = rate(timed(ref_fn(b), device, warmup, iters), b)
        for q in ("fp32", "bf16"):
            time_vitkd(f"vitkd_{q}_b{b}", b, q, q)
    sel.to(torch.bfloat16)  # what Lightning's bf16-true precision does to the module
    for b in batches:
        time_vitkd(f"vitkd_bf16_true_b{b}", b, "bf16-true", "bf16_true")
    # --model.init_args.compile true (torch.compile with weight freezing) on the bf16-true module
    comp = AttentionProbeSelector(**{**sel.hparams, "compile": True}).to(device).to(torch.bfloat16)
    out["compile_s"] = {}
    for b in batches:
        t0 = time.perf_counter()
        vitkd_fn(b, "bf16_true", comp._score)()
        out["compile_s"][str(b)] = time.perf_counter() - t0
        time_vitkd(
            f"vitkd_bf16_true_compiled_b{b}", b, "bf16-true, torch.compile (weight freezing)", "bf16_true", comp._score
        )
    sel.float()
    hooks.remove()
    ratios = {k: out[k]["images_per_s"] / out[f"reference_b{b}"]["images_per_s"] for k, (b, _) in timings.items()}
    best = max(ratios, key=ratios.get)
    b, variant = timings[best]
    out["vitkd_best"], out["vitkd_best_key"] = out[best], best
    variant = "bf16 autocast" if variant == "bf16" else variant
    out["vitkd_best_config"] = (
        f"{variant}, batch {b}, inference_mode, fused attention, probe on probed blocks' CLS row only"
    )
    out["reference"] = out[f"reference_b{b}"]
    out["speedup_ratio"] = ratios[best]  # at equal batch
    fastest_ref = max(out[f"reference_b{n}"]["images_per_s"] for n in batches)
    fastest_vitkd = max(out[k]["images_per_s"] for k in timings)
    out["speedup_ratio_fastest_vs_fastest"] = fastest_vitkd / fastest_ref
    out["speedup_ratio_fp32"] = max(
        out[f"vitkd_fp32_b{n}"]["images_per_s"] / out[f"reference_b{n}"]["images_per_s"] for n in batches
    )
    return out
