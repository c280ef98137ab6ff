"""What every distillation stage shares: a student ``self.model`` trained from a frozen teacher.

``DistillationStage`` owns the teacher (loaded frozen, kept in eval mode, left out of checkpoints, its forward
optionally under bf16 autocast), the (teacher block, student block) feature-tap pairs, the per-sample
teacher-output cache and the test step (student accuracy on the test split). A subclass holds only its own
loss terms and steps: ``teacher_outputs(x)`` (what its terms read from the teacher) and
``losses(x, y, teacher_out)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from vitkd.data_contract import KeyedTrainData, StageData, require
from vitkd.errors import VitkdInputError
from vitkd.models import FeatureTap
from vitkd.precision import AUTO, choose_teacher_bf16
from vitkd.stages.base import ClassificationStage
from vitkd.teacher_cache import TeacherCache

W = TypeVar("W")


def weight_group(cls: type[W], value: W | dict[str, float]) -> W:
    """``value`` as the loss-weight dataclass ``cls``; a dict (the hyper-parameters read back from a checkpoint)
    is converted, so ``Stage.load_from_checkpoint`` rebuilds the stage."""
    return cls(**value) if isinstance(value, dict) else value


class DistillationStage(ClassificationStage):
    """A student distilled from a frozen teacher.

    Args:
        student: the student ``self.model``, or a function of the loaded teacher that builds it (a student
            initialised from the teacher). A student built before the teacher is loaded draws its initial
            weights first from the seeded generator, so a seeded run starts from the same student whatever the
            teacher.
        teacher_ckpt: the trained teacher (a vitkd checkpoint, or a state dict with ``teacher_arch``).
        teacher_arch: arch of a plain state-dict teacher.
        img_size, in_chans, num_classes: the teacher is built for these (set from the data module).
        teacher_bf16: run the frozen teacher's forward under bf16 autocast (``teacher_precision``) while the
            student trains at the trainer's precision; its outputs are returned in fp32. ``auto``: when the
            teacher's forward measures faster so (``vitkd.precision``; ``vitkd.fit`` decides before the run,
            a trainer built by hand on the first training step).
        teacher_cache: keep the teacher's outputs per training sample (``vitkd.teacher_cache``) and reuse them
            in later epochs; needs a data module whose training batches carry sample keys and do not change
            between epochs (``KeyedTrainData`` with ``augment`` off, or with ``augment_views``: each sample's
            fixed augmented views, one entry per view).
        teacher_cache_file: keep the cache in this file between runs: read at the start of training when it was
            written for the same teacher, stage options, precision, device type and training inputs (a
            fingerprint of them), written at the end when the run added rows. Runs of several seeds share it
            when their views are the same (``--data.init_args.view_seed``); under DDP each rank has its own
            file (``.rank<r>`` before the suffix).

    The subclass calls ``save_hyperparameters`` after this constructor, then ``pair_taps`` if a loss term
    compares blocks.
    """

    def __init__(
        self,
        student: nn.Module | Callable[[nn.Module], nn.Module],
        teacher_ckpt: str,
        teacher_arch: str | None = None,
        *,
        img_size: int,
        in_chans: int,
        num_classes: int,
        teacher_bf16: bool | Literal["auto"] = False,
        teacher_cache: bool = False,
        teacher_cache_file: str | None = None,
    ):
        super().__init__()
        if teacher_cache_file and not teacher_cache:
            raise VitkdInputError(
                f"--model.init_args.teacher_cache_file {teacher_cache_file} keeps the teacher-output cache: "
                "set --model.init_args.teacher_cache true, or drop the file"
            )
        if isinstance(student, nn.Module):
            self.model = student
        self.load_frozen_teacher(
            teacher_ckpt, teacher_arch, img_size=img_size, in_chans=in_chans, num_classes=num_classes
        )
        if not isinstance(student, nn.Module):
            self.model = student(self.teacher)
        self.teacher_bf16 = teacher_bf16
        self.cache = TeacherCache() if teacher_cache else None
        self.cache_file, self.cache_fingerprint = teacher_cache_file, ""
        self.taps: tuple[FeatureTap, FeatureTap] | None = None
        self.pairs: list[tuple[int, int]] = []

    def save_weight_groups(self, **groups: Any) -> None:
        """Stores each loss-weight dataclass of ``groups`` (argument name → instance) in the hyper-parameters as a
        plain dict, so ``hparams.yaml`` and the checkpoints hold numbers, never a pickled class."""
        self.save_hyperparameters({name: asdict(group) for name, group in groups.items()})

    # -- the teacher ------------------------------------------------------------------------------
    def teacher_precision(self, x: torch.Tensor):
        """bf16 autocast for the teacher's forward when ``teacher_bf16``; else the trainer's own precision
        (a null context: ``autocast(enabled=False)`` would switch off the trainer's bf16-mixed autocast)."""
        if self.teacher_bf16 == AUTO:  # a trainer built by hand: vitkd.fit has not decided
            self.teacher_bf16 = bool(choose_teacher_bf16(self, x).teacher_bf16)
        return torch.autocast(x.device.type, dtype=torch.bfloat16) if self.teacher_bf16 else contextlib.nullcontext()

    def pair_taps(self, pairs: Sequence[Sequence[int]]) -> None:
        """Taps the token outputs of each (teacher block, student block) pair: ``self.taps`` holds the teacher's
        and the student's ``FeatureTap``, ``self.pairs`` the checked block indices."""
        pairs = [tuple(p) for p in pairs]
        self.taps = (FeatureTap(self.teacher, [t for t, _ in pairs]), FeatureTap(self.model, [s for _, s in pairs]))
        self.pairs = [(self.taps[0].blocks[i], self.taps[1].blocks[i]) for i in range(len(pairs))]

    def teacher_outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """What the subclass's loss terms read from the frozen teacher for batch ``x`` (no gradients); what the
        cache stores per sample."""
        raise NotImplementedError

    # -- the teacher-output cache ------------------------------------------------------------------
    @property
    def data_contract(self) -> type:
        """``KeyedTrainData`` with the teacher cache on (training batches must carry sample keys), else
        ``StageData``."""
        return KeyedTrainData if self.cache is not None else StageData

    def check_data(self, datamodule: Any) -> None:
        """As ``Stage.check_data``; with the teacher cache on, also training inputs that come back unchanged
        (no augmentation, or fixed augmented views)."""
        if self.cache is None:
            return super().check_data(datamodule)
        require(datamodule, self.data_contract, f"{type(self).__name__} with --model.init_args.teacher_cache true")
        if datamodule.augment and not getattr(datamodule, "augment_views", 0):
            raise VitkdInputError(
                "--model.init_args.teacher_cache true needs --data.init_args.augment false, or fixed views "
                "(--data.init_args.augment_views 4): freshly augmented inputs change every epoch, so the "
                "teacher's outputs cannot be reused"
            )

    def setup(self, stage: str) -> None:
        if self.cache is None or stage != "fit":
            return
        self.check_data(self.trainer.datamodule)
        self.trainer.datamodule.request_train_keys()
        if self.cache_file:
            self.load_cache_file()

    # -- the teacher-output cache file ---------------------------------------------------------------
    def rank_cache_file(self) -> Path:
        """``teacher_cache_file``, with ``.rank<r>`` before the suffix on rank r > 0 of a DDP run."""
        path, rank = Path(self.cache_file), self.trainer.global_rank
        return path.with_name(f"{path.stem}.rank{rank}{path.suffix}") if rank else path

    def teacher_outputs_id(self) -> str:
        """sha256 of what the teacher's outputs depend on: its weights, this stage's class and options, the
        teacher's precision, the device type and the data module's training inputs (``train_inputs_id``)."""
        h = hashlib.sha256()
        for name, t in sorted(self.teacher.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        options = {k: v for k, v in self.hparams.items() if k != "teacher_cache_file"}
        h.update(
            json.dumps(
                {
                    "stage": f"{type(self).__module__}.{type(self).__qualname__}",
                    "options": options,
                    "teacher_bf16": self.teacher_bf16,
                    "precision": str(self.trainer.precision),
                    "device": self.trainer.strategy.root_device.type,
                    "inputs": self.trainer.datamodule.train_inputs_id(),
                },
                sort_keys=True,
                default=str,
            ).encode()
        )
        return h.hexdigest()

    def load_cache_file(self) -> None:
        """Fills the cache from ``teacher_cache_file`` when it was written for these outputs; one line says
        which."""
        self.cache_fingerprint = self.teacher_outputs_id()
        path = self.rank_cache_file()
        why = self.cache.load(path, self.cache_fingerprint, self.trainer.strategy.root_device)
        if why is None:
            rank_zero_info(f"teacher outputs: {self.cache.loaded} rows read from {path}")
        else:
            rank_zero_info(f"teacher outputs: {path} not used ({why}); it is written at the end of training")

    def on_train_end(self) -> None:
        if self.cache is None or not self.cache_file or not self.cache.misses:
            return
        path = self.rank_cache_file()
        self.cache.save(path, self.cache_fingerprint)
        rank_zero_info(f"teacher outputs: {len(self.cache)} rows written to {path}")

    def batch_losses(self, batch) -> dict[str, torch.Tensor]:
        """A keyed batch ``(x, y, keys)`` reads the teacher's outputs through the cache; others run the teacher."""
        if self.cache is None or len(batch) < 3:
            return super().batch_losses(batch)
        x, y, keys = batch
        return self.losses(x, y, teacher_out=self.cache(keys, x, self.teacher_outputs))

    def losses(
        self, x: torch.Tensor, y: Any, teacher_out: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """Each weighted loss term for a batch; ``teacher_out``: ``teacher_outputs(x)`` when already known."""
        raise NotImplementedError

    def report(self) -> dict[str, Any]:
        out = super().report()
        if self.cache is not None:  # this rank's cache
            out["teacher_cache"] = self.cache.summary()
        return out
