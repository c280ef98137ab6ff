"""Loggers for a run: a local CSV logger always (it owns the run directory), W&B second when asked.

W&B never blocks a run: with ``WANDB_MODE`` set it is honoured (``disabled`` switches it off); with no
API key or no route to the server it runs offline, and the ``wandb sync`` command to upload later is
printed. Runs are grouped for comparison: ``group`` = the experiment (the config file's folder, e.g.
``digits`` for ``experiments/digits/select.yaml``), ``job_type`` = the stage class. The run id is stable
(stored in ``RUN_DIR/wandb_id.txt`` on first start, derived from the run directory), so a resumed or
requeued run continues its W&B run; it continues its ``metrics.csv`` too (Lightning's CSV logger would
start it afresh).
"""

from __future__ import annotations

import csv
import hashlib
import logging
import netrc
import os
import re
import socket
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger  # WandbLogger imports wandb only when used
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_only

from vitkd.io import atomic_path, write_text

ID_FILE = "wandb_id.txt"


@dataclass
class WandbOptions:
    """W&B logging (off unless ``enabled``).

    ``mode``: None = online if a key and a route exist, else offline; or ``online``/``offline``/``disabled``.
    ``group``: None = the experiment (the first config file's folder name; the run directory's parent
    without a config file). ``job_type``: None = the stage class name. ``id``: None = stable per run directory.
    """

    enabled: bool = False
    project: str = "vitkd"
    entity: str | None = None
    group: str | None = None
    job_type: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: str | None = None
    id: str | None = None


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def _reachable(host: str = "api.wandb.ai", port: int = 443, timeout: float = 3.0) -> bool:
    """A TCP connection to the server within ``timeout`` seconds, DNS included (a thread bounds the lookup,
    which ``create_connection``'s own timeout does not cover)."""
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(result and result[0])


def wandb_mode(requested: str | None) -> str:
    """The mode W&B will run in: explicit setting or env first, else online only if a key and a route exist."""
    mode = requested or os.environ.get("WANDB_MODE")
    if mode:
        return mode
    return "online" if _has_api_key() and _reachable() else "offline"


def default_group(config_files: Sequence[str | os.PathLike] | None, run_dir: Path) -> str:
    """The experiment a run belongs to: the folder of its first config file (``experiments/<experiment>/
    <stage>.yaml``), else the run directory's parent (``runs/<experiment>/<run>``)."""
    if config_files:
        return Path(str(config_files[0])).resolve().parent.name
    return run_dir.resolve().parent.name


def stable_run_id(run_dir: Path, run_name: str) -> str:
    """The W&B id of the run in ``run_dir``: read from ``wandb_id.txt`` when a previous start wrote it, else
    ``<run name>-<sha1 of the resolved run directory>`` (the same on every process and every restart)."""
    stored = run_dir / ID_FILE
    if stored.is_file():
        text = stored.read_text().strip()
        if text:
            return text
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", run_name).strip("-")[:40] or "run"
    digest = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:10]
    return f"{slug}-{digest}"


@rank_zero_only
def _store_run_id(run_dir: Path, run_id: str) -> None:
    if not (run_dir / ID_FILE).is_file():
        write_text(run_dir / ID_FILE, run_id + "\n")


@rank_zero_only
def _say(msg: str) -> None:
    print(f"vitkd: {msg}", file=sys.stderr, flush=True)


class DurableWriter(ExperimentWriter):
    """Lightning's CSV writer, but ``metrics.csv`` and ``hparams.yaml`` are rewritten whole through
    ``vitkd.io.atomic_path`` (temporary file, fsync, rename) at every save, and an existing ``metrics.csv``
    is never deleted: a resumed run (``keep_epochs``: the last epoch its checkpoint finished) keeps the rows
    of the epochs up to it and drops those of the epochs it trains again, so each epoch is logged once."""

    def __init__(self, log_dir: str, keep_epochs: int | None = None):
        self._keep_epochs = keep_epochs
        self._rows: list[dict[str, Any]] = []
        super().__init__(log_dir=log_dir)

    def _check_log_dir_exists(self) -> None:  # Lightning's deletes metrics.csv here
        if self._keep_epochs is None or not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as f:
            rows = list(csv.DictReader(f))
        self._rows = [r for r in rows if not r.get("epoch") or float(r["epoch"]) <= self._keep_epochs]
        self.metrics_keys = sorted({k for r in rows for k in r})

    def log_hparams(self, params: dict[str, Any]) -> None:
        from lightning.pytorch.core.saving import save_hparams_to_yaml

        self.hparams.update(params)
        with atomic_path(Path(self.log_dir) / self.NAME_HPARAMS_FILE) as tmp:
            save_hparams_to_yaml(str(tmp), self.hparams)

    def save(self) -> None:
        if not self.metrics:
            return
        self._record_new_keys()
        self._rows.extend(self.metrics)
        self.metrics = []
        with atomic_path(self.metrics_file_path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(self._rows)


class ResumableCSVLogger(CSVLogger):
    """A ``CSVLogger`` writing through ``DurableWriter``; a resumed run (``--ckpt_path``, or a SLURM
    requeue) continues ``metrics.csv`` after ``resume_epoch``, the last epoch its checkpoint finished."""

    def __init__(self, *args: Any, resume: bool = False, resume_epoch: int | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._resume = resume
        self._resume_epoch = resume_epoch

    @property
    @rank_zero_experiment
    def experiment(self):
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            keep = (self._resume_epoch if self._resume_epoch is not None else float("inf")) if self._resume else None
            self._experiment = DurableWriter(log_dir=self.log_dir, keep_epochs=keep)
        return self._experiment


class RunWandbLogger(WandbLogger):
    """A ``WandbLogger`` that also stores the run's resolved config file with the W&B run, as
    ``files/vitkd_config.yaml`` (uploaded by ``wandb sync`` for offline runs)."""

    def __init__(self, *args: Any, config_text: str | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._config_text = config_text

    @property
    @rank_zero_experiment
    def experiment(self):
        new = self._experiment is None
        run = super().experiment
        if new and self._config_text and getattr(run, "dir", None):
            path = Path(run.dir) / "vitkd_config.yaml"
            path.write_text(self._config_text)
            run.save(str(path), base_path=run.dir, policy="now")
        return run


class _NoAdverts(logging.Filter):
    """Drops Lightning's "💡 Tip: ... install litlogger/litmodels" lines: advertising, nothing about the run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("💡 Tip")


def quiet_lightning() -> None:
    """Hide Lightning's advertising lines, and its warning that a resumed run's checkpoint folder is not
    empty (resuming from it is the point; vitkd refuses a run_dir holding another run before it starts)."""
    import warnings

    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _NoAdverts) for f in log.filters):
            log.addFilter(_NoAdverts())
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")


def slurm_requeued(run_dir: Path) -> bool:
    """A SLURM job requeued after Lightning saved ``hpc_ckpt_*.ckpt`` in its run directory: it resumes from
    that checkpoint without ``--ckpt_path``."""
    return SLURMEnvironment.detect() and any(Path(run_dir).glob("hpc_ckpt_*.ckpt"))


def build_loggers(
    run_dir: Path,
    run_name: str,
    wandb: WandbOptions | None,
    extra: list[Logger],
    stage: str | None = None,
    config_files: Sequence[str | os.PathLike] | None = None,
    config: dict[str, Any] | str | None = None,
    resume: bool = False,
    resume_epoch: int | None = None,
) -> list[Logger]:
    """CSVLogger (owns ``run_dir``), then the user's loggers, then W&B when enabled and not disabled.

    ``stage``: the stage class name (default ``job_type``); ``config_files``: the ``--config`` files (default
    ``group``); ``config``: the resolved run config (a dict or its YAML text), stored in the W&B run's config;
    ``resume``: the run resumes from a checkpoint, so ``metrics.csv`` is continued (also on a SLURM requeue,
    detected by Lightning's ``hpc_ckpt_*.ckpt`` in the run directory); ``resume_epoch``: the last epoch the
    resumed checkpoint finished (later rows of ``metrics.csv`` are dropped: that training is redone).
    """
    resume = resume or slurm_requeued(run_dir)
    loggers: list[Logger] = [
        ResumableCSVLogger(save_dir=str(run_dir), name="", version="", resume=resume, resume_epoch=resume_epoch)
    ]
    loggers.extend(extra)
    if wandb is None or not wandb.enabled:
        return loggers
    mode = wandb_mode(wandb.mode)
    if mode == "disabled":
        return loggers
    config_text = config if isinstance(config, str) else None
    if isinstance(config, str):
        import yaml

        config = yaml.safe_load(config)
    run_id = wandb.id or os.environ.get("WANDB_RUN_ID") or stable_run_id(run_dir, run_name)
    _store_run_id(run_dir, run_id)
    group = wandb.group or os.environ.get("WANDB_RUN_GROUP") or default_group(config_files, run_dir)
    logger = RunWandbLogger(
        name=run_name,
        save_dir=str(run_dir),
        id=run_id,
        project=wandb.project,
        entity=wandb.entity,
        group=group,
        job_type=wandb.job_type or stage,
        tags=list(wandb.tags),
        mode=mode,
        config=config,
        config_text=config_text,
        settings={"init_timeout": 30, "silent": True},
    )
    loggers.append(logger)
    if mode == "offline":
        why = "as asked" if (wandb.mode or os.environ.get("WANDB_MODE")) else "no API key or no route to the server"
        _say(f"W&B runs offline ({why}): upload later with `wandb sync {run_dir / 'wandb'}/offline-run-*`")
    return loggers


def finish_loggers(loggers: list[Logger]) -> None:
    """Close a W&B run at the end of its stage, so the next run in the same process starts its own."""
    for logger in loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:  # never start a run just to end it
            run = logger.experiment
            offline = bool(getattr(run, "offline", False))
            run_dir = Path(run.dir).parent if getattr(run, "dir", None) else None
            run.finish()
            if offline and run_dir is not None:
                _say(f"W&B run saved offline: upload with `wandb sync {run_dir}`")
