"""What the selector hands its callbacks: the examples a report asks for are gathered in pool order while the
kept samples' shards are read, and the selection package and the report import nothing above the core."""

import ast
from pathlib import Path

import numpy as np
import torch

from vitkd.selection.examples import ExampleGatherer, ExampleRequest
from vitkd.selection.outputs import selected_samples

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    """The modules a module imports anywhere in its body (function-level imports too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def _above_core(names: set[str]) -> set[str]:
    upper = (
        "data_modules",
        "callbacks",
        "benchmarks",
        "vitkd.stages",
        "vitkd.fit",
        "vitkd.pack",
        "vitkd.report",
        "vitkd.demos",
    )
    return {n for n in names if n.startswith(upper)}


def test_selection_and_its_report_import_only_the_core():
    for path in sorted((ROOT / "vitkd" / "selection").glob("*.py")):
        assert not _above_core(_imports(path)), path.name
    report = _imports(ROOT / "callbacks" / "selection_report.py")
    assert report and not {n for n in _above_core(report) if not n.startswith("callbacks.")}


def test_request_merge():
    assert ExampleRequest.merge([None, ExampleRequest(0, 10)]) is None
    merged = ExampleRequest.merge(
        [ExampleRequest(5, 100, ("softmax",), seed=3), None, ExampleRequest(8, 50, ("pooled",))]
    )
    assert merged == ExampleRequest(8, 100, ("softmax", "pooled"), 3)


class Parts:
    """Three in-memory parts of 4 samples each (keys p<i>s<j>); ``load`` as ``RankedParts.load``."""

    urls = ["a.tar", "b.tar", "c.tar"]

    def load(self, i):
        keys = np.array([f"p{i}s{j}" for j in range(4)])
        return {"key": keys, "pred": np.arange(4), "value": np.zeros(4)}


def _read(url):
    i = Parts.urls.index(url)
    return [{"__key__": f"p{i}s{j}", "png": f"{i}{j}".encode(), "src": b"w"} for j in range(4)] + [
        {"__key__": f"p{i}bad", "png": b""}  # read but never scored (no row in the part)
    ]


def test_selected_samples_and_the_examples_gathered_on_the_way():
    kept = {1: np.array([0, 2])}  # part 0 holds nothing kept: read only for the examples
    decoded = []

    def decode(sample):
        decoded.append(sample["__key__"])
        return torch.full((1, 2, 2), float(len(decoded)))

    gather = ExampleGatherer(ExampleRequest(per_group=2, max_scan=8), decode)
    out = list(selected_samples(Parts(), kept, _read, ("png", "src"), gather))
    assert out == [
        {"__key__": "p1s0", "cls": b"0", "png": b"10", "src": b"w"},
        {"__key__": "p1s2", "cls": b"2", "png": b"12", "src": b"w"},
    ]
    # pool order: part 0's four rejected (two taken), its unscored sample, then part 1's kept ones
    assert decoded == ["p0s0", "p0s1", "p1s0", "p1s2"]
    assert gather.seen == 8 and not gather.wants_more
    assert [len(v) for v in gather.images.values()] == [2, 2]
    # no examples wanted: only the shards with kept samples are read
    read = []
    list(selected_samples(Parts(), kept, lambda u: read.append(u) or _read(u), ("png",)))
    assert read == ["b.tar"]


def test_gatherer_stops_at_max_scan():
    gather = ExampleGatherer(ExampleRequest(per_group=5, max_scan=3), lambda s: torch.zeros(1, 2, 2))
    for j in range(10):
        gather.offer({"__key__": str(j)}, selected=j % 2 == 0)
    assert gather.seen == 3 and [len(v) for v in gather.images.values()] == [2, 1]
