"""What every stage shares: a LightningModule that knows how to run itself and what to report."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.model_helpers import is_overridden
from torchmetrics.classification import MulticlassAccuracy

from callbacks import AttentionProbeLogger, RngState, SelectionReport, ThroughputMonitor
from vitkd.data_contract import ReportingData, StageData, require
from vitkd.efficient.measure import measure
from vitkd.errors import VitkdInputError
from vitkd.models import count_params
from vitkd.precision import TimedNet
from vitkd.teacher import load_teacher, shape_mismatch

FUSED_DEVICES = ("cpu", "cuda", "mps", "xpu")  # where torch's fused Adam kernels run


def fused_ok(params: Any) -> bool:
    """Whether every parameter (a list, or param groups) sits where torch's fused Adam kernel runs, in a
    floating dtype."""
    groups = params if params and isinstance(params[0], dict) else [{"params": params}]
    ps = [p for g in groups for p in g["params"]]
    return bool(ps) and all(p.device.type in FUSED_DEVICES and p.is_floating_point() for p in ps)


def adamw(params: Any, amp: bool = False, **kwargs: Any) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` with its fused kernel where it runs: one kernel over every tensor instead of a
    Python loop over them, the loop being most of the optimizer's time for small nets. ``amp``: the run uses
    Lightning's mixed-precision plugin, which refuses to clip a fused optimizer's gradients: the loop then."""
    return torch.optim.AdamW(params, fused=(fused_ok(params) and not amp) or None, **kwargs)


def adam(params: Any, amp: bool = False, **kwargs: Any) -> torch.optim.Adam:
    """``torch.optim.Adam`` with its fused kernel where it runs (as ``adamw``)."""
    return torch.optim.Adam(params, fused=(fused_ok(params) and not amp) or None, **kwargs)


def warmup_cosine(total: float, warmup: float):
    """LR factor per step: linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1.0, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


class Stage(pl.LightningModule):
    """A vitkd stage. ``execute`` runs it on a trainer and returns the figures for ``metrics.json``.

    Training stages fit, keep the best checkpoint on the validation split (never test) and the last one,
    then test the best. Other stages (the selector) override ``execute``. ``data_contract``: the protocol of
    ``vitkd.data_contract`` the stage's data module must implement (checked before the run writes anything).
    """

    monitor: str = "val/acc"
    monitor_mode: str = "max"
    data_contract: type = StageData

    def load_frozen_teacher(self, teacher_ckpt: str, teacher_arch: str | None = None, **sizes: int) -> None:
        """Sets ``self.teacher`` (frozen, kept in eval mode) and ``self.teacher_info``, built for ``sizes``
        (``img_size``/``in_chans``/``num_classes``; default: the stage's hyper-parameters). The teacher is not
        stored in the stage's checkpoints: it is reloaded from ``teacher_ckpt``, so checkpoints load without its
        keys."""
        hp = self.hparams
        sizes = {k: sizes.get(k, hp.get(k)) for k in ("img_size", "in_chans", "num_classes")}
        self.teacher, self.teacher_info = load_teacher(teacher_ckpt, teacher_arch, **sizes)
        self.strict_loading = False

    def train(self, mode: bool = True):
        super().train(mode)
        if "teacher" in self._modules:
            self.teacher.eval()
        return self

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("teacher.")}
        checkpoint["vitkd_stage"] = type(self).__name__  # a resume checks it continues the same stage

    reused_outputs: tuple[str, ...] = ()  # run-directory entries ``--overwrite`` keeps because the run reuses them

    def check_run_dir(
        self,
        trainer: pl.Trainer,
        datamodule: pl.LightningDataModule,
        run_dir: Path,
        ckpt_path: str | None,
        overwrite: bool,
    ) -> None:
        """Called before the run writes anything: a ``ckpt_path`` to resume must be this stage's and fit its
        model (one line naming the first tensor that does not, instead of a long state-dict error); the data
        module must fit the stage (``check_data``)."""
        self.check_data(datamodule)
        if not ckpt_path:
            return
        try:
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)
        except Exception as err:  # truncated or not a torch file
            raise VitkdInputError(
                f"--ckpt_path {ckpt_path} cannot be read ({type(err).__name__}): "
                "pass a .ckpt from a run's checkpoints/ folder"
            ) from err
        if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
            raise VitkdInputError(
                f"--ckpt_path {ckpt_path} is not a Lightning checkpoint: pass a .ckpt from a run's checkpoints/ folder"
            )
        stage = ckpt.get("vitkd_stage")
        if stage is not None and stage != type(self).__name__:
            raise VitkdInputError(
                f"--ckpt_path {ckpt_path} is a {stage} checkpoint, not {type(self).__name__}: "
                "pass a checkpoint of this stage's run "
                "(a trained teacher goes in --model.teacher_ckpt)"
            )
        mismatch = shape_mismatch(self, ckpt["state_dict"])
        if mismatch:
            arch = (ckpt.get("hyper_parameters") or {}).get("arch")
            hint = (
                f"it was saved for arch {arch!r}: pass --model.init_args.arch {arch}"
                if arch
                else "pass a checkpoint of the same model"
            )
            raise VitkdInputError(f"--ckpt_path {ckpt_path} does not fit this model ({mismatch}); {hint}")

    def check_data(self, datamodule: Any) -> None:
        """The data module implements ``data_contract`` (else one line naming what it lacks)."""
        require(datamodule, self.data_contract, type(self).__name__)

    def execute(
        self, trainer: pl.Trainer, datamodule: pl.LightningDataModule, ckpt_path: str | None = None
    ) -> dict[str, Any]:
        trainer.fit(self, datamodule=datamodule, ckpt_path=ckpt_path)
        return self.test_best(trainer, datamodule=datamodule)

    def test_best(self, trainer: pl.Trainer, **test_kwargs: Any) -> dict[str, Any]:
        """Test the best checkpoint on validation (never chosen on test); the figures for ``metrics.json``."""
        ckpt = trainer.checkpoint_callback
        best = ckpt.best_model_path if ckpt is not None and ckpt.best_model_path else None
        results = trainer.test(self, ckpt_path=best, verbose=False, **test_kwargs)
        metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
        metrics.update(self.report())
        if ckpt is not None:
            metrics["best_checkpoint"] = best
            if ckpt.best_model_score is not None:
                metrics[f"best_{self.monitor}"] = float(ckpt.best_model_score)
        metrics["epochs"] = trainer.current_epoch
        metrics.update(self.data_figures(trainer))
        return metrics

    def data_figures(self, trainer: pl.Trainer) -> dict[str, Any]:
        """Batches each rank trained on, samples validated per epoch over all ranks, and damaged data
        skipped (summed over ranks): the evidence that DDP splits the data as it should."""
        out: dict[str, Any] = {}
        steps = torch.tensor([getattr(self, "_train_batches", 0)], device=self.device)
        out["train_batches_per_rank"] = [int(v) for v in trainer.strategy.all_gather(steps).flatten().tolist()]
        if hasattr(self, "_val_samples"):
            out["val_samples_per_epoch"] = int(
                trainer.strategy.reduce(torch.tensor(float(self._val_samples), device=self.device), reduce_op="sum")
            )
        if isinstance(trainer.datamodule, ReportingData):
            for k, v in trainer.datamodule.data_report().items():
                out[k] = int(trainer.strategy.reduce(torch.tensor(float(v), device=self.device), reduce_op="sum"))
        return out

    def timed_nets(self) -> list[TimedNet]:
        """The nets whose step times choose ``precision: auto`` and ``teacher_bf16: auto`` (``vitkd.precision``):
        here the frozen teacher's forward on images; a training stage adds the net it trains."""
        hp = self.hparams
        image = (hp["in_chans"], hp["img_size"], hp["img_size"])
        return [TimedNet("teacher", self.teacher, image, train=False)] if "teacher" in self._modules else []

    def report(self) -> dict[str, Any]:
        """Stage-specific figures for ``metrics.json`` (parameters of the trained model by default)."""
        return {"params": count_params(self.model)}

    def cost_figures(self, model: torch.nn.Module) -> dict[str, Any]:
        """Parameters, FLOPs (two conventions, labelled) and measured throughput of ``model``.

        ``measure_batch_size`` (a hyper-parameter of the stage, default 256; 0 skips it) sets the batch
        of the throughput timing.
        """
        hp = self.hparams
        batch = hp.get("measure_batch_size", 256)
        if batch <= 0:
            return {}
        return measure(model, (hp.in_chans, hp.img_size, hp.img_size), batch_size=batch, warmup=2, iters=5)

    def configure_callbacks(self):
        """Best checkpoint on validation and the last epoch's; training stages add their random state to the
        checkpoints (``callbacks.RngState``), attention-probe maps (``callbacks.AttentionProbeLogger``) and
        throughput (``callbacks.ThroughputMonitor``), scoring stages the selection report
        (``callbacks.SelectionReport``). A callback of the same type in the config's ``trainer.callbacks`` is
        kept instead of the default: that is how to tune or switch one off, e.g.
        ``--trainer.callbacks+=callbacks.AttentionProbeLogger --trainer.callbacks.every_n_epochs 0``."""
        defaults = []
        if is_overridden("training_step", self, pl.LightningModule):
            defaults += [
                RngState(),
                ThroughputMonitor(),
                AttentionProbeLogger(),
            ]  # the clock stops before the maps are drawn
        if is_overridden("predict_step", self, pl.LightningModule):
            defaults.append(SelectionReport())
        present = list(self.trainer.callbacks) if self._trainer is not None else []
        return [
            ModelCheckpoint(
                filename="best", monitor=self.monitor, mode=self.monitor_mode, enable_version_counter=False
            ),
            # last.ckpt after every epoch (Lightning's save_last writes it only in epochs that improve the best),
            # after best.ckpt, so it holds the epoch's best score too: a resume continues from the epoch that ended last
            ModelCheckpoint(filename="last", monitor=None, save_top_k=1, enable_version_counter=False),
            *[cb for cb in defaults if not any(isinstance(p, type(cb)) for p in present)],
        ]

    # -- optimisation shared by training stages -----------------------------------------------
    def under_amp(self) -> bool:
        """Whether the trainer runs Lightning's mixed-precision plugin (``*-mixed``): its gradient clipping
        refuses fused optimizers (``adamw``)."""
        t = self._trainer
        return t is not None and "mixed" in str(t.precision)

    def cosine_schedule(
        self, optimizer: torch.optim.Optimizer, warmup_epochs: float, constant_groups: tuple[int, ...] = ()
    ):
        """Linear warm-up then cosine decay, stepped per batch when the epoch length is known, else per epoch."""
        total = self.trainer.estimated_stepping_batches
        per_step = math.isfinite(total) and total > 0  # a stream of unknown length gives inf or -1
        if per_step:
            epochs = max(1, self.trainer.max_epochs or 1)
            total, warmup = int(total), warmup_epochs * total / epochs
        else:
            total, warmup = max(1, self.trainer.max_epochs or 1), warmup_epochs

        factor = warmup_cosine(total, warmup)

        lambdas = [(lambda _s: 1.0) if i in constant_groups else factor for i in range(len(optimizer.param_groups))]
        sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": sched, "interval": "step" if per_step else "epoch"},
        }


class TrainingStage(Stage):
    """A stage trained on ``(inputs, targets)`` batches: the named loss terms from ``losses(x, y)`` are
    logged and summed in the training step, and the batches trained and samples validated per epoch are
    counted for ``data_figures``."""

    def losses(self, x: torch.Tensor, y: Any) -> dict[str, torch.Tensor]:
        """Each weighted loss term of the stage for one batch."""
        raise NotImplementedError

    def report(self) -> dict[str, Any]:
        return {**super().report(), **self.cost_figures(self.model)}

    def timed_nets(self) -> list[TimedNet]:
        hp = self.hparams
        image = (hp["in_chans"], hp["img_size"], hp["img_size"])
        return [TimedNet("model", self.model, image, train=True), *super().timed_nets()]

    def logs_term(self, name: str) -> bool:
        """Whether the loss term ``name`` gets its own ``train/<name>`` curve (all of them by default)."""
        return True

    def on_train_epoch_start(self) -> None:
        self._train_batches = 0

    def on_validation_epoch_start(self) -> None:
        self._val_samples = 0

    def on_validation_batch_end(self, outputs, batch, batch_idx, dataloader_idx: int = 0) -> None:
        self._val_samples += len(batch[0])

    def batch_losses(self, batch) -> dict[str, torch.Tensor]:
        """The loss terms of a training batch (``(x, y)``; a stage may read more fields, e.g. sample keys)."""
        x, y = batch[:2]
        return self.losses(x, y)

    def training_step(self, batch, batch_idx):
        x = batch[0]
        self._train_batches += 1
        terms = self.batch_losses(batch)
        loss = torch.stack(list(terms.values())).sum()
        for k, v in terms.items():
            if self.logs_term(k):
                self.log(f"train/{k}", v, batch_size=len(x))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(x))
        return loss


class ClassificationStage(TrainingStage):
    """A stage that trains a classifier ``self.model``; accuracy is measured on the validation and test
    splits."""

    def add_accuracy(self, num_classes: int) -> None:
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.val_acc.update(self(x).float(), y)
        self.log("val/acc", self.val_acc, on_epoch=True, prog_bar=True, batch_size=len(y))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.test_acc.update(self(x).float(), y)
        self.log("test/acc", self.test_acc, on_epoch=True, batch_size=len(y))
