"""Fast-DFKD's meta-synthesis round and memory bank, the total-variation prior, the batch-statistics mode of
the generator's batch norms, and the ``fast`` synthesizer and the validation modes of the stage through the CLI."""

import copy

import lightning.pytorch as pl
import pytest
import torch

from tests.conftest import fit
from tests.test_generator_stage import tiny_args
from vitkd.errors import VitkdInputError
from vitkd.generators import DAFLGenerator, MemoryBank, meta_synthesize
from vitkd.losses.dafl import dafl_loss
from vitkd.losses.data_free import total_variation_loss
from vitkd.models import create_model
from vitkd.stages.data_free import (
    DataFreeGAN,
    GeneratorLossWeights,
    StudentLossWeights,
    batch_statistics,
    has_batch_norm,
)

FAST = [
    "--model.init_args.synthesizer",
    "fast",
    "--model.init_args.fast_inner_steps",
    "2",
    "--model.init_args.fast_synth_every",
    "2",
    "--model.init_args.steps_per_epoch",
    "3",
    "--model.init_args.fast_bank_batches",
    "2",
]


# -- total variation ------------------------------------------------------------------------------
def test_total_variation_by_hand():
    x = torch.tensor([[[[0.0, 1.0, 3.0], [2.0, 2.0, -1.0]]]])  # 1×1×2×3
    vertical = (abs(2.0 - 0.0) + abs(2.0 - 1.0) + abs(-1.0 - 3.0)) / 3  # 3 row differences
    horizontal = (abs(1.0 - 0.0) + abs(3.0 - 1.0) + abs(2.0 - 2.0) + abs(-1.0 - 2.0)) / 4  # 4 column differences
    assert total_variation_loss(x).item() == pytest.approx(vertical + horizontal, rel=1e-6)
    assert total_variation_loss(torch.full((2, 3, 5, 4), 0.7)).item() == 0.0


# -- the meta-synthesis round ---------------------------------------------------------------------
def _teacher():
    torch.manual_seed(0)
    return create_model("test_vit_patch4_16").requires_grad_(False).eval()


def _generator(seed=1):
    torch.manual_seed(seed)
    return DAFLGenerator(img_size=16, in_chans=1, latent_dim=12, width=8)


def _dafl_loss_fn(teacher, record=None):
    def loss_fn(x):
        loss = sum(dafl_loss(teacher(x), None, 1.0, 5.0, 0.0).values())
        if record is not None:
            record.append((loss.detach().clone(), x.detach().clone()))
        return loss

    return loss_fn


def test_meta_round_leaves_weights_and_accumulates_grads():
    teacher, gen = _teacher(), _generator()
    t_before = copy.deepcopy(teacher.state_dict())
    g_before = copy.deepcopy(gen.state_dict())
    z = torch.randn(8, 12, generator=torch.Generator().manual_seed(2))
    x, loss = meta_synthesize(gen, z, _dafl_loss_fn(teacher), inner_steps=2, lr=1e-2, lr_z=1e-2)
    # the meta generator's weights (and buffers) are untouched; every parameter got a finite gradient
    for k, v in gen.state_dict().items():
        assert torch.equal(v, g_before[k]), k
    for name, p in gen.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert x.shape == gen(z).shape == (8, 1, 16, 16) and not x.requires_grad and x.grad_fn is None
    assert loss.ndim == 0 and not loss.requires_grad
    # the frozen teacher: bit-identical, no gradient
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, t_before[k]), k
    assert all(p.grad is None for p in teacher.parameters())
    # the caller's meta step on the accumulated gradients moves the generator
    torch.optim.Adam(gen.parameters(), lr=1e-3).step()
    moved = {n: not torch.equal(p, g_before[n]) for n, p in gen.named_parameters()}
    assert moved["l1.weight"] and moved["conv3.weight"] and sum(moved.values()) >= len(moved) - 2, moved


def test_meta_round_keeps_the_lowest_loss_batch():
    teacher, gen = _teacher(), _generator()
    record = []
    z = torch.randn(8, 12, generator=torch.Generator().manual_seed(3))
    x, loss = meta_synthesize(gen, z, _dafl_loss_fn(teacher, record), inner_steps=3, lr=5e-2, lr_z=5e-2)
    losses = torch.stack([r[0] for r in record])
    assert len(record) == 3
    assert len(set(losses.tolist())) == 3  # the inner steps changed the loss, so the choice matters
    best = int(losses.argmin())
    assert loss.item() == losses.min().item()
    assert torch.equal(x, record[best][1])


def test_meta_round_is_first_order_maml():
    """With one inner step the accumulated gradient is the plain gradient of the loss at the meta weights."""
    teacher, gen = _teacher(), _generator()
    z = torch.randn(8, 12, generator=torch.Generator().manual_seed(4))
    ref = copy.deepcopy(gen)
    loss_fn = _dafl_loss_fn(teacher)
    loss_fn(ref(z.clone())).backward()
    meta_synthesize(gen, z, loss_fn, inner_steps=1, lr=1e-2, lr_z=1e-2)
    for (name, p), q in zip(gen.named_parameters(), ref.parameters()):
        assert q.grad is not None and q.grad.abs().max() > 0 or name.endswith("bias"), name
        assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=0), (name, (p.grad - q.grad).abs().max())
    # two inner steps add the second step's gradient: no longer the plain one
    gen.zero_grad(set_to_none=True)
    meta_synthesize(gen, z, loss_fn, inner_steps=2, lr=1e-2, lr_z=1e-2)
    assert not torch.allclose(gen.l1.weight.grad, ref.l1.weight.grad, atol=1e-6)


def test_meta_round_needs_an_inner_step():
    with pytest.raises(ValueError, match="inner_steps"):
        meta_synthesize(_generator(), torch.randn(2, 12), lambda x: x.sum(), inner_steps=0, lr=1e-2, lr_z=1e-2)


# -- the memory bank ------------------------------------------------------------------------------
def _const(v, n=4):
    return torch.full((n, 1, 2, 2), float(v))


def test_memory_bank_ring_sample_and_state():
    bank = MemoryBank(8, (1, 2, 2))
    assert len(bank) == 0
    bank.push(_const(1))
    assert len(bank) == 4
    # only the stored images are drawn, never the empty slots (zeros)
    s = bank.sample(64, torch.Generator().manual_seed(0))
    assert s.shape == (64, 1, 2, 2) and torch.equal(s, torch.ones_like(s))
    bank.push(_const(2))
    bank.push(_const(3))
    assert len(bank) == 8 and int(bank.count) == 12
    # the oldest batch (1) was overwritten by the newest (3); batch 2 is kept
    assert torch.equal(bank.images[:4], _const(3)) and torch.equal(bank.images[4:], _const(2))
    s = bank.sample(200, torch.Generator().manual_seed(1))
    vals = s.flatten(1)
    assert (vals == vals[:, :1]).all()  # whole stored images, not mixtures
    assert set(vals[:, 0].tolist()) == {2.0, 3.0}
    # pushes do not keep the pushed tensor's graph
    y = _const(5, 2).requires_grad_(True) * 1.0
    bank.push(y)
    assert not bank.images.requires_grad
    # the state dict round-trips count and images
    other = MemoryBank(8, (1, 2, 2))
    other.load_state_dict(bank.state_dict())
    assert int(other.count) == 14 and len(other) == 8 and torch.equal(other.images, bank.images)
    assert torch.equal(other.images[4:6], _const(5, 2))


# -- batch statistics -----------------------------------------------------------------------------
def test_batch_statistics_uses_batch_stats_and_keeps_running_ones():
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(3, eps=1e-5, momentum=0.3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.5, -0.5, 2.0]))
        bn.bias.copy_(torch.tensor([0.1, 0.2, -0.3]))
        bn.running_mean.copy_(torch.tensor([4.0, -2.0, 1.0]))
        bn.running_var.copy_(torch.tensor([9.0, 0.25, 2.0]))
    bn.eval()
    mean0, var0 = bn.running_mean.clone(), bn.running_var.clone()
    x = torch.randn(6, 3, 4, 4) * 2 + 1
    mu = x.mean(dim=(0, 2, 3), keepdim=True)
    var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    expected = (x - mu) / torch.sqrt(var + 1e-5) * bn.weight.view(1, 3, 1, 1) + bn.bias.view(1, 3, 1, 1)
    eval_out = bn(x)
    assert not torch.allclose(eval_out, expected, atol=1e-3)  # the running stats give another output
    with batch_statistics(bn):
        assert bn.training
        out = bn(x)
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.equal(bn.running_mean, mean0) and torch.equal(bn.running_var, var0)
    assert not bn.training and bn.momentum == 0.3
    # a module in train mode comes back in train mode, also after an error inside the block
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), torch.nn.BatchNorm2d(3, momentum=0.2)).train()
    with pytest.raises(RuntimeError, match="inside"):
        with batch_statistics(net):
            raise RuntimeError("inside")
    assert net[1].training and net[1].momentum == 0.2 and net.training
    assert has_batch_norm(net) and not has_batch_norm(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2)))


# -- the stage ------------------------------------------------------------------------------------
def _dafl_stage(teacher, seed=0, **kw) -> DataFreeGAN:
    """The stage as the CLI builds it from dafl.yaml + TINY (same seed, same initial weights)."""
    pl.seed_everything(seed)
    args = dict(
        arch="test_vit_patch4_16",
        teacher_ckpt=str(teacher),
        generator="dafl",
        generator_kwargs={"width": 8},
        batch_size=8,
        generator_weights=GeneratorLossWeights(attention=0.0),
        student_weights=StudentLossWeights(patch=0.0),
    )
    args.update(kw)
    return DataFreeGAN(**args)


def test_fast_synthesizer_through_cli(tiny_teacher, tmp_path):
    m = fit(*tiny_args(tiny_teacher, tmp_path, "dafl.yaml", *FAST))
    assert m["synthesizer"] == "fast" and m["generator"] == "dafl"
    assert m["generator_steps"] == 4  # rounds at steps 0 and 2 of 3, two inner steps each
    assert 0.0 <= m["test/acc"] <= 1.0
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    state = ckpt["state_dict"]
    assert not any(k.startswith("teacher.") for k in state)
    assert state["bank.images"].shape == (16, 1, 16, 16)  # 2 batches of 8
    assert int(state["bank.count"]) == 16  # 2 rounds × batch 8
    assert (state["bank.images"].flatten(1).abs().sum(dim=1) > 0).all()  # every slot holds a generated image
    assert ckpt["vitkd_generator_steps"] == 4
    # the meta generator moved from its (identically seeded) initial weights, by two small meta steps
    fresh = _dafl_stage(tiny_teacher, synthesizer="fast", fast_bank_batches=2).state_dict()
    delta = (state["generator.l1.weight"] - fresh["generator.l1.weight"]).abs().max().item()
    assert 0.0 < delta < 0.02, delta  # a different initialisation would differ by ~0.1
    assert not torch.equal(state["generator.conv3.weight"], fresh["generator.conv3.weight"])
    assert not torch.equal(state["model.head.weight"], fresh["model.head.weight"])


def test_validation_logs_the_other_generator_mode_only_with_batch_norms(tiny_teacher, tmp_path):
    fit(*tiny_args(tiny_teacher, tmp_path / "dafl", "dafl.yaml"))
    header = (tmp_path / "dafl" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "val/agree" in header and "val/agree_eval" in header and "val/agree_train" not in header
    fit(*tiny_args(tiny_teacher, tmp_path / "tgan", "transformer_gan.yaml"))
    header = (tmp_path / "tgan" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "val/agree" in header
    assert "val/agree_eval" not in header and "val/agree_train" not in header


def test_generator_mode_train_uses_batch_statistics(tiny_teacher):
    stage = _dafl_stage(tiny_teacher)
    gen = stage.generator
    with torch.no_grad():  # give the running statistics values of their own
        gen.train()
        for i in range(3):
            gen(torch.randn(16, 100, generator=torch.Generator().manual_seed(10 + i)) * 3 + 1)
    gen.eval()
    buffers = {k: v.clone() for k, v in gen.state_dict().items() if "running" in k}
    assert buffers and any(v.abs().sum() > 0 for k, v in buffers.items() if "mean" in k)
    z = torch.randn(8, 100, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref_train = copy.deepcopy(gen).train()(z)
        ref_eval = gen(z)
        with stage.generator_mode("train"):
            out_train = gen(z)
        assert not gen.training and not any(m.training for m in gen.modules())
        with stage.generator_mode("eval"):
            out_eval = gen(z)
    assert torch.allclose(out_train, ref_train, atol=1e-6)
    assert not torch.allclose(ref_train, ref_eval, atol=1e-3)  # the two modes make different images
    assert torch.equal(out_eval, ref_eval)
    for k, v in gen.state_dict().items():
        if "running" in k:
            assert torch.equal(v, buffers[k]), k
    # eval mode from a generator in train mode: restored afterwards
    gen.train()
    with torch.no_grad(), stage.generator_mode("eval"):
        assert not gen.training
        assert torch.equal(gen(z), ref_eval)
    assert gen.training


def test_bad_val_generator_mode_is_refused(tiny_teacher):
    with pytest.raises(VitkdInputError, match="val_generator_mode"):
        _dafl_stage(tiny_teacher, val_generator_mode="bogus")
