"""``make bench`` judges the paper pair by its share of the machine's matmul peak at the precision each figure ran
at, beside its ratio to the reference loop; the headline names both."""

import pytest

from benchmarks.bench import TARGETS, judge
from benchmarks.flops import peak_share
from benchmarks.table import _headline

PEAKS = {"bf16": 200e9, "fp32": 100e9}


def test_peak_share_weighs_each_part_by_its_precisions_peak():
    # one part: achieved FLOP/s over that precision's peak
    assert peak_share(10.0, [(5e9, PEAKS["bf16"])]) == pytest.approx(0.25)
    # a bf16 teacher forward and an fp32 student: the time at peak of each part, over the time taken
    assert peak_share(10.0, [(4e9, PEAKS["bf16"]), (2e9, PEAKS["fp32"])]) == pytest.approx(10 * (0.02 + 0.02))


def results(sel_share: float, dis_share: float, every_ratio: float) -> dict:
    flops = {
        "selector_vitkd_fraction_of_peak": sel_share,
        "selector_vitkd_peak_precision": "bf16",
        "distill_vitkd_fraction_of_peak": dis_share,
        "distill_vitkd_peak_precision": "bf16/fp32",
    }
    distill = {
        "speedup_ratio": 3.5,
        "vitkd_best_config": "cache",
        "speedup_ratio_teacher_every_step": every_ratio,
    }
    return {
        "selector": {"paper": {"speedup_ratio": 2.26}},
        "distill": {"paper": distill},
        "flops": {"paper": flops},
        "scale": {},
    }


def test_targets_are_the_shares_of_peak_and_the_every_step_ratio():
    res = results(0.75, 0.30, 1.66)
    judge(res, {"paper": {}})
    t = res["targets"]
    assert set(t) == {
        "selector_fraction_of_peak",
        "distill_every_step_fraction_of_peak",
        "distill_speedup_ratio_teacher_every_step",
    }
    assert t["selector_fraction_of_peak"] == {
        "target": TARGETS["selector_fraction_of_peak"],
        "value": 0.75,
        "met": True,
    }
    assert (
        not t["distill_every_step_fraction_of_peak"]["met"] and not t["distill_speedup_ratio_teacher_every_step"]["met"]
    )
    res["headline_preset"] = "paper"
    line = _headline(res)
    assert "selector 2.26x the reference at 75% of the bf16 peak (target >= 70%: met)" in line
    assert "1.66x (target >= 3x: missed) at 30% of the bf16/fp32 peak (target >= 40%: missed)" in line
    met = results(0.70, 0.41, 3.1)
    judge(met, {"paper": {}})
    assert all(v["met"] for v in met["targets"].values())


def test_a_run_without_the_paper_pair_judges_nothing():
    res = results(0.9, 0.9, 9.0)
    res = {k: {"digits": next(iter(v.values()))} if k != "scale" else v for k, v in res.items()}
    judge(res, {"digits": {}})
    assert "not_judged" in res["targets"]


def test_fixed_views_spread_one_teacher_forward_per_view_over_the_epochs():
    from benchmarks.distill import amortised_rate

    # 20 epochs at 100 img/s through the cache, plus the teacher at 50 img/s in 1 (or 4) of them
    assert amortised_rate(100.0, 50.0, 1, 20) == pytest.approx(1 / (0.01 + 1 / 1000))
    assert amortised_rate(100.0, 50.0, 4, 20) == pytest.approx(1 / (0.01 + 4 / 1000))
    assert amortised_rate(100.0, 50.0, 20, 20) == pytest.approx(1 / (0.01 + 0.02))  # the teacher every epoch
