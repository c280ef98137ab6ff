"""``python -m vitkd.report``: one table (Markdown, CSV) and PNG plots from run directories."""

import csv
import json
import statistics

import numpy as np
import yaml
from PIL import Image

from vitkd.report import main


def _run(path, metrics: dict, stage: str, curve: list[tuple[int, float, float]]):
    """A fake run directory: metrics.json, config.yaml and a metrics.csv with val/acc per epoch, train/loss per step."""
    path.mkdir(parents=True)
    (path / "metrics.json").write_text(json.dumps(metrics))
    (path / "config.yaml").write_text(
        yaml.safe_dump({"model": {"class_path": f"vitkd.stages.{stage}", "init_args": {}}})
    )
    with open(path / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "step", "train/loss", "val/acc"])
        for epoch, loss, acc in curve:
            w.writerow([epoch, 10 * epoch + 5, loss, ""])
            w.writerow([epoch, 10 * epoch + 9, "", acc])


def _image(path) -> np.ndarray:
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _fake_runs(root):
    accs = [0.81, 0.85, 0.83]
    for seed, acc in enumerate(accs):
        _run(
            root / "student" / f"seed{seed}",
            {"test/acc": acc, "params": 80000, "gflops": 0.003},
            "ProbeDistillation",
            [(e, 2.0 - 0.3 * e - 0.01 * seed, 0.5 + 0.1 * e + 0.01 * seed) for e in range(4)],
        )
    _run(
        root / "teacher",
        {"test/acc": 0.98, "params": 700000, "gflops": 0.023},
        "Classifier",
        [(e, 1.5 - 0.2 * e, 0.7 + 0.05 * e) for e in range(4)],
    )
    _run(root / "select", {"precision": 0.65, "recall": 0.32, "num_kept": 4000}, "AttentionProbeSelector", [])
    (root / "summary.json").write_text("[]")  # a file among the arguments is skipped
    return accs


def test_report_table_and_plots(tmp_path, capsys):
    accs = _fake_runs(tmp_path / "runs")
    args = [str(p) for p in sorted((tmp_path / "runs").iterdir())]
    assert main([*args, "--out", str(tmp_path / "out")]) == 0

    rows = {r["run"]: r for r in csv.DictReader(open(tmp_path / "out" / "report.csv"))}
    assert set(rows) == {"student", "teacher", "select"}, "seed directories are one row"
    s = rows["student"]
    assert (s["stage"], s["seeds"]) == ("ProbeDistillation", "3")
    assert (
        float(s["test/acc_mean"]) == statistics.fmean(accs)
        and abs(float(s["test/acc_std"]) - statistics.stdev(accs)) < 1e-12
    )
    assert float(rows["teacher"]["params_mean"]) == 700000 and rows["teacher"]["seeds"] == "1"
    assert float(rows["select"]["precision_mean"]) == 0.65 and rows["select"]["test/acc_mean"] == ""

    md = (tmp_path / "out" / "report.md").read_text()
    assert (
        f"| student | ProbeDistillation | 3 | {100 * statistics.fmean(accs):.2f} ± {100 * statistics.stdev(accs):.2f} |"
        in md
    )
    assert "| select | AttentionProbeSelector | 1 | – |" in md and md in capsys.readouterr().out

    for name in ("accuracy_vs_params", "accuracy_vs_flops", "training_curves"):
        img = _image(tmp_path / "out" / f"{name}.png")
        assert img.shape[0] >= 300 and img.shape[1] >= 500, name
        assert (img < 128).mean() > 0.005, f"{name} has drawn content, not a blank canvas"


def test_report_default_out_is_beside_the_runs_and_no_flops_no_flops_plot(tmp_path):
    _run(tmp_path / "exp" / "a", {"test/acc": 0.9, "params": 10}, "Classifier", [(0, 1.0, 0.9)])
    _run(tmp_path / "exp" / "b", {"test/acc": 0.8, "params": 20}, "Classifier", [(0, 1.0, 0.8)])
    assert main([str(tmp_path / "exp")]) == 0
    out = tmp_path / "exp" / "comparison"
    assert sorted(p.name for p in out.iterdir()) == [
        "accuracy_vs_params.png",
        "report.csv",
        "report.md",
        "training_curves.png",
    ]
    assert [r["run"] for r in csv.DictReader(open(out / "report.csv"))] == ["a", "b"]


def test_report_without_runs_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vitkd: error: no metrics.json under")


def test_report_bad_metrics_and_out_are_one_line_errors(tmp_path, capsys):
    _run(tmp_path / "runs" / "good", {"test/acc": 0.9, "params": 10}, "Classifier", [(0, 1.0, 0.5)])
    (tmp_path / "afile").write_text("keep")
    assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "afile")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--out" in err[0] and "afile is a file" in err[0]
    assert (tmp_path / "afile").read_text() == "keep"
    for name, text, words in (
        ("half", '{"test/acc": 0.9,', "is not valid JSON"),
        ("list", "[1, 2]", "is not a JSON object of figures"),
    ):
        _run(tmp_path / name / "r", {}, "Classifier", [(0, 1.0, 0.5)])
        (tmp_path / name / "r" / "metrics.json").write_text(text)
        assert main([str(tmp_path / name), "--out", str(tmp_path / f"out-{name}")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert (
            len(err) == 1
            and err[0].startswith("vitkd: error:")
            and f"{name}/r/metrics.json" in err[0]
            and words in err[0]
        ), err
