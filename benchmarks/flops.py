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


def bench_flops(p: dict, device: torch.device, sel: dict, dis: dict, peak: float) -> dict[str, Any]:
    """FLOPs per image and achieved FLOP/s of the rates ``bench_selector`` (``sel``) and ``bench_distill``
    (``dis``) measured, as fractions of ``peak`` (the bf16 matmul peak)."""
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
    for name, fl, r in (
        ("selector_vitkd", t_fwd, sel["vitkd_best"]),
        ("selector_reference", t_fwd, sel["reference"]),
        # achieved FLOP/s of the step that does all of its FLOPs (the cached step skips the teacher's)
        ("distill_vitkd", step, dis["vitkd_teacher_every_step_best"]),
        ("distill_reference", step, dis["reference"]),
    ):
        out[f"{name}_flop_per_s"] = fl * r["images_per_s"]
        out[f"{name}_fraction_of_bf16_peak"] = fl * r["images_per_s"] / peak
    return out
