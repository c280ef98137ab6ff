"""The distillation base, the grouped loss weights and the stage-data contract (``vitkd.data_contract``)."""

import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from data_modules import DigitsDataModule, FashionMNISTDataModule, ShardDataModule
from vitkd.data_contract import (
    DataFreeData,
    KeyedTrainData,
    ReportingData,
    ScoringData,
    StageData,
    missing,
    require,
)
from vitkd.errors import VitkdInputError
from vitkd.models import create_model
from vitkd.stages import (
    DataFreeGAN,
    DistillationStage,
    GeneratorLossWeights,
    IdleViTFinetune,
    IdleViTLossWeights,
    ProbeDistillation,
    ProbeLossWeights,
)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vitkd.fit", *args], capture_output=True, text=True, timeout=300, check=False
    )


def _error_line(proc) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("vitkd: error:")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


@pytest.mark.parametrize("cls", [DigitsDataModule, FashionMNISTDataModule, ShardDataModule])
def test_the_data_modules_implement_every_protocol(cls):
    dm = cls()
    for protocol in (StageData, KeyedTrainData, DataFreeData, ScoringData, ReportingData):
        assert isinstance(dm, protocol) and missing(dm, protocol) == [], protocol.__name__
    assert dm.train_keys is False
    dm.request_train_keys()
    assert dm.train_keys is True


class _LoadersOnly:
    """A data module with the three loaders and nothing else a distillation stage may ask for."""

    num_workers = 0

    def train_dataloader(self): ...

    def val_dataloader(self): ...

    def test_dataloader(self): ...

    def on_after_batch_transfer(self, batch, dataloader_idx): ...


def test_a_wrong_data_module_is_named_in_one_line():
    assert require(_LoadersOnly(), StageData, "Classifier") is not None
    with pytest.raises(VitkdInputError) as err:
        require(_LoadersOnly(), DataFreeData, "DataFreeGAN")
    msg = str(err.value)
    assert "\n" not in msg and "_LoadersOnly" in msg and "DataFreeGAN" in msg
    assert "train_urls, labelled_val_dataloader(), train_stream() (DataFreeData)" in msg
    with pytest.raises(VitkdInputError, match="needs a data module"):
        require(None, StageData, "Classifier")


def test_teacher_cache_asks_for_keyed_batches_through_the_protocol(tiny_teacher):
    stage = ProbeDistillation(
        arch="test_vit_patch4_16",
        teacher_ckpt=str(tiny_teacher),
        q_diagonal=0.9,
        probe_pairs=[(0, 0)],
        teacher_cache=True,
    )
    assert stage.data_contract is KeyedTrainData
    missing = r"augment, request_train_keys\(\), train_inputs_id\(\)"
    with pytest.raises(VitkdInputError, match=f"teacher_cache true needs a data module with {missing}"):
        stage.check_data(_LoadersOnly())
    with pytest.raises(VitkdInputError, match="augment false"):
        stage.check_data(DigitsDataModule(augment=True))
    stage.check_data(DigitsDataModule(augment=False))
    stage.check_data(DigitsDataModule(augment=True, augment_views=4))  # fixed views come back unchanged
    with pytest.raises(VitkdInputError, match="teacher_cache_file .* set --model.init_args.teacher_cache true"):
        ProbeDistillation(
            arch="test_vit_patch4_16",
            teacher_ckpt=str(tiny_teacher),
            q_diagonal=0.9,
            probe_pairs=[(0, 0)],
            teacher_cache_file="outputs.pt",
        )
    plain = ProbeDistillation(
        arch="test_vit_patch4_16", teacher_ckpt=str(tiny_teacher), q_diagonal=0.9, probe_pairs=[(0, 0)]
    )
    assert plain.data_contract is StageData
    plain.check_data(_LoadersOnly())


def test_every_distillation_stage_holds_a_frozen_teacher(tiny_teacher):
    stages = [
        ProbeDistillation(
            arch="test_vit_patch4_16", teacher_ckpt=str(tiny_teacher), q_diagonal=0.9, probe_pairs=[(0, 0)]
        ),
        DataFreeGAN(
            arch="test_vit_patch4_16", teacher_ckpt=str(tiny_teacher), generator="dafl", generator_kwargs={"width": 8}
        ),
        IdleViTFinetune(teacher_ckpt=str(tiny_teacher), keep_ratio=0.5, idle_layers=[1]),
    ]
    for stage in stages:
        assert isinstance(stage, DistillationStage)
        stage.train()
        assert not stage.teacher.training and stage.model.training
        assert not any(p.requires_grad for p in stage.teacher.parameters())
        assert any(p.requires_grad for p in stage.model.parameters())
        ckpt = {"state_dict": stage.state_dict()}
        stage.on_save_checkpoint(ckpt)
        assert ckpt["state_dict"] and not any(k.startswith("teacher.") for k in ckpt["state_dict"])


def test_the_student_draws_its_initial_weights_before_the_teacher_is_loaded(tiny_teacher):
    """A seeded run starts from the same student whatever the teacher: the student is built first."""
    pl.seed_everything(0)
    stage = DataFreeGAN(
        arch="test_vit_patch4_16", teacher_ckpt=str(tiny_teacher), generator="dafl", generator_kwargs={"width": 8}
    )
    pl.seed_everything(0)
    ref = create_model("test_vit_patch4_16", img_size=16, in_chans=1, num_classes=10)
    got = stage.model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in ref.state_dict().items())
    pl.seed_everything(1)
    other = create_model("test_vit_patch4_16", img_size=16, in_chans=1, num_classes=10)
    assert not torch.equal(other.state_dict()["head.weight"], got["head.weight"])


def test_loss_weights_scale_their_terms(tiny_teacher):
    """Doubling a group's field doubles that term and leaves the others (the weights are read from the group)."""
    x, y = torch.rand(4, 1, 16, 16) * 2 - 1, torch.arange(4)
    kw = {"arch": "test_vit_patch4_16", "teacher_ckpt": str(tiny_teacher), "q_diagonal": 0.9, "probe_pairs": [(0, 0)]}
    torch.manual_seed(0)
    one = ProbeDistillation(**kw, loss_weights=ProbeLossWeights(ce=1.0, alpha=1.0, beta=1.0)).losses(x, y)
    torch.manual_seed(0)
    two = ProbeDistillation(**kw, loss_weights=ProbeLossWeights(ce=1.0, alpha=2.0, beta=1.0)).losses(x, y)
    assert set(one) == set(two) == {"ce", "probe", "kd"}
    assert two["probe"].item() == pytest.approx(2 * one["probe"].item(), rel=1e-5) and one["probe"].item() > 0
    assert two["kd"].item() == pytest.approx(one["kd"].item(), rel=1e-5)
    torch.manual_seed(0)
    idle = IdleViTFinetune(
        teacher_ckpt=str(tiny_teacher),
        keep_ratio=0.5,
        idle_layers=[1],
        loss_weights=IdleViTLossWeights(cut=0.0, feat=0.0),
    )
    assert set(idle.losses(x, y)) == {"ce", "kd"}
    with pytest.raises(VitkdInputError, match=r"loss_weights\.\{ce,alpha,beta,projector\}"):
        ProbeDistillation(**kw, loss_weights=ProbeLossWeights(ce=0.0, alpha=0.0, beta=0.0))
    assert GeneratorLossWeights().ie == 5.0  # DAFL's MNIST setting


def test_print_config_shows_the_weight_groups_as_nested_keys():
    out = subprocess.run(
        [sys.executable, "-m", "vitkd.fit", "--config", "experiments/generator/dafl.yaml", "--print_config"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "    generator_weights:\n      oh: 1.0\n      ie: 5.0\n      act: 0.1\n" in out.stdout
    assert "    student_weights:\n      kd: 1.0\n      ce: 1.0\n      patch: 0.0\n" in out.stdout


def test_a_weight_field_typo_in_a_config_is_one_line(tmp_path):
    cfg = tmp_path / "typo.yaml"
    text = Path("experiments/digits/dfnd.yaml").read_text()
    assert "      alpha: 0.0\n" in text
    cfg.write_text(text.replace("      alpha: 0.0\n", "      alpah: 0.0\n"))
    line = _error_line(_cli("--config", str(cfg), "--run_dir", str(tmp_path / "run")))
    assert "loss_weights" in line and "alpah" in line, line
    assert not (tmp_path / "run").exists()


def test_a_weight_field_typo_on_the_command_line_is_one_line(tmp_path):
    args = ("--config", "experiments/digits/dfnd.yaml", "--model.init_args.loss_weights.alpah", "0.5")
    line = _error_line(_cli(*args, "--run_dir", str(tmp_path / "run")))
    assert "unrecognized arguments" in line and "loss_weights.alpah" in line, line
    assert not (tmp_path / "run").exists()


def test_weight_groups_are_plain_numbers_in_the_hyper_parameters(tiny_teacher):
    """hparams.yaml and the checkpoints hold each group as a dict (no pickled class); the stage rebuilds from them."""
    stage = ProbeDistillation(
        arch="test_vit_patch4_16",
        teacher_ckpt=str(tiny_teacher),
        q_diagonal=0.9,
        probe_pairs=[(0, 0)],
        loss_weights=ProbeLossWeights(alpha=0.5),
    )
    assert stage.hparams.loss_weights == {"ce": 1.0, "alpha": 0.5, "beta": 1.0, "projector": 0.0}
    assert stage.hparams_initial.loss_weights == stage.hparams.loss_weights
    again = ProbeDistillation(**stage.hparams)
    assert again.weights == ProbeLossWeights(alpha=0.5)
    gan = DataFreeGAN(
        arch="test_vit_patch4_16",
        teacher_ckpt=str(tiny_teacher),
        generator="dafl",
        generator_kwargs={"width": 8},
        generator_weights=GeneratorLossWeights(act=0.0),
    )
    assert gan.hparams.generator_weights["act"] == 0.0 and gan.hparams.student_weights == {
        "kd": 1.0,
        "ce": 1.0,
        "patch": 0.0,
    }
