"""Cost of a model: parameters, FLOPs (two labelled conventions) and measured throughput.

- ``flops``: every matmul/conv FLOP (1 multiply-add = 2 FLOPs) counted by ``torch.utils.flop_counter.FlopCounterMode``
  while the model runs one image. timm's fused attention dispatches, on CPU, to a kernel the counter does not
  know, so the count runs on a copy with ``fused_attn = False``: the attention matmuls q·kᵀ and A·v are counted.
  Norms, softmax, GELU, gathers and other element-wise work are not counted by the counter.
- ``macs_linear``: the papers' convention (thop-style): multiply-accumulates of
  ``nn.Linear`` and ``nn.Conv2d`` layers only; attention matmuls are excluded.
- ``images_per_s``: measured, inference mode, after warm-up, with the device synchronised before the clock
  starts and before it stops; the batch size, iterations, device and CPU threads are stated next to it.
"""

from __future__ import annotations

import contextlib
import copy
import platform
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from vitkd.efficient.vit_parts import unfused
from vitkd.models import count_params


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _copy_eval(model: nn.Module) -> nn.Module:
    return unfused(copy.deepcopy(model)).eval()


def flops_per_image(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Matmul/conv FLOPs (2 per multiply-add) of one forward on one image, by ``FlopCounterMode``
    (unfused attention)."""
    m = _copy_eval(model)
    x = torch.zeros(1, *input_shape, device=_device(model))
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        m(x)
    return int(counter.get_total_flops())


def linear_macs_per_image(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Papers' convention: multiply-accumulates of ``nn.Linear`` and ``nn.Conv2d`` only, one image."""
    m = _copy_eval(model)
    total = [0]

    def linear_hook(mod, inp, out):
        total[0] += out.numel() // out.shape[-1] * mod.in_features * mod.out_features

    def conv_hook(mod, inp, out):
        kh, kw = mod.kernel_size
        total[0] += out.numel() * (mod.in_channels // mod.groups) * kh * kw

    handles = []
    for mod in m.modules():
        if isinstance(mod, nn.Linear):
            handles.append(mod.register_forward_hook(linear_hook))
        elif isinstance(mod, nn.Conv2d):
            handles.append(mod.register_forward_hook(conv_hook))
    with torch.inference_mode():
        m(torch.zeros(1, *input_shape, device=_device(model)))
    for h in handles:
        h.remove()
    return int(total[0])


def sync(device: torch.device) -> None:
    """Waits for the device's queued work (CUDA, MPS), so a wall clock read after it times the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def throughput(
    model: nn.Module, input_shape: tuple[int, ...], batch_size: int = 256, warmup: int = 5, iters: int = 20
) -> dict[str, Any]:
    """Measured images/s of ``model`` in eval + inference mode on its own device (a random batch; the cost of these
    models does not depend on the pixel values except through which tokens are reduced)."""
    device = _device(model)
    was_training = model.training
    model.eval()
    x = torch.randn(batch_size, *input_shape, device=device)
    times = []
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        sync(device)
        for _ in range(iters):  # each batch timed on its own: the median resists a busy machine
            t0 = time.perf_counter()
            model(x)
            sync(device)
            times.append(time.perf_counter() - t0)
    model.train(was_training)
    times.sort()
    return {
        "images_per_s": batch_size / times[len(times) // 2],
        "images_per_s_best": batch_size / times[0],
        "throughput_timing": "median (and best) of per-batch wall times, synchronised",
        "throughput_batch_size": batch_size,
        "throughput_iters": iters,
        "throughput_warmup": warmup,
        "throughput_device": str(device),
        "throughput_threads": torch.get_num_threads(),
    }


def measure(
    model: nn.Module, input_shape: tuple[int, ...], batch_size: int = 256, warmup: int = 5, iters: int = 20
) -> dict[str, Any]:
    """All cost figures of ``model`` for a ``metrics.json`` or a summary row (labels in the module docstring)."""
    flops = flops_per_image(model, input_shape)
    out: dict[str, Any] = {
        "params": count_params(model),
        "flops": flops,
        "gflops": flops / 1e9,
        "flops_convention": (
            "FlopCounterMode matmul/conv FLOPs per image, 2 per multiply-add, attention matmuls included"
        ),
        "macs_linear": linear_macs_per_image(model, input_shape),
        "macs_linear_convention": (
            "nn.Linear + nn.Conv2d multiply-accumulates per image (thop style), attention matmuls excluded"
        ),
    }
    out.update(throughput(model, input_shape, batch_size, warmup, iters))
    return out


def cpu_model() -> str:
    """The CPU's model name as ``lscpu`` gives it (``/proc/cpuinfo``), with its widest matmul instructions
    (``cpu_matmul_isa``) where known, else what ``platform`` knows: results name the machine, and two CPUs
    of one model name can differ in those (one "AMD EPYC" with AVX-512 BF16, another with AVX2 only)."""
    with contextlib.suppress(OSError):
        info = Path("/proc/cpuinfo").read_text().splitlines()
        isa = cpu_matmul_isa(next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), []))
        for line in info:
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                return f"{name} ({isa})" if isa else name
    return platform.processor() or platform.machine()


def cpu_matmul_isa(flags: list[str]) -> str:
    """The widest matmul instructions among ``/proc/cpuinfo`` ``flags``: AMX, AVX-512 BF16, AVX-512, AVX2,
    or "" (none of them, or another architecture)."""
    have = set(flags)
    for flag, name in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX-512 BF16"), ("avx512f", "AVX-512"), ("avx2", "AVX2")):
        if flag in have:
            return name
    return ""
