"""The warm-up + cosine schedule, including streams whose length Lightning cannot know."""

import math
from types import SimpleNamespace

import pytest
import torch

from vitkd.stages.classifier import Classifier


@pytest.mark.parametrize("estimated, interval", [(float("inf"), "epoch"), (-1, "epoch"), (40, "step")])
def test_schedule_never_starts_at_zero_lr(estimated, interval):
    stage = Classifier(arch="test_vit_patch4_16")
    stage._trainer = SimpleNamespace(estimated_stepping_batches=estimated, max_epochs=4)
    cfg = Classifier.cosine_schedule.__get__(stage)(torch.optim.AdamW(stage.parameters(), lr=1e-3), warmup_epochs=1)
    sched = cfg["lr_scheduler"]
    assert sched["interval"] == interval
    lrs = []
    for _ in range(3):
        lrs.append(cfg["optimizer"].param_groups[0]["lr"])
        sched["scheduler"].step()
    assert all(lr > 0 for lr in lrs), lrs


def test_warmup_cosine_by_hand():
    from vitkd.stages.base import warmup_cosine

    f = warmup_cosine(total=10, warmup=4)
    # warm-up: (step + 1) / (warmup + 1), never 0
    assert [f(s) for s in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    # cosine over the 6 steps after warm-up: 1 at its start, 0.5 halfway, 0 at the end and beyond
    assert (
        f(4) == pytest.approx(1.0)
        and f(7) == pytest.approx(0.5)
        and f(10) == pytest.approx(0.0)
        and f(12) == pytest.approx(0.0)
    )
    assert f(5) == pytest.approx(0.5 * (1 + math.cos(math.pi / 6)))


def test_schedule_keeps_a_constant_group_at_its_lr():
    """The student's Q group (``q_lr``, constant) beside the scheduled model group."""
    stage = Classifier(arch="test_vit_patch4_16")
    a, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [a], "lr": 1e-3}, {"params": [q], "lr": 5e-4}])
    stage._trainer = SimpleNamespace(estimated_stepping_batches=20, max_epochs=4)  # 5 steps an epoch, 1 epoch warm-up
    cfg = stage.cosine_schedule(opt, warmup_epochs=1, constant_groups=(1,))
    lrs = []
    for _ in range(20):
        lrs.append([g["lr"] for g in opt.param_groups])
        cfg["lr_scheduler"]["scheduler"].step()
    assert cfg["lr_scheduler"]["interval"] == "step"
    assert [lr[0] for lr in lrs[:5]] == pytest.approx([1e-3 * (s + 1) / 6 for s in range(5)])
    assert lrs[5][0] == pytest.approx(1e-3) and lrs[19][0] == pytest.approx(
        1e-3 * 0.5 * (1 + math.cos(math.pi * 14 / 15))
    )
    assert all(lr[1] == 5e-4 for lr in lrs), "Q's group stays at q_lr"


def test_adam_is_fused_where_its_kernel_runs_and_steps_as_the_loop_does():
    from vitkd.stages.base import adamw, fused_ok

    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    fused, loop = (
        adamw(list(a.parameters()), lr=1e-2, weight_decay=0.05),
        torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.05),
    )
    assert fused.defaults["fused"] is True and not loop.defaults["fused"]
    for _ in range(3):
        x = torch.randn(8, 4)
        for net, opt in ((a, fused), (b, loop)):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert not adamw(list(a.parameters()), amp=True).defaults["fused"]  # Lightning's AMP clips only the loop
    assert fused_ok([{"params": [torch.zeros(2, requires_grad=True)]}])
    assert not fused_ok([torch.zeros(2, dtype=torch.int64)]) and not fused_ok([])
