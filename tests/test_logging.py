"""Local logging always; W&B offline when there is no key or network, never blocking."""
import pytest

from tests.conftest import fit
from vitkd.logging import wandb_mode


def test_wandb_mode_honours_env_and_falls_back_offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode(None) == "disabled"
    assert wandb_mode("offline") == "offline"
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", "/nonexistent")
    monkeypatch.setattr("vitkd.logging._has_api_key", lambda: False)
    assert wandb_mode(None) == "offline"


def test_wandb_offline_run_is_written_beside_local_log(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setattr("vitkd.logging._has_api_key", lambda: False)
    fit(
        "--config", "experiments/digits/teacher.yaml",
        "--model.init_args.arch", "test_vit_patch4_16",
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
        "--wandb.enabled", "true", "--wandb.group", "tests",
        "--run_dir", str(tmp_path),
    )
    assert (tmp_path / "metrics.csv").is_file() and (tmp_path / "metrics.json").is_file()
    offline_runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert offline_runs, "an offline W&B run directory is written for a later `wandb sync`"
