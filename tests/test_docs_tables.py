"""The generated result tables of README.md and docs/*.md match the committed results JSON they name."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from vitkd.demos import tables
from vitkd.errors import VitkdInputError

ROOT = Path(__file__).resolve().parents[1]
SWEEP = {
    "teachers": {"vit": {"test_acc": 0.9833}, "cnn": {"test_acc": 0.99}},
    "rows": [
        {
            "teacher": "vit",
            "generator_steps": 240,
            "seeds": 3,
            "test_acc_mean": 0.25,
            "test_acc_std": 0.05,
            "final_val_agree_train_mode": 0.5,
            "final_val_agree_eval_mode": 0.4,
            "s_per_generator_step": 2.0,
        }
    ],
}


def test_repository_tables_are_up_to_date():
    assert tables.update(ROOT, check=True) == []


def test_repository_pages_have_generated_tables():
    names = {m["name"] for p in tables.pages(ROOT) for m in tables.MARKER.finditer(p.read_text())}
    assert {"bench-wild", "bench-wild-short", "generator-sweep", "generator-variants", "bench-speed"} <= names


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    heads = re.findall(r"^#+ (.+)$", page.read_text(), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


def test_repository_relative_links_resolve():
    missing = []
    for page in tables.pages(ROOT):
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", page.read_text()):
            if "://" in target:
                continue
            path = page.parent / target if target else page
            if not path.exists() or (anchor and path.suffix == ".md" and anchor not in _anchors(path)):
                missing.append(f"{page.relative_to(ROOT)}: {target}#{anchor}")
    assert missing == []


def _tiny(tmp_path: Path, body: str) -> Path:
    (tmp_path / "res").mkdir()
    (tmp_path / "res" / "sweep.json").write_text(json.dumps(SWEEP))
    (tmp_path / "docs").mkdir()
    page = tmp_path / "docs" / "page.md"
    page.write_text(f"Intro.\n\n<!-- table: generator-sweep res/sweep.json -->\n{body}<!-- /table -->\n\nAfter.\n")
    (tmp_path / "README.md").write_text("# tiny\n")
    return page


def test_stale_table_is_detected_then_rewritten(tmp_path):
    page = _tiny(tmp_path, "| typed by hand | 99.99 |\n")
    with pytest.raises(SystemExit) as err:
        tables.main(["--root", str(tmp_path), "--check"])
    assert "docs/page.md" in str(err.value) and len(str(err.value).splitlines()) == 1
    assert "99.99" in page.read_text()  # --check changes nothing

    tables.main(["--root", str(tmp_path)])
    text = page.read_text()
    assert "99.99" not in text and "| ViT (98.33%) | 240 | 3 | 25.00 ± 5.00 | 0.500 | 0.400 | 2.00 |" in text
    assert text.startswith("Intro.\n\n<!-- table: generator-sweep res/sweep.json -->\n| teacher")
    assert text.endswith("<!-- /table -->\n\nAfter.\n")
    tables.main(["--root", str(tmp_path), "--check"])  # now up to date: returns, no exit


def test_json_change_makes_table_stale(tmp_path):
    _tiny(tmp_path, "")
    tables.main(["--root", str(tmp_path)])
    assert tables.update(tmp_path, check=True) == []
    changed = json.loads((tmp_path / "res" / "sweep.json").read_text())
    changed["rows"][0]["test_acc_mean"] = 0.3
    (tmp_path / "res" / "sweep.json").write_text(json.dumps(changed))
    assert tables.update(tmp_path, check=True) == ["docs/page.md"]


@pytest.mark.parametrize(
    "marker, expect",
    [
        ("<!-- table: nosuch res/sweep.json -->\n<!-- /table -->", "unknown table 'nosuch'"),
        ("<!-- table: generator-sweep res/missing.json -->\n<!-- /table -->", "res/missing.json"),
        ("<!-- table: generator-sweep res/sweep.json -->\n", "lacks"),
        ("<!-- table: bench-wild res/sweep.json -->\n<!-- /table -->", "lacks the field"),
    ],
)
def test_bad_marker_is_one_line_error(tmp_path, marker, expect):
    page = _tiny(tmp_path, "")
    page.write_text(marker)
    with pytest.raises(VitkdInputError, match=re.escape(expect)):
        tables.update(tmp_path, check=True)


def test_digits_demo_tables_from_the_demo_record(tmp_path):
    """The demo's rows, recorded with machine and date, render per-seed accuracies and the selection bounds."""
    from vitkd.demos.pipeline import record

    rows = [
        {
            "run": "teacher",
            "data": "original (labels)",
            "params": 1000,
            "test_acc_mean": 0.98,
            "test_acc_std": 0.0,
            "seeds": 1,
        },
        {
            "run": "attention_probe",
            "data": "wild, selected",
            "params": 100,
            "test_acc_mean": 0.95,
            "test_acc_std": 0.02,
            "test_accs": [0.93, 0.95, 0.97],
            "seeds": 3,
            "precision": 0.46,
            "precision_max": 0.667,
            "value_auroc": 0.64,
            "num_kept": 12000,
        },
    ]
    path = record(rows, 812.4, 2, tmp_path)
    res = json.loads(path.read_text())
    assert path.name == f"{re.sub(r'[^a-z0-9]+', '-', res['machine'].lower()).strip('-')}-{res['date']}.json"
    assert res["wall_s"] == 812 and res["jobs"] == 2 and res["rows"] == rows
    full = tables.digits_demo(res).splitlines()
    assert full[2] == "| teacher | original (labels) | 1,000 | – | 98.00 (1 run) | – | – | – |"
    assert full[3] == (
        "| attention_probe | wild, selected (12,000 kept) | 100 | 93.00, 95.00, 97.00 | 95.00 ± 2.00 | "
        "0.460 | 0.667 | 0.640 |"
    )
    assert (
        tables.digits_demo_short(res).splitlines()[3] == "| attention_probe | wild, selected | 95.00 ± 2.00 | 0.460 |"
    )
