"""The one entry point: ``python -m vitkd.fit --config X.yaml [--config Y.yaml] [--key value ...]``.

LightningCLI with ``class_path``/``init_args`` configs. Any stage runs through it: training stages fit
then test their best checkpoint; the selector scores. Every run writes its run directory:
``config.yaml`` (resolved), ``checkpoints/`` (best on validation, and last), ``metrics.csv`` (the local
log) and ``metrics.json`` (final figures), each written under a temporary name and then renamed.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from jsonargparse import ArgumentError
from lightning.fabric.connector import _PRECISION_INPUT
from lightning.pytorch.cli import ArgsType, LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from vitkd.checkpoint_io import AtomicCheckpointIO
from vitkd.efficient.vit_parts import set_fused_attention
from vitkd.errors import VitkdInputError
from vitkd.io import write_json, write_text
from vitkd.loggers import WandbOptions, build_loggers, finish_loggers, quiet_lightning, slurm_requeued
from vitkd.precision import AUTO, PrecisionChoice, as_record, cache_file, choose_for_stage
from vitkd.stages import Stage

quiet_lightning()


class Trainer(pl.Trainer):
    """Lightning's Trainer whose ``precision`` also takes ``auto``: ``VitkdCLI`` replaces it with the precision
    measured fastest for the run's nets on this device (``vitkd.precision``) before the trainer is built."""

    def __init__(self, *, precision: _PRECISION_INPUT | Literal["auto"] | None = None, **kwargs: Any):
        if precision == AUTO:
            raise VitkdInputError(
                "--trainer.precision auto is chosen by python -m vitkd.fit: give a hand-built Trainer e.g. 32-true"
            )
        super().__init__(precision=precision, **kwargs)


def run_device(accelerator: Any) -> torch.device:
    """The device Lightning will train on for ``--trainer.accelerator`` (``auto``: CUDA, else MPS, else CPU)."""
    acc = str(accelerator or "auto").lower()
    local = int(os.environ.get("LOCAL_RANK", 0))
    if acc in ("cuda", "gpu") or (acc == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local)
    if acc == "mps" or (acc == "auto" and torch.backends.mps.is_available()):
        return torch.device("mps")
    return torch.device("cpu")


def process_count(trainer_cfg: Any) -> int:
    """How many processes the run will have: the launcher's world size, else devices × nodes of the config."""
    for var in ("WORLD_SIZE", "SLURM_NTASKS"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    devices = trainer_cfg.get("devices")
    per_node = len(devices) if isinstance(devices, (list, tuple)) else int(devices) if str(devices).isdigit() else 1
    return max(1, per_node) * int(trainer_cfg.get("num_nodes") or 1)


class VitkdCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--run_dir", type=str | None, default=None, help="Run directory (default: runs/<stage>-<time>)."
        )
        parser.add_argument("--ckpt_path", type=str | None, default=None, help="Checkpoint to resume training from.")
        parser.add_argument(
            "--run_name", type=str | None, default=None, help="Name of the run in loggers (default: run_dir's name)."
        )
        parser.add_argument(
            "--torch_threads", type=int | None, default=None, help="torch intra-op threads (default: torch's choice)."
        )
        parser.add_argument(
            "--overwrite",
            type=bool,
            default=False,
            help=(
                "Replace the results of an earlier run in --run_dir "
                "(otherwise such a run_dir is refused, so nothing is lost)."
            ),
        )
        parser.add_class_arguments(WandbOptions, "wandb")
        for key in ("num_classes", "img_size", "in_chans"):
            parser.link_arguments(f"data.{key}", f"model.init_args.{key}", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        cfg = self.config
        if not cfg.run_dir:
            stage = str(cfg.model.class_path).rsplit(".", 1)[-1].lower()
            cfg.run_dir = f"runs/{stage}-{time.strftime('%Y%m%d-%H%M%S')}"
        self.run_dir = Path(cfg.run_dir)
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise VitkdInputError(f"--run_dir {self.run_dir} is a file: pass a folder (it is created if missing)")
        if cfg.torch_threads is not None:
            if cfg.torch_threads < 1:
                raise VitkdInputError(
                    f"--torch_threads {cfg.torch_threads} must be a positive integer: pass N >= 1 or leave it unset"
                )
            torch.set_num_threads(cfg.torch_threads)
        if not cfg.ckpt_path and slurm_requeued(self.run_dir) and not (self.run_dir / "metrics.json").is_file():
            # a requeue resumes from the last finished epoch, which reproduces the run: Lightning's hpc checkpoint
            # is taken mid-epoch, where the data order cannot be restored. Before any epoch finished: from the start.
            last = self.run_dir / "checkpoints" / "last.ckpt"
            if last.is_file():
                cfg.ckpt_path = str(last)
            else:
                for stale in self.run_dir.glob("hpc_ckpt_*.ckpt"):
                    stale.unlink()
        if cfg.ckpt_path:
            ckpt = Path(cfg.ckpt_path)
            if ckpt.is_dir():
                raise VitkdInputError(
                    f"--ckpt_path {ckpt} is a folder: pass the checkpoint file in it, e.g. {ckpt / 'last.ckpt'}"
                )
            if not ckpt.is_file():
                raise VitkdInputError(
                    f"--ckpt_path {ckpt} does not exist: pass a checkpoint from a run's checkpoints/ folder"
                )
        if not cfg.overwrite and not cfg.ckpt_path:
            earlier = earlier_results(self.run_dir)
            if earlier:
                last = self.run_dir / "checkpoints" / "last.ckpt"
                resume = (
                    f"--ckpt_path {last} to resume training, " if last.is_file() else ""
                )  # a selection has no checkpoints
                raise VitkdInputError(
                    f"--run_dir {self.run_dir} already holds a run ({earlier}): "
                    f"pass a new --run_dir, {resume}or --overwrite true to replace it"
                )

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        cfg = self.config_init
        user_loggers = cfg.trainer.get("logger")
        extra = (
            []
            if user_loggers in (None, True, False)
            else (user_loggers if isinstance(user_loggers, list) else [user_loggers])
        )
        run_name = self.config.run_name or self.run_dir.name
        wandb_on = cfg.wandb is not None and cfg.wandb.enabled
        kwargs.setdefault(
            "logger",
            build_loggers(
                self.run_dir,
                run_name,
                cfg.wandb,
                extra,
                stage=str(self.config.model.class_path).rsplit(".", 1)[-1],
                config_files=self.config.get("config"),
                config=self.parser.dump(self.config, skip_none=False) if wandb_on else None,
                resume=bool(self.config.ckpt_path),
                resume_epoch=checkpoint_epoch(self.config.ckpt_path),
            ),
        )
        kwargs.setdefault("default_root_dir", str(self.run_dir))
        self.precision_choice = self.choose_precision(cfg.trainer)
        if self.precision_choice is not None and str(cfg.trainer.get("precision")) == AUTO:
            kwargs["precision"] = self.precision_choice.precision  # a given precision (or plugin) is kept
        plugins = cfg.trainer.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        kwargs.setdefault("plugins", [*plugins, AtomicCheckpointIO()])
        return super().instantiate_trainer(**kwargs)

    def choose_precision(self, trainer_cfg: Any) -> PrecisionChoice | None:
        """``--trainer.precision auto`` and ``--model.init_args.teacher_bf16 auto`` decided by timing the stage's
        nets (``vitkd.precision``), printed in one line by the first process; None when neither is ``auto``."""
        precision = str(trainer_cfg.get("precision") or "32-true")
        if precision != AUTO and getattr(self.model, "teacher_bf16", None) != AUTO:
            return None
        dm = self.datamodule
        trains = any(n.train for n in self.model.timed_nets())
        batch = getattr(dm, "batch_size" if trains else "eval_batch_size", None) or getattr(dm, "batch_size", 64)
        choice = choose_for_stage(
            self.model,
            min(int(batch), 256),
            run_device(trainer_cfg.get("accelerator")),
            precision,
            processes=process_count(trainer_cfg),
        )
        if choice.teacher_bf16 is not None:
            self.model.teacher_bf16 = choice.teacher_bf16
        if choice.fused_attention is not None:
            set_fused_attention(self.model, choice.fused_attention)
        if int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0))) == 0:
            print(choice.line(cache_file()), flush=True)
        return choice


def checkpoint_epoch(path: str | None) -> int | None:
    """The epoch a checkpoint was saved in (None without one, or when it cannot be read: the resume check
    names that)."""
    if not path:
        return None
    try:
        return int(torch.load(path, map_location="cpu", weights_only=False, mmap=True).get("epoch"))
    except Exception:
        return None


class RunDirLock:
    """One run at a time in a run directory: an exclusive OS lock (``flock``) on the folder itself, held
    until the process ends (the OS drops it when a killed run dies), so no lock file joins the outputs.
    Written by hand: filelock locks files, and a file would be one more thing in the run directory."""

    def __init__(self, run_dir: Path):
        import fcntl

        self.created = not run_dir.exists()
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir, self.fd = run_dir, os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise VitkdInputError(
                f"--run_dir {run_dir} is in use by another vitkd run: wait for it to end, or pass another --run_dir"
            ) from None

    def release(self, refused: bool = False) -> None:
        if self.fd is None:
            return
        if refused and self.created and not any(self.run_dir.iterdir()):
            self.run_dir.rmdir()  # a refused run leaves nothing, not even its folder
        os.close(self.fd)
        self.fd = None


class RunStopped(SystemExit):
    """The run was stopped by SIGTERM; its last checkpoint resumes it."""

    def __init__(self, run_dir: Path):
        super().__init__(143)
        self.run_dir = run_dir


# what vitkd writes in a run directory; --overwrite removes these and nothing else
RUN_OUTPUTS = (
    "checkpoints",
    "metrics.json",
    "metrics.csv",
    "hparams.yaml",
    "config.yaml",
    "score_parts",
    "scores.csv",
    "selected",
    "report",
    "probe_maps",
    "samples",
    "wandb",
    "wandb_id.txt",
    "hpc_ckpt_*.ckpt",
)


def earlier_results(run_dir: Path) -> str | None:
    """What in ``run_dir`` shows an earlier run that a new one would replace: a finished run's
    ``metrics.json``, or a training run's checkpoints. Not a SLURM requeue (it resumes from Lightning's hpc
    checkpoint), nor an unfinished selection's ``score_parts`` (rerunning the same selection resumes it, and
    the selector refuses scores computed differently)."""
    if (run_dir / "metrics.json").is_file():  # finished: a requeue never follows, whatever hpc checkpoints are left
        return "metrics.json"
    if slurm_requeued(run_dir):  # Lightning resumes it from its hpc checkpoint
        return None
    ckpts = sorted((run_dir / "checkpoints").glob("*.ckpt")) if (run_dir / "checkpoints").is_dir() else []
    return f"checkpoints/{ckpts[0].name}" if ckpts else None


def remove_earlier_results(run_dir: Path, keep: tuple[str, ...] = ()) -> None:
    """``--overwrite``: remove what an earlier run wrote in ``run_dir`` (only vitkd's own outputs, less
    ``keep``: what the stage reuses, e.g. a selection's scores computed the same way)."""
    import shutil

    for path in (p for name in RUN_OUTPUTS if name not in keep for p in run_dir.glob(name)):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def _check_config_files(args: ArgsType) -> None:
    """A ``--config`` that is not UTF-8 text, not YAML or not a mapping, named in one line with where it breaks
    (the parser's own messages name neither the file nor the line)."""
    argv = list(sys.argv[1:] if args is None else args) if not isinstance(args, dict) else []
    for i, arg in enumerate(argv):
        path = (
            argv[i + 1]
            if arg == "--config" and i + 1 < len(argv)
            else arg.removeprefix("--config=")
            if arg.startswith("--config=")
            else None
        )
        if path and Path(path).is_file():
            import yaml

            try:
                content = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
            except UnicodeDecodeError:
                raise VitkdInputError(
                    f"--config {path} is not a UTF-8 YAML file: "
                    "pass a YAML config such as experiments/digits/teacher.yaml"
                ) from None
            except yaml.YAMLError as err:
                mark = getattr(err, "problem_mark", None)
                where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
                raise VitkdInputError(
                    f"--config {path} is not valid YAML ({where}{getattr(err, 'problem', None) or err}): fix the file"
                ) from None
            if content is not None and not isinstance(content, dict):
                raise VitkdInputError(
                    f"--config {path} holds a {type(content).__name__}, not a mapping of keys: "
                    "pass a config such as experiments/digits/teacher.yaml"
                )


def _one_line(err: BaseException) -> str:
    """jsonargparse nests the real reason several lines deep: keep the line that says what is wrong, and
    name the key it is about (``model.init_args.num_keep``), with the value given when a type did not fit."""
    import re

    text = str(err)
    lines = [ln.strip(" -") for ln in text.splitlines() if ln.strip(" -")]
    reason = None
    for marker in (
        "is not accepted",
        "not expected",
        "Unrecognized",
        "unrecognized arguments",
        "No action",
        "does not",
        "Expected",
    ):
        reason = next((ln for ln in lines if marker in ln and "Union subtypes" not in ln), None)
        if reason is not None:
            break
    reason = reason or (lines[0] if lines else type(err).__name__)
    keys = re.findall(r'Parser key "([^"]+)"', text)
    if not keys or not reason.startswith("Expected"):
        return reason
    key = (
        keys[0]
        if len(keys) == 1
        else f"{keys[0]}.init_args.{'.'.join(keys[1:])}"
        if "class_path" in text
        else ".".join(keys)
    )
    given = re.search(r"Given value: (.+)", text)
    if "Got value" not in reason and sum(ln.startswith("Expected") for ln in lines) > 1 and given:  # a union of types
        return f"--{key}: {given.group(1)} is not an accepted value"
    reason = re.sub(r"<class '([\w.]+)'>", r"\1", reason)
    reason = re.sub(
        r"^Expected an? (.+?)\. Got value: (.+)$", r"expected \1, got \2", reason
    )  # "expected int, got abc"
    return f"--{key}: {reason}"


def cli_main(args: ArgsType = None) -> dict[str, Any]:
    """Parse a config, run its stage, write the run directory; returns the figures of ``metrics.json``."""
    VitkdInputError.last = None
    _check_config_files(args)
    try:
        cli = VitkdCLI(
            Stage,
            pl.LightningDataModule,
            trainer_class=Trainer,
            subclass_mode_model=True,
            subclass_mode_data=True,
            run=False,
            save_config_callback=None,
            auto_configure_optimizers=False,
            args=args,
            parser_kwargs={"exit_on_error": False},
        )
    except (ArgumentError, ValueError) as err:
        original = VitkdInputError.unwrap(err)
        if original is not None:
            raise original from None
        raise
    run_dir, trainer = cli.run_dir, cli.trainer
    lock = RunDirLock(run_dir) if trainer.is_global_zero else None
    try:
        # before anything is written: another run that finished while this one started, a resume that does not
        # fit, or a selection whose saved scores were computed differently, is refused with the run directory as it was
        earlier = None if cli.config.overwrite or cli.config.ckpt_path or lock is None else earlier_results(run_dir)
        if earlier:
            raise VitkdInputError(
                f"--run_dir {run_dir} already holds a run ({earlier}): "
                "pass a new --run_dir, or --overwrite true to replace it"
            )
        cli.model.check_run_dir(trainer, cli.datamodule, run_dir, cli.config.ckpt_path, cli.config.overwrite)
    except BaseException:
        if lock is not None:
            lock.release(refused=True)
        raise
    try:
        if trainer.is_global_zero:
            if cli.config.overwrite:
                remove_earlier_results(run_dir, keep=cli.model.reused_outputs)
            write_text(run_dir / "config.yaml", cli.parser.dump(cli.config, skip_none=False))
        try:
            metrics = cli.model.execute(trainer, cli.datamodule, ckpt_path=cli.config.ckpt_path)
        except SIGTERMException:
            raise RunStopped(run_dir) from None
        metrics["run_dir"] = str(run_dir)
        metrics["trainer_precision"] = str(trainer.precision)
        if cli.precision_choice is not None:
            metrics["precision_auto"] = as_record(cli.precision_choice)
        if trainer.is_global_zero:
            write_json(run_dir / "metrics.json", metrics)
        finish_loggers(trainer.loggers)
        return metrics
    finally:
        if lock is not None:
            lock.release()


def main(argv: list[str] | None = None) -> int:
    try:
        cli_main(argv)
    except VitkdInputError as err:
        print(f"vitkd: error: {err}", file=sys.stderr)
        return 2
    except ArgumentError as err:
        print(f"vitkd: error: bad config or argument: {_one_line(err)} (see --help or --print_config)", file=sys.stderr)
        return 2
    except RunStopped as stop:
        last = stop.run_dir / "checkpoints" / "last.ckpt"
        resume = (
            f"resume with --ckpt_path {last}" if last.is_file() else "no epoch had finished: rerun the same command"
        )
        print(f"vitkd: stopped by SIGTERM: {resume}", file=sys.stderr)
        return 143
    return 0


if __name__ == "__main__":
    sys.exit(main())
