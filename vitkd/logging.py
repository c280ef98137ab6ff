"""Loggers for a run: a local CSV logger always (it owns the run directory), W&B second when asked.

W&B never blocks a run: with ``WANDB_MODE`` set it is honoured; with no API key or no route to the
server it runs offline, and the ``wandb sync`` command to upload later is printed.
"""
from __future__ import annotations

import netrc
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.utilities import rank_zero_info


@dataclass
class WandbOptions:
    """W&B logging (off unless ``enabled``). ``mode``: None = online if reachable, else offline."""

    enabled: bool = False
    project: str = "vitkd"
    entity: str | None = None
    group: str | None = None
    job_type: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: str | None = None


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def _reachable(host: str = "api.wandb.ai", port: int = 443, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wandb_mode(requested: str | None) -> str:
    """The mode W&B will run in: explicit setting or env first, else online only if a key and a route exist."""
    mode = requested or os.environ.get("WANDB_MODE")
    if mode:
        return mode
    return "online" if _has_api_key() and _reachable() else "offline"


def build_loggers(run_dir: Path, run_name: str, wandb: WandbOptions | None, extra: list[Logger]) -> list[Logger]:
    loggers: list[Logger] = [CSVLogger(save_dir=str(run_dir), name="", version="")]
    loggers.extend(extra)
    if wandb is not None and wandb.enabled:
        mode = wandb_mode(wandb.mode)
        if mode != "disabled":
            from lightning.pytorch.loggers import WandbLogger

            run_id = f"{run_name}-{abs(hash(str(run_dir.resolve()))) % 10**8:08d}"
            logger = WandbLogger(
                name=run_name,
                save_dir=str(run_dir),
                id=run_id,
                project=wandb.project,
                entity=wandb.entity,
                group=wandb.group,
                job_type=wandb.job_type,
                tags=wandb.tags,
                mode=mode,
                settings={"init_timeout": 30, "silent": True},
            )
            loggers.append(logger)
            if mode == "offline":
                rank_zero_info(f"W&B is offline: upload later with `wandb sync {run_dir / 'wandb'}`")
    return loggers


def finish_loggers(loggers: list[Logger]) -> None:
    """Close a W&B run at the end of its stage, so the next run in the same process starts its own."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:  # never start a run just to end it
            logger.experiment.finish()
