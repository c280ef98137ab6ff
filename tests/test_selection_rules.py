"""vitkd's own selection terms and rules against values computed by hand: the energy score, the stability V_s,
the z-scored fusion, the oracle, the fusion weights chosen on validation images, and both strategies through
the CLI on a tiny pool."""

import csv
import json
import math

import numpy as np
import pytest
import torch

from tests.conftest import fit
from vitkd.demos.bench_wild import choose_fusion, fusion_grid, kept_share
from vitkd.errors import VitkdInputError
from vitkd.selection.scoring import energy_value, shift_image, stability_value, zscore_fusion


def test_energy_is_minus_logsumexp_by_hand():
    logits = torch.tensor([[0.0, math.log(3.0)], [2.0, 2.0]])
    # −log(e^0 + e^{log 3}) = −log 4; −log(2 e^2) = −(2 + log 2)
    assert torch.allclose(energy_value(logits), torch.tensor([-math.log(4.0), -(2.0 + math.log(2.0))]))


def test_stability_is_mean_kl_by_hand():
    p = torch.tensor([[0.5, 0.5]]).log()
    q = torch.tensor([[0.9, 0.1]]).log()
    kl = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)  # KL(p ‖ q)
    got = stability_value(p, [q, p])  # one view moved, one unchanged: the mean is kl / 2
    assert got.item() == pytest.approx(kl / 2, rel=1e-5)
    assert stability_value(p, [p]).item() == pytest.approx(0.0, abs=1e-7)


def test_shift_image_moves_and_fills():
    x = torch.arange(9.0).reshape(1, 1, 3, 3)
    y = shift_image(x, 1, 1, fill=-1.0)
    assert y[0, 0].tolist() == [[-1, -1, -1], [-1, 0, 1], [-1, 3, 4]]
    assert shift_image(x, -1, 0, fill=-1.0)[0, 0].tolist() == [[3, 4, 5], [6, 7, 8], [-1, -1, -1]]


def test_zscore_fusion_by_hand():
    cols = {"vn": np.array([0.0, 2.0, 4.0]), "va": np.array([1.0, 1.0, 4.0])}
    stats = {"vn": (2.0, 2.0), "va": (2.0, 1.5)}
    got = zscore_fusion(cols, {"vn": 1.0, "va": 2.0}, stats)
    want = np.array([-1 + 2 * (-1 / 1.5), 0 + 2 * (-1 / 1.5), 1 + 2 * (2 / 1.5)])
    assert np.allclose(got, want)
    # a zero weight drops its column (its stats are not even needed); all-zero weights are refused
    assert np.allclose(zscore_fusion(cols, {"vn": 1.0, "vs": 0.0}, {"vn": (2.0, 2.0)}), [-1, 0, 1])
    with pytest.raises(ValueError):
        zscore_fusion(cols, {"vn": 0.0}, stats)


def test_kept_share_and_choice_by_hand():
    # pool: vn ranks 3 of 6 well, va ranks them badly; the validation images look like vn's good ones
    pool = {
        "vn": np.array([0.0, 0.1, 0.2, 5.0, 5.1, 5.2]),
        "va": np.array([5.0, 5.0, 5.0, 0.0, 0.0, 0.0]),
        "vs": np.zeros(6) + np.arange(6),
        "energy": np.zeros(6) + np.arange(6)[::-1],
    }
    val = {
        "vn": np.array([0.05, 0.15, 6.0]),
        "va": np.array([5.0, 5.0, 5.0]),
        "vs": np.array([0.0, 9.0, 9.0]),
        "energy": np.array([9.0, 9.0, 9.0]),
    }
    # vn alone at k = 3: the pool's 3rd lowest vn is 0.2, and 2 of the 3 validation images are ≤ it
    assert kept_share(pool, val, {"vn": 1.0}, 3) == pytest.approx(2 / 3)
    # va alone: the threshold is va = 0, no validation image is kept
    assert kept_share(pool, val, {"va": 1.0}, 3) == 0.0
    choice = choose_fusion(pool, val, 3)
    assert choice["kept_share"] == max(g["kept_share"] for g in choice["grid"])
    assert choice["weights"] == {"vn": 1.0}  # the first (fewest terms) of the best
    assert len(fusion_grid()) == 15 and len(choice["grid"]) == 15


@pytest.fixture(scope="module")
def scored(tiny_teacher, tiny_pool, tmp_path_factory):
    """The tiny pool scored once with the extra columns (V_s, energy) by the value strategy."""
    run = tmp_path_factory.mktemp("sel") / "ap"
    fit(
        "--config",
        "experiments/digits/select.yaml",
        "--model.init_args.teacher_ckpt",
        str(tiny_teacher),
        "--data.init_args.wild_urls",
        tiny_pool,
        "--model.init_args.num_keep",
        "30",
        "--model.init_args.probe_blocks",
        "[0, 1]",
        "--model.init_args.extra_scores",
        "true",
        "--run_dir",
        str(run),
    )
    return run


def _rows(run):
    with open(run / "scores.csv") as f:
        return list(csv.DictReader(f))


def test_fusion_and_oracle_select_by_hand(scored, tiny_teacher, tiny_pool, tmp_path):
    rows = _rows(scored)
    assert {"vs", "energy"} <= set(rows[0]) and all(float(r["vs"]) >= -1e-6 for r in rows)
    base = [
        "--config",
        "experiments/digits/select.yaml",
        "--model.init_args.teacher_ckpt",
        str(tiny_teacher),
        "--data.init_args.wild_urls",
        tiny_pool,
        "--model.init_args.num_keep",
        "30",
        "--model.init_args.probe_blocks",
        "[0, 1]",
        "--model.init_args.extra_scores",
        "true",
    ]
    import shutil

    # fusion on the saved scores (copied: the same scores, selected another way), against numpy by hand
    fus = tmp_path / "fusion"
    shutil.copytree(scored / "score_parts", fus / "score_parts")
    m = fit(
        *base,
        "--model.init_args.strategy",
        "fusion",
        "--model.init_args.fusion_weights",
        json.dumps({"vn": 1.0, "vs": 2.0}),
        "--run_dir",
        str(fus),
    )
    assert m["shards_scored_this_run"] == 0  # nothing rescored
    vn, vs = (np.array([float(r[c]) for r in rows]) for c in ("vn", "vs"))
    fused = (vn - vn.mean()) / vn.std() + 2 * (vs - vs.mean()) / vs.std()
    want = set(np.argsort(fused, kind="stable")[:30].tolist())
    got = {i for i, r in enumerate(_rows(fus)) if r["selected"] == "1"}
    assert got == want
    assert m["value_auroc"] is not None
    # oracle: every positive source (digit, 40 of 120) first, then the lowest V of the rest
    ora = tmp_path / "oracle"
    shutil.copytree(scored / "score_parts", ora / "score_parts")
    m = fit(*base, "--model.init_args.strategy", "oracle", "--model.init_args.num_keep", "50", "--run_dir", str(ora))
    sel = [r for r in _rows(ora) if r["selected"] == "1"]
    assert sum(r["src"] == "digit" for r in sel) == 40 and m["precision"] == pytest.approx(40 / 50)
    rest = sorted((float(r["value"]), i) for i, r in enumerate(rows) if r["src"] != "digit")[:10]
    assert {i for _, i in rest} == {i for i, r in enumerate(_rows(ora)) if r["selected"] == "1" and r["src"] != "digit"}


def test_fusion_bad_weights_one_line(tiny_teacher):
    from vitkd.stages.selector import AttentionProbeSelector

    with pytest.raises(VitkdInputError, match="fusion_weights"):
        AttentionProbeSelector(
            str(tiny_teacher), 5, probe_blocks=[0], lambda_a=[0.05], strategy="fusion", fusion_weights={"vs": 1.0}
        )
    with pytest.raises(VitkdInputError, match="stability_views"):
        AttentionProbeSelector(
            str(tiny_teacher), 5, probe_blocks=[0], lambda_a=[0.05], extra_scores=True, stability_views=["rotate"]
        )
