"""The generator demo's job list, summary and figure with stand-in runs (no training)."""

import json

import numpy as np
import pytest
from PIL import Image

from vitkd.demos import generators as gdemo


def fake_run_fit(calls):
    def run(config, run_dir, *extra, show=()):
        calls.append((str(config), str(run_dir), list(extra)))
        seed = int(extra[extra.index("--seed_everything") + 1]) if "--seed_everything" in extra else 0
        (run_dir / "samples").mkdir(parents=True, exist_ok=True)
        Image.fromarray((np.random.default_rng(seed).random((18, 18)) * 255).astype(np.uint8)).save(
            run_dir / "samples" / "epoch005.png"
        )
        fast = "fast.yaml" in str(config)
        m = {
            "test/acc": 0.5 + 0.1 * seed,
            "best_val/agree": 0.7,
            "labelled_val/acc": 0.6,
            "params": 10,
            "generator_params": 5,
            "synthesizer": "fast" if fast else "joint",
            "generator_steps": 96 if fast else 240,
            "batch_size": 64,
            "student_images": 480 * 64,
        }
        (run_dir / "metrics.json").write_text(json.dumps(m))
        return m

    return run


def test_digits_demo_rows_summary_and_figure(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(gdemo, "run_fit", fake_run_fit(calls))
    demo = tmp_path / "demo"
    (demo / "teacher" / "checkpoints").mkdir(parents=True)
    (demo / "teacher" / "checkpoints" / "best.ckpt").write_bytes(b"x")
    (demo / "select_ap" / "selected").mkdir(parents=True)
    (demo / "select_ap" / "selected" / "meta.json").write_text(json.dumps({"shards": 3}))
    monkeypatch.setitem(
        gdemo.TEACHERS, "digits", dict(ckpt=str(demo / "teacher" / "checkpoints" / "best.ckpt"), args=[])
    )
    gdemo.main(["--out", str(tmp_path / "out"), "--demo", str(demo), "--workers", "2"])
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    rows = {r["run"]: r for r in s["rows"]}
    assert list(rows) == ["dafl", "transformer_gan", "hybrid", "fast"]
    for r in rows.values():
        assert r["seeds"] == 3 and r["test_acc_mean"] == pytest.approx(0.6) and r["test_acc_std"] == pytest.approx(0.1)
        assert r["wall_s_mean"] > 0 and len(r["wall_s"]) == 3 and r["distilled_images_per_s"] > 0
    assert rows["fast"]["generator_steps"] == 96 and rows["fast"]["images_generated"] == 96 * 64
    assert rows["dafl"]["images_generated"] == 240 * 64
    hybrid = [c for c in calls if "hybrid.yaml" in c[0]]
    assert len(hybrid) == 3 and all(
        "--data.init_args.train_urls" in c[2]
        and c[2][c[2].index("--data.init_args.train_urls") + 1].endswith("shard-{000000..000002}.tar")
        for c in hybrid
    )
    assert all("--model.init_args.labelled_val" in c[2] for c in calls)
    assert (tmp_path / "out" / "generators.png").is_file()


def test_fashion_demo_needs_its_teacher_and_skips_the_hybrid(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(gdemo, "run_fit", fake_run_fit(calls))
    monkeypatch.setitem(
        gdemo.TEACHERS, "fashion", dict(ckpt=str(tmp_path / "missing.ckpt"), args=["--data.class_path", "x"])
    )
    from vitkd.errors import VitkdInputError

    with pytest.raises(VitkdInputError, match="make bench-wild-teacher"):
        gdemo.main(["--teacher", "fashion", "--out", str(tmp_path / "out")])
    (tmp_path / "missing.ckpt").write_bytes(b"x")
    monkeypatch.setattr(
        gdemo, "figure", lambda out, teacher, grids: out / "generators.png"
    )  # no Fashion-MNIST files here
    gdemo.main(["--teacher", "fashion", "--out", str(tmp_path / "out"), "--seeds", "0"])
    rows = [r["run"] for r in json.loads((tmp_path / "out" / "summary.json").read_text())["rows"]]
    assert rows == ["dafl", "transformer_gan", "fast"]
    assert "hybrid] skipped" in capsys.readouterr().out
    assert all(c[2][-2:] == ["--data.class_path", "x"] for c in calls)
