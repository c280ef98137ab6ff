"""``python -m vitkd.demos.bench_wild --quick`` end to end through the CLI on tiny IDX files written here: every row
of the summary, the fusion weights chosen on validation images, the plot, and one-line errors for a missing
data set and for a kept size larger than the pool."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_pack import write_idx

from data_modules import fashion
from vitkd.demos.bench_wild import needed_selections

ROOT = Path(__file__).resolve().parents[1]
PER_CLASS = 30


def tiny_fashion(folder: Path) -> Path:
    rng = np.random.default_rng(3)
    y = rng.permutation(np.repeat(np.arange(10), PER_CLASS)).astype(np.uint8)
    # class-dependent brightness, so the tiny teacher learns something in one epoch
    x = np.clip(rng.normal(25 * y[:, None, None], 20, (len(y), 28, 28)), 0, 255).astype(np.uint8)
    yt = rng.integers(0, 10, 40).astype(np.uint8)
    xt = np.clip(rng.normal(25 * yt[:, None, None], 20, (len(yt), 28, 28)), 0, 255).astype(np.uint8)
    for split, (a, b) in {"train": (x, y), "test": (xt, yt)}.items():
        write_idx(folder / fashion.FILES[split][0], a)
        write_idx(folder / fashion.FILES[split][1], b)
    return folder


def bench(tmp_path: Path, *args: str, env_dir: Path | None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    env.pop("FASHION_MNIST_DIR", None)
    if env_dir is not None:
        env["FASHION_MNIST_DIR"] = str(env_dir)
    return subprocess.run(
        [sys.executable, "-m", "vitkd.demos.bench_wild", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.mark.slow
def test_quick_bench_end_to_end(tmp_path):
    data = tiny_fashion(tmp_path / "fashion")
    out = tmp_path / "bench"
    tiny = [
        "--wild_max",
        "10",
        "--val_per_class",
        "5",
        "--ood_scale",
        "0.005",
        "--val_limit",
        "20",
        "--data_dir",
        str(tmp_path / "data"),
    ]
    common = "--trainer.max_epochs 1 --data.init_args.epoch_samples 64 --data.init_args.eval_batch_size 64"
    # two rows and the one whose scores both reuse (attention_probe): every kind of job, fewer processes
    done = bench(
        tmp_path,
        "--quick",
        "--out",
        str(out),
        *tiny,
        "--common",
        common,
        "--selections",
        "oracle",
        "vitkd_fusion",
        env_dir=data,
    )
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    rows = json.loads((out / "summary.json").read_text())
    names = [(r["run"], r.get("kept_size")) for r in rows]
    assert names[:3] == [("teacher", None), ("scratch", None), ("kd_original", None)]
    assert names[3:] == [(s, k) for s in ("attention_probe", "oracle", "vitkd_fusion") for k in ("k1", "k2")]
    k1 = next(r["num_keep"] for r in rows if r.get("kept_size") == "k1")
    for r in rows:
        assert r["num_test"] == 40 and 0.0 <= r["test_acc_mean"] <= 1.0
        if r.get("kept_size"):
            assert r["num_keep"] == (k1 if r["kept_size"] == "k1" else 2 * k1) and r["seeds"] == 1
            assert 0.0 <= r["precision"] <= 1.0 and r["recall"] is not None
    oracle = next(r for r in rows if r["run"] == "oracle" and r["kept_size"] == "k1")
    assert oracle["precision"] == pytest.approx(1.0)  # k1 = the pool's in-distribution images, all first
    assert next(r for r in rows if r["run"] == "attention_probe")["value_auroc"] is not None
    choice = json.loads((out / "select" / "fusion_choice.json").read_text())
    assert choice["num_val"] == 20 and len(choice["grid"]) == 15
    cfg = (out / "select" / "vitkd_fusion-k1" / "config.yaml").read_text()
    assert all(k in cfg for k in choice["weights"])
    assert (out / "bench_wild.png").stat().st_size > 0
    info = json.loads((out / "run_info.json").read_text())
    assert info["quick"] and info["teacher_reused"] is False and info["machine"]
    assert "bench-wild finished" in done.stdout
    # a kept size larger than the pool: one line, before any score is written
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FASHION_MNIST_DIR": str(data)}
    pool = json.loads((out / "run_info.json").read_text())["pool"]["urls"]
    sel = subprocess.run(
        [
            sys.executable,
            "-m",
            "vitkd.fit",
            "--config",
            "experiments/fashion/select.yaml",
            "--run_dir",
            str(tmp_path / "big"),
            "--model.init_args.teacher_ckpt",
            str(out / "teacher" / "checkpoints" / "best.ckpt"),
            "--data.init_args.wild_urls",
            pool,
            "--data.init_args.wild_max",
            "10",
            "--data.init_args.val_per_class",
            "5",
            "--model.init_args.num_keep",
            "100000",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    err = [ln for ln in sel.stderr.splitlines() if ln.startswith("vitkd: error")]
    assert sel.returncode != 0 and len(err) == 1 and "num_keep" in err[0], sel.stderr[-2000:]
    assert not list((tmp_path / "big").glob("score_parts/part-*.npz"))


def test_needed_selections():
    assert needed_selections(["vitkd_fusion"]) == ["attention_probe", "vitkd_fusion"]
    assert needed_selections(None)[-1] == "vitkd_fusion"
    with pytest.raises(Exception, match="unknown"):
        needed_selections(["best"])


def test_missing_data_one_line(tmp_path):
    done = bench(tmp_path, "--quick", "--out", str(tmp_path / "b"), env_dir=tmp_path / "nowhere")
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1 and "FASHION_MNIST_DIR" in lines[0] and "nowhere" in lines[0]
    assert not (tmp_path / "b").exists()  # refused before anything is written
