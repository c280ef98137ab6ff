"""The one entry point: ``python -m vitkd.fit --config X.yaml [--config Y.yaml] [--key value ...]``.

LightningCLI with ``class_path``/``init_args`` configs. Any stage runs through it: training stages fit
then test their best checkpoint; the selector scores. Every run writes its run directory:
``config.yaml`` (resolved), ``checkpoints/`` (best on validation, and last), ``metrics.csv`` (the local
log) and ``metrics.json`` (final figures), each written under a temporary name and then renamed.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from jsonargparse import ArgumentError
from lightning.pytorch.cli import ArgsType, LightningCLI

from vitkd.errors import VitkdInputError
from vitkd.checkpoint_io import AtomicCheckpointIO
from vitkd.io import write_json, write_text
from vitkd.logging import WandbOptions, build_loggers, finish_loggers
from vitkd.stages import Stage


class VitkdCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--run_dir", type=str | None, default=None, help="Run directory (default: runs/<stage>-<time>).")
        parser.add_argument("--ckpt_path", type=str | None, default=None, help="Checkpoint to resume training from.")
        parser.add_argument("--run_name", type=str | None, default=None, help="Name of the run in loggers (default: run_dir's name).")
        parser.add_argument("--torch_threads", type=int | None, default=None, help="torch intra-op threads (default: torch's choice).")
        parser.add_class_arguments(WandbOptions, "wandb")
        for key in ("num_classes", "img_size", "in_chans"):
            parser.link_arguments(f"data.{key}", f"model.init_args.{key}", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        cfg = self.config
        if not cfg.run_dir:
            stage = str(cfg.model.class_path).rsplit(".", 1)[-1].lower()
            cfg.run_dir = f"runs/{stage}-{time.strftime('%Y%m%d-%H%M%S')}"
        self.run_dir = Path(cfg.run_dir)
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        if cfg.ckpt_path and not Path(cfg.ckpt_path).is_file():
            raise VitkdInputError(f"--ckpt_path {cfg.ckpt_path} does not exist: pass a checkpoint from a run's checkpoints/ folder")

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        cfg = self.config_init
        user_loggers = cfg.trainer.get("logger")
        extra = [] if user_loggers in (None, True, False) else (user_loggers if isinstance(user_loggers, list) else [user_loggers])
        run_name = self.config.run_name or self.run_dir.name
        wandb_on = cfg.wandb is not None and cfg.wandb.enabled
        kwargs.setdefault("logger", build_loggers(
            self.run_dir, run_name, cfg.wandb, extra,
            stage=str(self.config.model.class_path).rsplit(".", 1)[-1],
            config_files=self.config.get("config"),
            config=self.parser.dump(self.config, skip_none=False) if wandb_on else None,
            resume=bool(self.config.ckpt_path),
        ))
        kwargs.setdefault("default_root_dir", str(self.run_dir))
        plugins = cfg.trainer.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        kwargs.setdefault("plugins", [*plugins, AtomicCheckpointIO()])
        return super().instantiate_trainer(**kwargs)


def _one_line(err: BaseException) -> str:
    """jsonargparse nests the real reason several lines deep; keep the line that names the key."""
    lines = [ln.strip(" -") for ln in str(err).splitlines() if ln.strip(" -")]
    for marker in ("is not accepted", "not expected", "Unrecognized", "No action", "does not", "Expected"):
        for ln in lines:
            if marker in ln and "Union subtypes" not in ln:
                return ln
    return lines[0] if lines else type(err).__name__


def cli_main(args: ArgsType = None) -> dict[str, Any]:
    """Parse a config, run its stage, write the run directory; returns the figures of ``metrics.json``."""
    VitkdInputError.last = None
    try:
        cli = VitkdCLI(
            Stage,
            pl.LightningDataModule,
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
    if trainer.is_global_zero:
        write_text(run_dir / "config.yaml", cli.parser.dump(cli.config, skip_none=False))
    metrics = cli.model.execute(trainer, cli.datamodule, ckpt_path=cli.config.ckpt_path)
    metrics["run_dir"] = str(run_dir)
    if trainer.is_global_zero:
        write_json(run_dir / "metrics.json", metrics)
    finish_loggers(trainer.loggers)
    return metrics


def main(argv: list[str] | None = None) -> int:
    try:
        cli_main(argv)
    except VitkdInputError as err:
        print(f"vitkd: error: {err}", file=sys.stderr)
        return 2
    except ArgumentError as err:
        print(f"vitkd: error: bad config or argument: {_one_line(err)} (see --help or --print_config)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
