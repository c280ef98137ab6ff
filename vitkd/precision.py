"""``precision: auto``: the trainer's precision (and ``teacher_bf16: auto``) chosen by timing the run's own nets.

Whether bf16 pays depends on the device, not on the model alone: an Intel CPU with AMX runs bf16 matmuls
several times faster than fp32, an AMD CPU without AMX barely faster, and small nets lose to autocast's casts
on either. So the first run on a device times a few steps of its nets at each precision, interleaved, and
keeps the faster; a GPU that supports bf16 gets ``bf16-mixed`` without timing. Nets with timm attention blocks
are also timed with the plain softmax(QKᵀ)V product in place of the fused kernel
(``F.scaled_dot_product_attention``): on a CPU, for the few tokens of small inputs, the fused kernel can be the
slower one; a GPU keeps it. The decision is cached by
device and model shape in ``$XDG_CACHE_HOME/vitkd/precision.json`` (default ``~/.cache``), so later runs
start at once. Written by hand: Lightning takes a precision, it does not choose one.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import json
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitkd.efficient.measure import cpu_model, sync
from vitkd.efficient.vit_parts import attention_blocks
from vitkd.io import write_json

AUTO = "auto"
MATH_ATTENTION = "+math_attention"  # an option's suffix: timm's attention blocks without the fused kernel
TRAIN_CANDIDATES = ("32-true", "bf16-mixed")
INFERENCE_CANDIDATES = ("32-true", "bf16-mixed", "bf16-true")


@dataclass
class TimedNet:
    """One net of a run, timed for the precision choice: ``shape``, one input sample's (an image's ``(C, H, W)``,
    a generator's ``(latent_dim,)``); ``train``: timed forward+backward (a net the run trains, or one its
    gradients pass through), else forward only."""

    name: str
    module: nn.Module
    shape: tuple[int, ...]
    train: bool


@dataclass
class PrecisionChoice:
    """What ``choose_precision`` decided, and from what: ``seconds[option][net]``, the median time of one step of
    each net (``option``: a trainer precision, or ``32-true+teacher_bf16``)."""

    precision: str
    teacher_bf16: bool | None
    device: str
    key: str
    reason: str
    seconds: dict[str, dict[str, float]] = field(default_factory=dict)
    cached: bool = False
    fused_attention: bool | None = None  # None: no timm attention block among the nets, nothing chosen

    def line(self, cache: Path | None) -> str:
        """The one line a run prints."""
        teacher = "" if self.teacher_bf16 is None else f", teacher_bf16 {str(self.teacher_bf16).lower()}"
        teacher += ", plain attention" if self.fused_attention is False else ""
        where = f"cached in {cache}" if cache is not None and not self.cached else f"from {cache}" if cache else ""
        timed = ", ".join(f"{opt} {1e3 * sum(t.values()):.1f} ms" for opt, t in self.seconds.items())
        why = f"{timed} per step" if timed else self.reason
        return f"vitkd: precision auto -> {self.precision}{teacher} on {self.device} ({why}; {where})".replace(
            "; )", ")"
        )


def cache_file() -> Path:
    """``$XDG_CACHE_HOME/vitkd/precision.json``, or ``~/.cache/vitkd/precision.json``."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "vitkd" / "precision.json"


def device_name(device: torch.device) -> str:
    """The device as a person names it: the GPU's name, or the CPU's model with the threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    return f"{cpu_model()}, {torch.get_num_threads()} threads"


def shape_key(stage: str, nets: Sequence[TimedNet], batch: int, options: Sequence[str]) -> str:
    """What the decision depends on besides the device: the stage, each net's class, size and input, the batch,
    the options weighed and torch's version."""
    parts = [stage, f"batch {batch}", f"torch {torch.__version__}", "/".join(options)]
    for n in nets:
        params = sum(p.numel() for p in n.module.parameters())
        parts.append(f"{n.name}:{type(n.module).__name__}:{params}:{tuple(n.shape)}:{'train' if n.train else 'eval'}")
    return " | ".join(parts)


# -- timing ----------------------------------------------------------------------------------------
def _float_sum(out: Any) -> torch.Tensor | None:
    """The sum of every floating tensor in a net's output (a tensor, or dicts/lists/tuples of them): one scalar
    to run backward from, whatever the net returns."""
    if isinstance(out, torch.Tensor):
        return out.float().sum() if out.is_floating_point() else None
    items = out.values() if isinstance(out, dict) else out if isinstance(out, (list, tuple)) else []
    terms = [t for t in map(_float_sum, items) if t is not None]
    return sum(terms[1:], terms[0]) if terms else None


@contextlib.contextmanager
def _untouched(module: nn.Module) -> Iterator[None]:
    """Leaves ``module`` as it was: its train/eval mode, its buffers (batch-norm statistics), no gradients,
    and the global RNG (dropout draws from it), so a seeded run is the same run with or without the timing."""
    modes = {m: m.training for m in module.modules()}
    buffers = {k: v.clone() for k, v in module.state_dict().items() if not isinstance(v, nn.Parameter)}
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            for m, mode in modes.items():
                m.training = mode
            with torch.no_grad():
                own = module.state_dict()
                for k, v in buffers.items():
                    own[k].copy_(v)
            for p in module.parameters():
                p.grad = None


@contextlib.contextmanager
def _attention(module: nn.Module, fused: bool | None) -> Iterator[None]:
    """``module``'s attention blocks fused or not for a timed step (``None``: as they are), then as they were."""
    blocks = attention_blocks(module) if fused is not None else []
    before = [m.fused_attn for m in blocks]
    try:
        for m in blocks:
            m.fused_attn = fused
        yield
    finally:
        for m, was in zip(blocks, before):
            m.fused_attn = was


def _step(net: nn.Module, x: torch.Tensor, train: bool, option: str) -> None:
    autocast = (
        torch.autocast(x.device.type, dtype=torch.bfloat16) if option == "bf16-mixed" else contextlib.nullcontext()
    )
    if train:
        x = x.detach().requires_grad_(x.is_floating_point())  # gradients reach the input, as a generator's do
        with autocast:
            loss = _float_sum(net(x))
        if loss is not None and loss.requires_grad:
            loss.backward()
    else:
        with torch.no_grad(), autocast:
            net(x)


def time_steps(
    nets: Sequence[TimedNet],
    options: dict[str, dict[str, str]],
    batch: int,
    device: torch.device,
    budget_s: float = 4.0,
    rounds: tuple[int, int] = (3, 9),
    prune: float = 1.5,
) -> dict[str, dict[str, float]]:
    """Median seconds of one step of each net under each option, ``seconds[option][net]``.

    ``options[option][net]`` is the precision the net runs at under that option (``32-true``, ``bf16-mixed``:
    bf16 autocast, ``bf16-true``: weights and inputs in bf16); an option ending in ``MATH_ATTENTION`` runs the
    nets' timm attention blocks without the fused kernel. Each (option, net) is run once to warm up, then
    the options are timed in turns, round after round (at least ``rounds[0]``, at most ``rounds[1]``, until
    ``budget_s`` has passed), so a machine busy with something else slows every option alike. An option more than
    ``2 * prune`` times slower than the fastest in the warm-up, or ``prune`` times in the first round, is not
    timed again (its last time is returned): a step of a hopeless option can take longer than every other
    option's together."""
    gen = torch.Generator().manual_seed(0)  # inputs drawn from a local generator, never the global RNG
    inputs = {n.name: torch.randn((batch, *n.shape), generator=gen).to(device) for n in nets}
    runs: dict[tuple[str, str], Callable[[], None]] = {}
    stack = contextlib.ExitStack()
    with stack:
        true_copies: dict[str, nn.Module] = {}
        for n in nets:
            stack.enter_context(_untouched(n.module))
            n.module.train(n.train)
        for opt, per_net in options.items():
            for n in nets:
                prec = per_net[n.name]
                if prec == "bf16-true":
                    if n.name not in true_copies:
                        true_copies[n.name] = copy.deepcopy(n.module).to(torch.bfloat16)
                    net, x = true_copies[n.name], inputs[n.name].to(torch.bfloat16)
                else:
                    net, x = n.module, inputs[n.name]
                fused = False if opt.endswith(MATH_ATTENTION) else None

                def run(net=net, x=x, train=n.train, prec=prec, fused=fused) -> None:
                    with _attention(net, fused):
                        _step(net, x, train, prec)

                runs[(opt, n.name)] = run
        samples: dict[tuple[str, str], list[float]] = {k: [] for k in runs}
        warm: dict[tuple[str, str], float] = {}
        for k, run in runs.items():  # warm-up: first-call allocations and kernel choices
            t0 = time.perf_counter()
            run()
            sync(device)
            warm[k] = time.perf_counter() - t0
        t_start = time.perf_counter()
        dropped = _slow({opt: sum(warm[(opt, n.name)] for n in nets) for opt in options}, 2 * prune)
        for k in runs:
            if k[0] in dropped:
                samples[k].append(warm[k])
        for r in range(rounds[1]):
            for k, run in runs.items():
                if k[0] in dropped:
                    continue
                t0 = time.perf_counter()
                run()
                sync(device)
                samples[k].append(time.perf_counter() - t0)
            if r == 0:
                dropped |= _slow({opt: sum(samples[(opt, n.name)][-1] for n in nets) for opt in options}, prune)
            if r + 1 >= rounds[0] and time.perf_counter() - t_start > budget_s:
                break
    seconds: dict[str, dict[str, float]] = {}
    for (opt, name), ts in samples.items():
        seconds.setdefault(opt, {})[name] = statistics.median(ts)
    return seconds


def _slow(totals: dict[str, float], factor: float) -> set[str]:
    """The options whose step took more than ``factor`` times the fastest's."""
    best = min(totals.values())
    return {opt for opt, t in totals.items() if t > factor * best}


# -- the choice ------------------------------------------------------------------------------------
def options_for(
    nets: Sequence[TimedNet],
    trainer_auto: bool,
    trainer_precision: str,
    teacher: str | None,
    teacher_bf16: bool | str | None,
) -> dict[str, dict[str, str]]:
    """The options weighed: each trainer precision (every net at it) when the trainer's is ``auto``, else the
    given one; with ``teacher_bf16: auto`` (net ``teacher``), also fp32 with the teacher alone in bf16; and when
    a net has timm attention blocks, each of those again with the plain attention product (``MATH_ATTENTION``)."""
    train = any(n.train for n in nets)
    precisions = (TRAIN_CANDIDATES if train else INFERENCE_CANDIDATES) if trainer_auto else (trainer_precision,)
    fixed_teacher = teacher_bf16 if isinstance(teacher_bf16, bool) else None
    options: dict[str, dict[str, str]] = {}
    for prec in precisions:
        per_net = {n.name: prec for n in nets}
        if prec == "32-true" and teacher is not None and fixed_teacher:
            per_net[teacher] = "bf16-mixed"
        options[prec] = per_net
    if teacher is not None and teacher_bf16 == AUTO and any(p not in ("bf16-mixed", "bf16-true") for p in precisions):
        base = "32-true" if "32-true" in precisions else precisions[0]
        options[f"{base}+teacher_bf16"] = {**options[base], teacher: "bf16-mixed"}
    if any(attention_blocks(n.module) for n in nets):
        options.update({opt + MATH_ATTENTION: per_net for opt, per_net in list(options.items())})
    return options


def pick(seconds: dict[str, dict[str, float]]) -> str:
    """The option whose step (the sum over its nets) is fastest."""
    return min(seconds, key=lambda opt: sum(seconds[opt].values()))


def choose_precision(
    stage: str,
    nets: Sequence[TimedNet],
    batch: int,
    device: torch.device,
    trainer_precision: str = AUTO,
    teacher_bf16: bool | str | None = None,
    teacher: str | None = "teacher",
    cache: Path | None = None,
    timer: Callable[..., dict[str, dict[str, float]]] | None = None,
    processes: int = 1,
) -> PrecisionChoice:
    """The trainer precision for ``precision: auto`` (``trainer_precision``, else the given one kept) and, with
    ``teacher_bf16: auto``, whether the teacher's forward runs in bf16 under an fp32 trainer. ``timer``: how
    the options are timed (default ``time_steps``).

    A CUDA device that supports bf16 gets ``bf16-mixed`` (and the teacher with it) untimed. Elsewhere ``timer``
    times the options (``time_steps``) unless ``cache`` holds this device and shape; the decision is then
    written there. With several processes (``processes`` > 1, e.g. one per device of a DDP run) and nothing
    cached, each would time on its own and might choose differently, so they take ``32-true`` and say so."""
    trainer_auto = trainer_precision == AUTO
    teacher = teacher if teacher is not None and any(n.name == teacher for n in nets) else None
    teacher_auto = teacher is not None and teacher_bf16 == AUTO
    name = device_name(device)
    options = options_for(nets, trainer_auto, trainer_precision, teacher, teacher_bf16)
    key = f"{name} || {shape_key(stage, nets, batch, list(options))}"

    attention = any(attention_blocks(n.module) for n in nets)

    def decided(opt: str, reason: str, seconds=None, cached=False) -> PrecisionChoice:
        prec = opt.split("+")[0]
        # under a bf16 trainer precision the teacher runs in bf16 already
        t_bf16 = "+teacher_bf16" in opt if teacher_auto else None
        fused = not opt.endswith(MATH_ATTENTION) if attention else None
        return PrecisionChoice(prec, t_bf16, name, key, reason, seconds or {}, cached, fused)

    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        prec = ("bf16-mixed" if bf16 else "32-true") if trainer_auto else trainer_precision
        opt = f"{prec}+teacher_bf16" if bf16 and teacher_auto and not prec.startswith("bf16") else prec
        return decided(opt, "the GPU supports bf16" if bf16 else "the GPU has no bf16")
    if len(options) == 1:
        return decided(next(iter(options)), "nothing to choose")
    entries = _read(cache) if cache is not None else {}
    if key in entries and entries[key].get("option") in options:
        e = entries[key]
        return decided(e["option"], f"measured {e.get('date', '')}", e.get("seconds"), cached=True)
    if processes > 1:
        return decided(
            "32-true" if trainer_auto else trainer_precision,
            f"{processes} processes and no cached timing: run once with one process to measure",
        )
    seconds = (timer or time_steps)(nets, options, batch, device)
    opt = pick(seconds)
    if cache is not None:
        entries = _read(cache)  # another run may have written since
        entries[key] = {"option": opt, "seconds": seconds, "date": dt.date.today().isoformat()}
        with contextlib.suppress(OSError):  # a read-only home loses the cache, not the run
            write_json(cache, entries)
    return decided(opt, "measured", seconds)


def _read(path: Path) -> dict[str, Any]:
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):  # absent, or unreadable: measured again and rewritten
        return {}
    return entries if isinstance(entries, dict) else {}


def as_record(choice: PrecisionChoice) -> dict[str, Any]:
    """The decision as ``metrics.json`` records it."""
    rec = asdict(choice)
    rec.pop("key")
    return rec


def choose_for_stage(
    stage: nn.Module,
    batch: int,
    device: torch.device,
    trainer_precision: str,
    processes: int = 1,
    timer: Callable[..., dict[str, dict[str, float]]] | None = None,
) -> PrecisionChoice:
    """``choose_precision`` for a stage's own nets (its ``timed_nets()``) and its ``teacher_bf16``, cached in
    ``cache_file()``; the nets are timed on ``device`` and left where they were."""
    nets = stage.timed_nets()
    homes = {n.name: next(n.module.parameters()).device for n in nets if any(True for _ in n.module.parameters())}
    if device.type not in ("cpu", "cuda"):  # timed where the run will train (MPS); CUDA is not timed
        for n in nets:
            n.module.to(device)
    try:
        return choose_precision(
            type(stage).__name__,
            nets,
            batch,
            device,
            trainer_precision,
            getattr(stage, "teacher_bf16", None),
            cache=cache_file(),
            timer=timer,
            processes=processes,
        )
    finally:
        for n in nets:
            if n.name in homes:
                n.module.to(homes[n.name])


def choose_teacher_bf16(stage: nn.Module, x: torch.Tensor) -> PrecisionChoice:
    """``teacher_bf16: auto`` decided on the first batch ``x`` when no ``vitkd.fit`` run decided it before (a
    trainer built by hand); under bf16 autocast the teacher is in bf16 already, so it stays off."""
    if torch.is_autocast_enabled(x.device.type):
        return PrecisionChoice("bf16-mixed", False, device_name(x.device), "", "bf16 autocast already on")
    nets = [n for n in stage.timed_nets() if n.name == "teacher"]
    choice = choose_precision(type(stage).__name__, nets, len(x), x.device, "32-true", AUTO, cache=cache_file())
    print(choice.line(cache_file()), flush=True)
    return choice
