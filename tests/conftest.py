from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
# precision: auto caches its timings under XDG_CACHE_HOME: the suite keeps its own, never the user's
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="vitkd-test-cache-")


def fit(*args: str) -> dict:
    from vitkd.fit import cli_main

    return cli_main(["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", *args])


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    """A 2-block teacher trained for one short epoch through the CLI; returns its best checkpoint."""
    run = tmp_path_factory.mktemp("teacher")
    fit(
        "--config",
        "experiments/digits/teacher.yaml",
        "--model.init_args.arch",
        "test_vit_patch4_16",
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "4",
        "--run_dir",
        str(run),
    )
    return run / "checkpoints" / "best.ckpt"


@pytest.fixture(scope="session")
def tiny_pool(tmp_path_factory) -> str:
    """A handmade wild pool: 3 shards of 40 samples with src tags; the digits (every third) and some noise carry cls."""
    from data_modules.shards import encode_png, write_shards

    out = tmp_path_factory.mktemp("pool")
    rng = np.random.default_rng(0)

    def samples():
        for i in range(120):
            img = (rng.random((8, 8)) * 255).astype(np.uint8)
            sample = {"__key__": f"s{i:04d}", "png": encode_png(img), "src": "digit" if i % 3 == 0 else "noise"}
            if i % 3 == 0:
                sample["cls"] = str(i % 10) if i else "12"  # 12: beyond the 10 classes, not counted as labelled
            elif i % 9 == 1:  # another source's labels, not counted either
                sample["cls"] = "5"
            yield sample

    write_shards(samples(), out, pattern="wild-%06d.tar", maxcount=40)
    return str(out / "wild-{000000..000002}.tar")


_FAULTS: dict[str, dict] = {}  # fault -> {fault, tries, survived, data lost}, filled by tests/test_faults.py


@pytest.fixture
def fault_log() -> dict:
    return _FAULTS


def pytest_terminal_summary(terminalreporter):
    """The fault-injection table (``fault``, ``tries``, ``survived``, ``data lost``), also written to
    ``runs/faults/summary.json``, when fault tests ran."""
    if not _FAULTS:
        return
    from vitkd.io import write_json

    rows = sorted(_FAULTS.values(), key=lambda r: r["fault"])
    width = max(len(r["fault"]) for r in rows)
    terminalreporter.write_sep("-", "fault injection")
    terminalreporter.write_line(f"{'fault':<{width}}  tries  survived  data lost")
    for r in rows:
        terminalreporter.write_line(f"{r['fault']:<{width}}  {r['tries']:>5}  {r['survived']:>8}  {r['data lost']:>9}")
    write_json(Path(__file__).resolve().parent.parent / "runs" / "faults" / "summary.json", {"faults": rows})


DET_TINY = [  # a detection stage in one short step
    "--trainer.max_epochs",
    "1",
    "--trainer.limit_train_batches",
    "2",
    "--trainer.limit_val_batches",
    "1",
    "--trainer.limit_test_batches",
    "1",
    "--model.init_args.arch",
    "detr_test",
    "--model.init_args.measure_batch_size",
    "4",
    "--data.init_args.num_train",
    "16",
    "--data.init_args.num_val",
    "8",
    "--data.init_args.num_test",
    "8",
    "--data.init_args.batch_size",
    "4",
    "--trainer.callbacks+=callbacks.AttentionProbeLogger",
    "--trainer.callbacks.every_n_epochs",
    "0",
]


@pytest.fixture(scope="session")
def det_teacher(tmp_path_factory) -> Path:
    """A detr_test teacher trained one short step through the CLI; returns its best checkpoint."""
    data, run = tmp_path_factory.mktemp("aerial"), tmp_path_factory.mktemp("det_teacher")
    metrics = fit(
        "--config",
        "experiments/detection/teacher.yaml",
        *DET_TINY,
        "--data.init_args.data_dir",
        str(data),
        "--run_dir",
        str(run),
    )
    for key in ("test/map", "test/map50", "params", "gflops", "images_per_s"):
        assert math.isfinite(metrics[key])
    assert 0.0 <= metrics["test/map"] <= 1.0 and metrics["params"] > 0 and metrics["gflops"] > 0
    assert json.loads((run / "metrics.json").read_text())["test/map"] == metrics["test/map"]
    return run / "checkpoints" / "best.ckpt"
