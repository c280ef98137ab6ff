"""``precision: auto`` and ``teacher_bf16: auto`` (``vitkd.precision``): the faster option of faked timings is
chosen, the decision is cached by device and shape under ``XDG_CACHE_HOME`` and reused untimed, a GPU with
bf16 gets bf16-mixed untimed, several processes without a cache stay at fp32, the real timing leaves the nets
as they were, and a CLI run records the decision in ``metrics.json`` and prints it in one line."""

import json

import pytest
import torch
from torch import nn

import vitkd.precision as P
from tests.conftest import fit
from vitkd.efficient.vit_parts import set_fused_attention


def nets(width: int = 8, teacher: bool = True) -> list[P.TimedNet]:
    out = [P.TimedNet("model", nn.Sequential(nn.Flatten(), nn.Linear(16, width)), (1, 4, 4), train=True)]
    if teacher:
        out.append(P.TimedNet("teacher", nn.Sequential(nn.Flatten(), nn.Linear(16, 32)), (1, 4, 4), train=False))
    return out


class FakeTimer:
    """Returns the given seconds per (precision a net runs at, net) and counts its calls."""

    def __init__(self, per_net: dict[tuple[str, str], float]):
        self.per_net, self.calls = per_net, 0

    def __call__(self, nets, options, batch, device):
        self.calls += 1
        return {
            opt: {name: self.seconds(opt, prec, name) for name, prec in per.items()} for opt, per in options.items()
        }

    def seconds(self, opt: str, prec: str, name: str) -> float:
        """A net's time at ``prec``; under a plain-attention option its own entry if given, else the same."""
        math = opt.endswith(P.MATH_ATTENTION) and (prec + P.MATH_ATTENTION, name) in self.per_net
        return self.per_net[(prec + P.MATH_ATTENTION, name) if math else (prec, name)]


STUDENT_FP32_FAST = {
    ("32-true", "model"): 0.010,
    ("bf16-mixed", "model"): 0.030,
    ("32-true", "teacher"): 0.050,
    ("bf16-mixed", "teacher"): 0.020,
}


def test_faster_option_is_chosen_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    cache = P.cache_file()
    assert cache == tmp_path / "xdg" / "vitkd" / "precision.json"
    timer = FakeTimer(STUDENT_FP32_FAST)
    cpu = torch.device("cpu")
    # the student is faster in fp32, the teacher in bf16: fp32 training with the teacher's forward in bf16
    c = P.choose_precision("KD", nets(), 64, cpu, "auto", "auto", cache=cache, timer=timer)
    assert (c.precision, c.teacher_bf16, c.cached, timer.calls) == ("32-true", True, False, 1)
    assert set(c.seconds) == {"32-true", "bf16-mixed", "32-true+teacher_bf16"}
    assert sum(c.seconds["32-true+teacher_bf16"].values()) == pytest.approx(0.030)
    entry = json.loads(cache.read_text())[c.key]
    assert entry["option"] == "32-true+teacher_bf16"
    # the same device and shape: from the cache, untimed
    again = P.choose_precision("KD", nets(), 64, cpu, "auto", "auto", cache=cache, timer=timer)
    assert (again.precision, again.teacher_bf16, again.cached, timer.calls) == ("32-true", True, True, 1)
    assert "from " + str(cache) in again.line(cache)
    # another shape (a wider student, another batch) is timed again and cached beside the first
    bf16_fast = FakeTimer({**STUDENT_FP32_FAST, ("bf16-mixed", "model"): 0.001})
    other = P.choose_precision("KD", nets(width=16), 64, cpu, "auto", "auto", cache=cache, timer=bf16_fast)
    assert (other.precision, other.teacher_bf16, bf16_fast.calls) == ("bf16-mixed", False, 1)
    P.choose_precision("KD", nets(), 32, cpu, "auto", "auto", cache=cache, timer=bf16_fast)
    assert bf16_fast.calls == 2 and len(json.loads(cache.read_text())) == 3


def attention_nets() -> list[P.TimedNet]:
    from timm.models.vision_transformer import Attention

    class Tokens(nn.Module):  # (B, 1, 4, 4) -> 4 tokens of 4 channels through one timm attention block
        def __init__(self):
            super().__init__()
            self.attn = Attention(4, num_heads=2)

        def forward(self, x):
            return self.attn(x.flatten(1).view(len(x), 4, 4))

    return [P.TimedNet("model", Tokens(), (1, 4, 4), train=True)]


def test_plain_attention_is_weighed_where_a_net_has_timm_attention_blocks(tmp_path):
    cpu = torch.device("cpu")
    assert set(P.options_for(nets(), True, "auto", None, None)) == {"32-true", "bf16-mixed"}  # no attention block
    assert set(P.options_for(attention_nets(), True, "auto", None, None)) == {
        "32-true",
        "bf16-mixed",
        "32-true" + P.MATH_ATTENTION,
        "bf16-mixed" + P.MATH_ATTENTION,
    }
    timer = FakeTimer(
        {("32-true", "model"): 0.010, ("bf16-mixed", "model"): 0.030, ("32-true+math_attention", "model"): 0.006}
    )
    c = P.choose_precision(
        "Classifier", attention_nets(), 64, cpu, "auto", None, cache=tmp_path / "c.json", timer=timer
    )
    assert (c.precision, c.fused_attention) == ("32-true", False) and "plain attention" in c.line(None)
    again = P.choose_precision(
        "Classifier", attention_nets(), 64, cpu, "auto", None, cache=tmp_path / "c.json", timer=timer
    )
    assert (again.fused_attention, again.cached, timer.calls) == (False, True, 1)
    timer = FakeTimer(
        {("32-true", "model"): 0.010, ("bf16-mixed", "model"): 0.030, ("32-true+math_attention", "model"): 0.02}
    )
    fused = P.choose_precision("Classifier", attention_nets(), 64, cpu, "auto", None, cache=None, timer=timer)
    assert (fused.precision, fused.fused_attention) == ("32-true", True) and "plain" not in fused.line(None)
    plain = FakeTimer(STUDENT_FP32_FAST)
    assert P.choose_precision("KD", nets(), 64, cpu, "auto", None, cache=None, timer=plain).fused_attention is None
    # timed for real: each block is switched only while its option runs, and left fused
    net = attention_nets()
    options = P.options_for(net, True, "auto", None, None)
    assert set(P.time_steps(net, options, 8, cpu, budget_s=0.0)) == set(options)
    assert P.attention_blocks(net[0].module)[0].fused_attn is True
    set_fused_attention(net[0].module, False)
    assert [m.fused_attn for m in P.attention_blocks(net[0].module)] == [False]


def test_fixed_trainer_precision_and_fixed_teacher(tmp_path):
    timer = FakeTimer(STUDENT_FP32_FAST)
    cpu = torch.device("cpu")
    # the trainer's precision given, the teacher's auto: only fp32 against fp32 with the teacher in bf16
    c = P.choose_precision("KD", nets(), 64, cpu, "32-true", "auto", cache=tmp_path / "c.json", timer=timer)
    assert (c.precision, c.teacher_bf16) == ("32-true", True)
    assert set(c.seconds) == {"32-true", "32-true+teacher_bf16"}
    # the trainer's auto, the teacher's fixed on: fp32 is timed with the teacher in bf16
    t = P.choose_precision("KD", nets(), 64, cpu, "auto", True, cache=tmp_path / "d.json", timer=timer)
    assert (t.precision, t.teacher_bf16) == ("32-true", None)
    assert t.seconds["32-true"]["teacher"] == STUDENT_FP32_FAST[("bf16-mixed", "teacher")]
    # inference only (a selector): bf16-true is weighed too
    infer = [n for n in nets() if n.name == "teacher"]
    timer = FakeTimer({("32-true", "teacher"): 3.0, ("bf16-mixed", "teacher"): 2.0, ("bf16-true", "teacher"): 1.0})
    s = P.choose_precision("Selector", infer, 256, cpu, "auto", None, cache=None, timer=timer)
    assert s.precision == "bf16-true" and set(s.seconds) == {"32-true", "bf16-mixed", "bf16-true"}


def test_gpu_and_several_processes(tmp_path, monkeypatch):
    def never(*args):
        raise AssertionError("timed where it should not be")

    monkeypatch.setattr(P, "device_name", lambda device: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    gpu = P.choose_precision("KD", nets(), 64, torch.device("cuda"), "auto", "auto", cache=tmp_path / "c", timer=never)
    assert (gpu.precision, gpu.teacher_bf16, gpu.reason) == ("bf16-mixed", False, "the GPU supports bf16")
    fp32 = P.choose_precision("KD", nets(), 64, torch.device("cuda"), "32-true", "auto", cache=None, timer=never)
    assert (fp32.precision, fp32.teacher_bf16) == ("32-true", True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    old = P.choose_precision("KD", nets(), 64, torch.device("cuda"), "auto", None, cache=None, timer=never)
    assert old.precision == "32-true"
    # two CPU processes and nothing cached: both take fp32 rather than time apart and disagree
    ddp = P.choose_precision(
        "KD", nets(), 64, torch.device("cpu"), "auto", None, cache=tmp_path / "c", timer=never, processes=2
    )
    assert ddp.precision == "32-true" and "2 processes" in ddp.reason


def test_real_timing_leaves_the_nets_as_they_were():
    torch.manual_seed(0)
    bn = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Flatten())
    nets = [P.TimedNet("model", bn, (1, 4, 4), train=True), P.TimedNet("teacher", nn.Linear(3, 2).eval(), (3,), False)]
    bn.eval()
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    rng = torch.get_rng_state()
    options = P.options_for(nets, True, "auto", "teacher", "auto")
    seconds = P.time_steps(nets, options, 8, torch.device("cpu"), budget_s=0.0)
    assert set(seconds) == {"32-true", "bf16-mixed", "32-true+teacher_bf16"}
    assert all(t > 0 for per in seconds.values() for t in per.values())
    assert all(torch.equal(before[k], v) for k, v in bn.state_dict().items())  # weights and running statistics
    assert not bn.training and all(p.grad is None for p in bn.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


def test_cli_records_and_prints_the_choice(tiny_teacher, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    timer = FakeTimer(STUDENT_FP32_FAST)
    monkeypatch.setattr(P, "time_steps", timer)
    args = [
        "--config",
        "experiments/digits/kd_original.yaml",
        "--model.init_args.arch",
        "test_vit_patch4_16",
        "--model.init_args.teacher_ckpt",
        str(tiny_teacher),
        "--model.init_args.teacher_cache",
        "false",
        "--model.init_args.measure_batch_size",
        "0",
        "--trainer.precision",
        "auto",
        "--model.init_args.teacher_bf16",
        "auto",
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "2",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.limit_test_batches",
        "1",
    ]
    m = fit(*args, "--run_dir", str(tmp_path / "run"))
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("vitkd: precision auto")]
    assert len(lines) == 1 and "32-true, teacher_bf16 true" in lines[0] and "cached in" in lines[0]
    recorded = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert recorded["trainer_precision"] == m["trainer_precision"] == "32-true"
    assert recorded["precision_auto"]["teacher_bf16"] is True and not recorded["precision_auto"]["cached"]
    assert recorded["precision_auto"]["fused_attention"] is True  # the faked times tie: the fused kernel stays
    assert timer.calls == 1
    # a second run on the same device and shapes reads the cache; bf16 faster for the student now picks bf16-mixed
    # only once the cache is gone
    m2 = fit(*args, "--run_dir", str(tmp_path / "run2"))
    assert m2["precision_auto"]["cached"] and timer.calls == 1
    (tmp_path / "xdg" / "vitkd" / "precision.json").unlink()
    timer.per_net[("bf16-mixed", "model")] = 0.001
    m3 = fit(*args, "--run_dir", str(tmp_path / "run3"))
    assert m3["trainer_precision"] == "bf16-mixed" and timer.calls == 2


def test_hand_built_trainer_refuses_auto():
    from vitkd.errors import VitkdInputError
    from vitkd.fit import Trainer

    with pytest.raises(VitkdInputError, match="precision auto"):
        Trainer(precision="auto")


def test_a_stage_outside_the_cli_decides_teacher_bf16_on_its_first_batch(tiny_teacher, tmp_path, monkeypatch):
    from vitkd.stages import ProbeDistillation

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    timer = FakeTimer(STUDENT_FP32_FAST)  # the teacher faster in bf16
    monkeypatch.setattr(P, "time_steps", timer)
    stage = ProbeDistillation(
        arch="test_vit_patch4_16",
        teacher_ckpt=str(tiny_teacher),
        q_diagonal=0.9,
        probe_pairs=[(0, 0), (1, 1)],
        teacher_bf16="auto",
    )
    x = torch.randn(8, 1, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # under a bf16 trainer nothing is timed and it stays off
        stage.teacher_outputs(x)
    assert stage.teacher_bf16 is False and timer.calls == 0
    stage.teacher_bf16 = "auto"
    out = stage.teacher_outputs(x)
    assert stage.teacher_bf16 is True and timer.calls == 1 and out["logits"].dtype == torch.float32


def test_a_hopeless_option_is_not_timed_after_its_warm_up():
    import time

    class SlowUnderAutocast(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.calls = nn.Linear(16, 2), {"32-true": 0, "bf16-mixed": 0}

        def forward(self, x):
            slow = torch.is_autocast_enabled("cpu")
            self.calls["bf16-mixed" if slow else "32-true"] += 1
            time.sleep(0.02 if slow else 0.001)
            return self.lin(x.flatten(1))

    net = SlowUnderAutocast()
    nets = [P.TimedNet("model", net, (1, 4, 4), train=False)]
    seconds = P.time_steps(nets, P.options_for(nets, True, "auto", None, None), 4, torch.device("cpu"), budget_s=0.0)
    assert net.calls["32-true"] == 1 + 3 and net.calls["bf16-mixed"] == 1  # bf16-true times a copy
    assert seconds["bf16-mixed"]["model"] > 10 * seconds["32-true"]["model"]
