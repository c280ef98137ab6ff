"""FLOPs per image of the selector's and the distillation step's models, and the fraction of this device's
matmul peak (measured here too) that the timed rates achieve."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import timed
from vitkd.efficient.measure import flops_per_image
from vitkd.efficient.vit_parts import unfused
from vitkd.models import create_model


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 4096, reps: int = 5) -> dict[str, float]:
    """Best FLOP/s of an n×n×n matmul in ``dtype`` on ``device`` (2n³ FLOPs per product)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    t = timed(lambda: a @ b, device, warmup=1, iters=reps)
    return {"n": n, "reps": reps, "flop_per_s": 2 * n**3 / t["best_s"], "median_flop_per_s": 2 * n**3 / t["median_s"]}


def train_flops_per_image(model: torch.nn.Module, input_shape: tuple[int, ...]) -> int:
    """Matmul/conv FLOPs of one forward + backward on one image (unfused attention, so the counter sees it)."""
    m = unfused(copy.deepcopy(model)).train()
    x = torch.zeros(1, *input_shape, device=next(m.parameters()).device)
    counter = FlopCounterMode(display=False)
    with counter:
        m(x).float().sum().backward()
    return int(counter.get_total_flops())


def peak_share(images_per_s: float, parts: list[tuple[int, float]]) -> float:
    """The share of the machine's peak a rate reaches at the precisions it runs at: the time its FLOPs would take
    at the matmul peak of each part's precision (``parts``: FLOPs per image, that precision's peak FLOP/s) over
    the time they took. One part at one precision: achieved FLOP/s over that peak."""
    return images_per_s * sum(fl / peak for fl, peak in parts)


def bench_flops(p: dict, device: torch.device, sel: dict, dis: dict, peaks: dict[str, float]) -> dict[str, Any]:
    """FLOPs per image and achieved FLOP/s of the rates ``bench_selector`` (``sel``) and ``bench_distill``
    (``dis``) measured, each as a share of the matmul peak at the precision it ran at (``peaks``: ``bf16`` and
    ``fp32`` FLOP/s), and of the bf16 peak."""
    shape = (p["in_chans"], p["img_size"], p["img_size"])
    kw = dict(img_size=p["img_size"], in_chans=p["in_chans"], num_classes=p["num_classes"])
    teacher, student = create_model(p["teacher"], **kw).to(device), create_model(p["student"], **kw).to(device)
    t_fwd, s_train = flops_per_image(teacher, shape), train_flops_per_image(student, shape)
    step = t_fwd + s_train
    out = {
        "teacher_forward_flops_per_image": t_fwd,
        "student_forward_backward_flops_per_image": s_train,
        "distill_step_flops_per_image": step,
        "convention": "torch.utils.flop_counter matmul/conv FLOPs (2 per multiply-add), unfused attention; "
        "the probe and losses are not counted",
    }
    sel_prec = "fp32" if "fp32" in sel["vitkd_best_key"] else "bf16"
    t_prec, s_prec = dis["teacher_every_step_best_precisions"]
    for name, fl, r, parts in (
        ("selector_vitkd", t_fwd, sel["vitkd_best"], [(t_fwd, sel_prec)]),
        ("selector_reference", t_fwd, sel["reference"], [(t_fwd, "fp32")]),
        # the step that does all of its FLOPs (with augmentation the teacher runs every step; the cache skips it)
        ("distill_vitkd", step, dis["vitkd_teacher_every_step_best"], [(t_fwd, t_prec), (s_train, s_prec)]),
        ("distill_reference", step, dis["reference"], [(t_fwd, "fp32"), (s_train, "fp32")]),
    ):
        out[f"{name}_flop_per_s"] = fl * r["images_per_s"]
        out[f"{name}_fraction_of_bf16_peak"] = fl * r["images_per_s"] / peaks["bf16"]
        out[f"{name}_fraction_of_peak"] = peak_share(r["images_per_s"], [(f, peaks[q]) for f, q in parts])
        out[f"{name}_peak_precision"] = "/".join(dict.fromkeys(q for _, q in parts))
    return out
