"""Class-balanced top-k of the selector (``--model.init_args.class_balance``): the streamed merge over score
parts equals a brute-force reference, the default stays the plain lowest-k, and the random strategy refuses it."""

import csv
import json
from collections import Counter

import numpy as np
import pytest

from tests.conftest import fit
from vitkd.errors import VitkdInputError
from vitkd.selection.metrics import score_auroc
from vitkd.selection.parts import ScoreParts
from vitkd.selection.ranking import RankedParts
from vitkd.selection.topk import choose as choose_kept
from vitkd.stages.selector import AttentionProbeSelector


class FakeParts:
    """Score parts held in memory: part i holds ``values[i]`` and ``preds[i]``."""

    def __init__(self, values: list[np.ndarray], preds: list[np.ndarray]):
        self.values, self.preds = values, preds
        self.urls = [f"wild-{i:06d}.tar" for i in range(len(values))]

    def load(self, i: int) -> dict[str, np.ndarray]:
        v = self.values[i]
        return {
            "key": np.array([f"p{i}s{j}" for j in range(len(v))], dtype=str),
            "value": v.astype(np.float32),
            "pred": self.preds[i],
        }

    def size(self, i: int) -> int:
        return len(self.values[i])


def choose(values, preds, k, class_balance, num_classes=10, strategy="value"):
    """The selector's choice (``vitkd.selection.topk.choose``) on in-memory parts, returned as sorted global
    positions (parts concatenated in order)."""
    ranked = RankedParts(FakeParts(values, preds), strategy)  # the strategy's ranking value over a part (V itself here)
    kept = choose_kept(ranked, k, 0 if strategy == "random" else None, k // num_classes if class_balance else 0)
    offsets = np.cumsum([0] + [len(v) for v in values])
    return sorted(int(offsets[i] + j) for i, rows in kept.items() for j in rows)


def reference(values, preds, k, num_classes):
    """Brute force: per class the q = k // C lowest (V, position), then the lowest (V, position) not chosen."""
    v = np.concatenate(values).astype(np.float32).astype(np.float64)
    c = np.concatenate(preds)
    ranked = sorted(range(len(v)), key=lambda p: (v[p], p))
    q = k // num_classes
    chosen = []
    for cls in range(num_classes):
        chosen += [p for p in ranked if c[p] == cls][:q]
    rest = [p for p in ranked if p not in set(chosen)]
    return sorted(chosen + rest[: k - len(chosen)])


def random_parts(rng, sizes, num_classes, scarce_class, scarce_count):
    """Values with many ties (few distinct levels), skewed classes, one class with only ``scarce_count`` samples."""
    n = sum(sizes)
    p = rng.dirichlet(np.full(num_classes, 0.7))
    p[scarce_class] = 0
    pred = rng.choice(num_classes, size=n, p=p / p.sum())
    pred[rng.choice(n, size=scarce_count, replace=False)] = scarce_class
    val = rng.integers(0, 25, size=n) / 8.0
    cuts = np.cumsum(sizes)[:-1]
    return np.split(val, cuts), [a.astype(np.int64) for a in np.split(pred, cuts)]


@pytest.mark.parametrize("seed", range(6))
def test_balanced_choice_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    C = 10
    sizes = [int(s) for s in rng.integers(0, 60, size=7)] + [0, 45]  # an empty part too
    values, preds = random_parts(rng, sizes, C, scarce_class=seed % C, scarce_count=2)
    n = sum(sizes)
    for k in (1, 7, C, 40, 83, n // 2, n - 3, n):  # q = 0, remainders, the scarce class under quota
        got = choose(values, preds, k, class_balance=True, num_classes=C)
        assert got == reference(values, preds, k, C), (seed, k)
        assert len(got) == k == len(set(got))
    # the scarce class is kept whole once its quota exceeds its size, and the others get at least q each
    k = 83
    got = np.array(choose(values, preds, k, class_balance=True, num_classes=C))
    counts = np.bincount(np.concatenate(preds)[got], minlength=C)
    assert counts[seed % C] == 2 and all(counts[c] >= min(k // C, (np.concatenate(preds) == c).sum()) for c in range(C))


def test_balanced_choice_independent_of_part_split():
    rng = np.random.default_rng(7)
    values, preds = random_parts(rng, [100, 50, 150], 4, scarce_class=3, scarce_count=5)
    v, c = np.concatenate(values), np.concatenate(preds)
    resplit = [10, 90, 1, 120, 79]
    cuts = np.cumsum(resplit)[:-1]
    for k in (30, 101):
        assert choose(values, preds, k, True, 4) == choose(np.split(v, cuts), np.split(c, cuts), k, True, 4)


def test_default_is_plain_lowest_k():
    rng = np.random.default_rng(3)
    values, preds = random_parts(rng, [30, 0, 55, 41], 10, scarce_class=9, scarce_count=1)
    v = np.concatenate(values).astype(np.float32).astype(np.float64)
    for k in (1, 25, 60, 126):
        plain = sorted(sorted(range(len(v)), key=lambda p: (v[p], p))[:k])
        assert choose(values, preds, k, class_balance=False) == plain
    # and balancing does change the choice on skewed classes (the test above is not vacuous)
    assert choose(values, preds, 60, class_balance=True) != choose(values, preds, 60, class_balance=False)


def test_class_balance_with_random_strategy_is_refused(tmp_path):
    with pytest.raises(VitkdInputError, match="class_balance applies to strategy value only, not random"):
        AttentionProbeSelector(teacher_ckpt="never/loaded.ckpt", num_keep=10, strategy="random", class_balance=True)
    # through the CLI (in process: the CLI prints a VitkdInputError as its one-line ``vitkd: error:``,
    # tests/test_bad_input.py)
    with pytest.raises(VitkdInputError, match="class_balance applies to strategy value only") as err:
        fit(
            "--config",
            "experiments/digits/select_random.yaml",
            "--model.init_args.class_balance",
            "true",
            "--run_dir",
            str(tmp_path),
        )
    assert "\n" not in str(err.value) and not list(tmp_path.iterdir())


def test_selection_reports_kept_per_class(tiny_teacher, tiny_pool, tmp_path):
    """Through the CLI: ``kept_per_class`` counts the teacher's predictions of the kept rows, and the balanced
    selection gives every predicted class its quota (or all it has)."""
    for balance in ("false", "true"):
        run = tmp_path / balance
        m = fit(
            "--config",
            "experiments/digits/select.yaml",
            "--model.init_args.teacher_ckpt",
            str(tiny_teacher),
            "--model.init_args.probe_blocks",
            "[0, 1]",
            "--model.init_args.num_keep",
            "30",
            "--model.init_args.class_balance",
            balance,
            "--data.init_args.wild_urls",
            tiny_pool,
            "--run_dir",
            str(run),
        )
        rows = list(csv.DictReader(open(run / "scores.csv")))
        kept = Counter(int(r["pred"]) for r in rows if r["selected"] == "1")
        assert (
            m["kept_per_class"]
            == [kept.get(c, 0) for c in range(10)]
            == json.loads((run / "metrics.json").read_text())["kept_per_class"]
        )
        assert sum(m["kept_per_class"]) == 30 and m["class_balance"] == (balance == "true")
        if balance == "true":
            scored = Counter(int(r["pred"]) for r in rows)
            assert all(kept.get(c, 0) >= min(3, scored.get(c, 0)) for c in range(10))


def test_score_auroc_against_each_source():
    # digits at V 0 and 1; a letter at 2, noise at 0.5, an untagged sample at 3
    names = {"digit": 0, "letter": 1, "noise": 2, "": 3}
    src = np.array([0, 0, 1, 2, 3], dtype=np.int16)
    value = np.array([0.0, 1.0, 2.0, 0.5, 3.0], dtype=np.float32)
    out = score_auroc({"value": value, "vn": -value}, src, names, ["digit"])
    # pairs (digit, other) with the digit lower: letter 2/2, noise 1/2, all (letter, noise, untagged) 5/6
    assert out["value"] == {"all": pytest.approx(5 / 6), "letter": 1.0, "noise": 0.5}
    assert out["vn"] == {"all": pytest.approx(1 / 6), "letter": 0.0, "noise": 0.5}  # the reversed score ranks them last
    assert score_auroc({"value": value}, np.zeros(5, np.int16), {"digit": 0}, ["digit"]) == {}  # nothing to tell apart
    assert score_auroc({"value": value}, np.zeros(5, np.int16), {"": 0}, ["digit"]) == {}  # no tags


def test_parts_scored_before_labels_load_as_unlabelled(tmp_path):
    """A selection resumed over parts written before ``cls`` was kept counts their samples as unlabelled."""
    parts = ScoreParts(tmp_path, ["a.tar", "b.tar"], {"probe_blocks": [0]})
    parts.prepare()
    old = {
        "key": np.array(["k0", "k1"]),
        "src": np.array(["digit", "noise"]),
        "value": np.array([0.1, 0.2]),
        "vn": np.array([0.1, 0.2]),
        "pred": np.array([3, 4]),
    }
    parts.save("a.tar", [old], {})
    parts.save("b.tar", [{**old, "key": np.array(["k2", "k3"]), "label": np.array([3, -1])}], {})
    assert parts.load(0)["label"].tolist() == [-1, -1]
    assert parts.load(1)["label"].tolist() == [3, -1]
