"""The pool-separability reference: a classifier that learns the pool's src tags, scored out of fold."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data_modules.shards import encode_png, shard_url, write_shards
from vitkd.demos.pool_separability import main, separability


def _pool(tmp_path, separable: bool, n: int = 240) -> str:
    """``pos`` and ``neg`` 8×8 images: ink on the left vs the right half when separable, the same noise otherwise."""
    rng = np.random.default_rng(0)

    def samples():
        for i in range(n):
            src = "pos" if i % 3 == 0 else "neg"
            img = (rng.random((8, 8)) < 0.3).astype(np.uint8) * 255
            if separable:  # pos: the left half inked, neg: the right half
                img[:, :4] = 255 if src == "pos" else img[:, :4]
                img[:, 4:] = 255 if src == "neg" else img[:, 4:]
            yield {"__key__": f"s{i:05d}", "png": encode_png(img), "src": src}

    out = tmp_path / ("sep" if separable else "mixed")
    write_shards(samples(), out, pattern="wild-%06d.tar", maxcount=100)
    return shard_url(out, 3, "wild")


def test_separable_pool_reaches_full_precision(tmp_path, capsys):
    urls = _pool(tmp_path, separable=True)
    out = tmp_path / "sep.json"
    assert (
        main(["--urls", urls, "--positive", "pos", "--num_keep", "80", "160", "--img_size", "8", "--out", str(out)])
        == 0
    )
    res = json.loads(out.read_text())
    assert res["num_samples"] == 240 and res["num_positive"] == 80 and res["by_source"] == {"neg": 160, "pos": 80}
    assert res["auroc"]["all"] > 0.99 and res["auroc"]["neg"] == res["auroc"]["all"]
    assert res["precision_at"]["80"]["precision"] > 0.95 and res["precision_at"]["80"]["precision_max"] == 1.0
    assert res["precision_at"]["160"] == {"precision": 0.5, "precision_max": 0.5}, "all 80 positives and 80 others"
    assert json.loads(capsys.readouterr().out) == res


def test_indistinguishable_pool_stays_near_chance(tmp_path):
    urls = _pool(tmp_path, separable=False)
    out = tmp_path / "mixed.json"
    assert main(["--urls", urls, "--positive", "pos", "--num_keep", "80", "--img_size", "8", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert 0.3 < res["auroc"]["all"] < 0.7, "same-distribution sources cannot be told apart"
    assert res["precision_at"]["80"]["precision"] < 0.6, "about the pool's share of positives (1/3)"


def test_separability_counts_by_hand():
    tags = np.array(["a", "b", "a", "c", "b", ""])
    scores = np.array([0.9, 0.8, 0.1, 0.7, 0.2, 0.95])
    res = separability(tags, scores, ["a"], [1, 2, 3])
    # ranked: ""(0.95), a(0.9), b(0.8), c(0.7), b(0.2), a(0.1)
    assert res["precision_at"] == {
        "1": {"precision": 0.0, "precision_max": 1.0},
        "2": {"precision": 0.5, "precision_max": 1.0},
        "3": {"precision": 1 / 3, "precision_max": 2 / 3},
    }
    # a vs b: pairs (0.9>0.8, 0.9>0.2, 0.1<0.8, 0.1<0.2) -> 2/4; a vs all four others: 0.9 beats 3 of 4, 0.1 none -> 3/8
    assert res["auroc"]["b"] == pytest.approx(0.5) and res["auroc"]["all"] == pytest.approx(3 / 8)
    assert res["by_source"] == {"": 1, "a": 2, "b": 2, "c": 1}


def test_bad_input_is_one_line(tmp_path, capsys):
    urls = _pool(tmp_path, separable=True)
    (tmp_path / "afile").write_text("")
    cases = [
        (["--positive", "digit", "--num_keep", "10"], ["--positive digit", "neg, pos"]),
        (
            ["--positive", "pos", "--num_keep", "500", "--img_size", "8"],
            ["--num_keep 500 is larger than the pool's 240"],
        ),
        (["--positive", "pos", "--num_keep", "5", "--max_samples", "1"], ["--max_samples 1"]),
        (
            ["--positive", "pos", "--num_keep", "5", "--out", str(tmp_path / "afile" / "x.json")],
            ["cannot write --out", "afile"],
        ),
    ]
    for args, words in cases:
        assert main(["--urls", urls, *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and all(w in err for w in words), err
    # usage errors: the same one-line form, from the parser
    for args, words in (
        (["--positive", "pos", "--num_keep", "0"], ["--num_keep", "positive integer, got 0"]),
        (["--num_keep", "5"], ["--positive"]),
    ):
        with pytest.raises(SystemExit) as exit_:
            main(["--urls", urls, *args])
        err = capsys.readouterr().err.strip()
        assert (
            exit_.value.code == 2
            and err.startswith("vitkd: error:")
            and err.count("\n") == 0
            and all(w in err for w in words)
        ), err
