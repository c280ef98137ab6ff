"""Projector-ensemble (PEFD) loss by hand, and through the student stage with a channel-shuffle student."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import fit
from vitkd.losses.projector_ensemble import ProjectorEnsemble, projector_ensemble_loss


def _ensemble(activation: str) -> ProjectorEnsemble:
    e = ProjectorEnsemble(2, 2, num_projectors=2, activation=activation)
    with torch.no_grad():
        e.projectors[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        e.projectors[0].bias.zero_()
        e.projectors[1].weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
        e.projectors[1].bias.copy_(torch.tensor([-3.0, 0.0]))
    return e


def test_projector_ensemble_loss_by_hand():
    f_s = torch.tensor([[1.0, 2.0], [0.0, 1.0]])
    f_t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # ReLU: sample 1 → mean([1,2], relu([-1,1])) = [.5, 1.5], cos with [1,0] = .5/√2.5; sample 2 → [0, .5], cos 1
    relu = 0.5 * ((1 - 0.5 / 2.5**0.5) + 0.0)
    assert projector_ensemble_loss(f_s, f_t, _ensemble("relu")).item() == pytest.approx(relu, abs=1e-6)
    # no activation: sample 1 → [0, 1.5], cos 0; sample 2 → mean([0,1], [-2,0]) = [-1, .5], cos .5/√1.25
    linear = 0.5 * (1.0 + (1 - 0.5 / 1.25**0.5))
    assert projector_ensemble_loss(f_s, f_t, _ensemble("none")).item() == pytest.approx(linear, abs=1e-6)


def test_shuffle_student_with_projectors_through_the_cli(tiny_teacher, tmp_path):
    m = fit(
        "--config",
        "experiments/efficient/projector.yaml",
        "--model.init_args.arch",
        "test_shuffle_patch4_16",
        "--model.init_args.teacher_ckpt",
        str(tiny_teacher),
        "--model.init_args.measure_batch_size",
        "8",
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "3",
        "--trainer.log_every_n_steps",
        "1",
        "--run_dir",
        str(tmp_path / "run"),
    )
    assert 0.0 <= m["test/acc"] <= 1.0
    assert m["gflops"] > 0 and m["images_per_s"] > 0 and m["throughput_batch_size"] == 8
    csv = (tmp_path / "run" / "metrics.csv").read_text()
    assert "train/projector" in csv
