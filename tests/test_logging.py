"""Local logging always; W&B offline when there is no key or network, never blocking; grouped runs with a
stable id; the probe images and the config in the offline run, the same images as PNG files without W&B."""

import csv
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from PIL import Image

from tests.conftest import fit
from vitkd.loggers import ID_FILE, WandbOptions, build_loggers, stable_run_id, wandb_mode

TINY_TEACHER = [
    "--config",
    "experiments/digits/teacher.yaml",
    "--model.init_args.arch",
    "test_vit_patch4_16",
    "--model.init_args.measure_batch_size",
    "0",
    "--trainer.limit_train_batches",
    "2",
    "--trainer.limit_val_batches",
    "1",
    "--trainer.limit_test_batches",
    "1",
]


def test_wandb_mode_honours_env_and_falls_back_offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode(None) == "disabled"
    assert wandb_mode("offline") == "offline"
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", "/nonexistent")
    monkeypatch.setattr("vitkd.loggers._has_api_key", lambda: False)
    assert wandb_mode(None) == "offline"


def test_wandb_disabled_by_env_leaves_the_local_logger_only(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    loggers = build_loggers(tmp_path, "run", WandbOptions(enabled=True), [])
    assert len(loggers) == 1 and isinstance(loggers[0], CSVLogger)


def test_wandb_group_job_type_and_id_defaults(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_RUN_GROUP", raising=False)
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    run = tmp_path / "runs" / "demo" / "teacher"
    loggers = build_loggers(
        run,
        "teacher",
        WandbOptions(enabled=True, mode="offline", tags=["t1"]),
        [],
        stage="Classifier",
        config_files=["experiments/digits/teacher.yaml"],
        config="model: {class_path: x}\n",
    )
    assert isinstance(loggers[0], CSVLogger) and isinstance(loggers[-1], WandbLogger), "local logger first, W&B last"
    init = loggers[-1]._wandb_init
    assert (
        init["group"] == "digits"
        and init["job_type"] == "Classifier"
        and init["tags"] == ["t1"]
        and init["mode"] == "offline"
    )
    assert init["config"] == {"model": {"class_path": "x"}}
    assert (run / ID_FILE).read_text().strip() == init["id"]
    assert loggers[-1]._experiment is None, "no W&B process is started before training"
    # without a config file the group is the run directory's parent (the experiment folder under runs/)
    other = build_loggers(
        tmp_path / "runs" / "demo" / "x", "x", WandbOptions(enabled=True, mode="offline"), [], stage="S"
    )
    assert other[-1]._wandb_init["group"] == "demo"


def test_wandb_run_id_is_stable_across_processes(tmp_path):
    """Python's hash() differs between processes; the id must not (a requeued job continues its W&B run)."""
    run = tmp_path / "run"
    here = stable_run_id(run, "my run")
    code = (
        "from pathlib import Path; from vitkd.loggers import stable_run_id; "
        f"print(stable_run_id(Path({str(run)!r}), 'my run'))"
    )
    other = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONHASHSEED": "123"},
        check=True,
    )
    assert other.stdout.strip() == here and here.startswith("my-run-")
    # once stored in the run directory, the stored id wins (a run directory moved to another path keeps its run)
    run.mkdir()
    (run / ID_FILE).write_text("kept-id\n")
    assert stable_run_id(run, "my run") == "kept-id"


def _png(path) -> np.ndarray:
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_wandb_offline_run_holds_probe_images_and_config_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # explicit: the suite disables W&B by default
    run = tmp_path / "wandb_run"
    fit(
        *TINY_TEACHER,
        "--trainer.max_epochs",
        "1",
        "--wandb.enabled",
        "true",
        "--wandb.group",
        "tests",
        "--run_dir",
        str(run),
    )
    assert (run / "metrics.csv").is_file() and (run / "metrics.json").is_file()
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1, "an offline W&B run directory is written for a later `wandb sync`"
    media = list(offline[0].glob("files/media/images/probe_maps_*.png"))
    assert len(media) == 1, "the attention-probe grid of the last epoch is in the W&B run"
    cfg = yaml.safe_load((offline[0] / "files" / "vitkd_config.yaml").read_text())
    assert (
        cfg["model"]["class_path"] == "vitkd.stages.Classifier"
        and cfg["model"]["init_args"]["arch"] == "test_vit_patch4_16"
    )
    assert not (run / "probe_maps").exists(), "with an image logger on, no PNG fallback"
    run_id = (run / ID_FILE).read_text().strip()
    assert (offline[0] / f"run-{run_id}.wandb").is_file()

    # the same run without W&B writes the same grid as a PNG file in the run directory
    plain = tmp_path / "plain"
    fit(*TINY_TEACHER, "--trainer.max_epochs", "1", "--run_dir", str(plain))
    png = _png(plain / "probe_maps" / "epoch000.png")
    assert png.shape == _png(media[0]).shape and png.shape[0] > 300 and png.shape[1] > 300
    assert np.array_equal(png, _png(media[0])), "the PNG fallback holds the same image W&B got"

    # resuming in the same run directory continues the same W&B run (same id)
    fit(
        *TINY_TEACHER,
        "--trainer.max_epochs",
        "2",
        "--wandb.enabled",
        "true",
        "--ckpt_path",
        str(run / "checkpoints" / "last.ckpt"),
        "--run_dir",
        str(run),
    )
    runs = sorted((run / "wandb").glob("offline-run-*"))
    # the run's records carry the id (W&B names the folder by the start second and adds "-1" on a clash)
    assert len(runs) == 2 and all((r / f"run-{run_id}.wandb").is_file() for r in runs)
    # ... and continues its local log: the first epoch's rows are kept, the second epoch's appended
    epochs = {r["epoch"] for r in csv.DictReader(open(run / "metrics.csv")) if r.get("val/acc")}
    assert epochs == {"0", "1"}


def test_offline_mode_message_names_the_sync_command(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setattr("vitkd.loggers._has_api_key", lambda: False)
    loggers = build_loggers(tmp_path, "r", WandbOptions(enabled=True), [], stage="S")
    assert loggers[-1]._wandb_init["mode"] == "offline"
    assert f"wandb sync {tmp_path / 'wandb'}" in capsys.readouterr().err


@pytest.mark.parametrize("requested", ["offline", "disabled"])
def test_explicit_mode_wins_over_env(requested, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "online")
    assert wandb_mode(requested) == requested
