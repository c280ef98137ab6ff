"""The warm-up + cosine schedule, including streams whose length Lightning cannot know."""
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
