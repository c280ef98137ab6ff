"""What a stage may ask of its data module, as ``typing.Protocol`` classes.

A stage names the protocol it needs (``Stage.data_contract``) and calls only what it declares; a data module
implements the protocols (``data_modules.image_data.ImageDataModule`` implements all of them). A data module
that lacks a member is refused before the run starts, in one line naming what is missing (``require``).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch.utils.data import DataLoader

from vitkd.errors import VitkdInputError


@runtime_checkable
class StageData(Protocol):
    """Every training stage's data: the three splits' loaders and the batch hook Lightning calls after a batch
    reaches the device (batch-level augmentation)."""

    num_workers: int

    def train_dataloader(self) -> Any: ...

    def val_dataloader(self) -> Any: ...

    def test_dataloader(self) -> Any: ...

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any: ...


@runtime_checkable
class ReportingData(Protocol):
    """A data module that counts the damaged data it skipped (summed over ranks into ``metrics.json``)."""

    def data_report(self) -> dict[str, int]: ...


@runtime_checkable
class KeyedTrainData(StageData, Protocol):
    """Training batches that can carry each sample's key third, ``(x, y, keys)``: what a per-sample teacher
    cache (``vitkd.teacher_cache``) needs. ``augment``: whether training inputs change from epoch to epoch."""

    augment: bool

    def request_train_keys(self) -> None:
        """From now on, training batches carry each sample's key third."""
        ...

    def train_inputs_id(self) -> dict:
        """JSON-able description of what each keyed training input depends on (data, options, views), so kept
        teacher outputs are reused only for the same inputs."""
        ...


@runtime_checkable
class DataFreeData(StageData, Protocol):
    """The data-free stage's data: the test split, the labelled validation split (for choosing between
    designs, never checkpoints), and for the hybrid the selected shards ``train_urls`` streamed to a stage
    that trains on its own loaders."""

    train_urls: str | None

    def labelled_val_dataloader(self) -> DataLoader: ...

    def train_stream(self, trainer: Any, batch_size: int) -> DataLoader:
        """The training split in ``batch_size`` batches, split by ``trainer``'s rank and world size (the
        trainer is never given this data module)."""
        ...


@runtime_checkable
class ScoringData(Protocol):
    """The selector's data: the wild pool's shard URLs and per-shard scoring batches over some of them."""

    def wild_shards(self) -> list[str]: ...

    def scoring_loader(self, urls: list[str]) -> DataLoader: ...


def members(protocol: type) -> list[str]:
    """The attributes and methods ``protocol`` declares (its own and its parent protocols'), in order."""
    names: list[str] = []
    for cls in reversed(protocol.__mro__):
        if cls in (object, Protocol, Any) or not getattr(cls, "_is_protocol", False):
            continue
        declared = [
            *getattr(cls, "__annotations__", {}),
            *(k for k, v in vars(cls).items() if callable(v) and not k.startswith("_")),
        ]
        names += [n for n in declared if n not in names]
    return names


def missing(datamodule: Any, protocol: type) -> list[str]:
    """The members of ``protocol`` that ``datamodule`` lacks."""
    return [n for n in members(protocol) if not hasattr(datamodule, n)]


def require(datamodule: Any, protocol: type, stage: str) -> Any:
    """``datamodule`` itself when it has every member of ``protocol``; else a one-line error naming the
    missing ones, the stage that needs them and the fix."""
    if datamodule is None:
        raise VitkdInputError(
            f"{stage} needs a data module ({protocol.__name__}): pass --data with a data module's class_path"
        )
    lacking = missing(datamodule, protocol)
    if lacking:
        attributes = {n for cls in protocol.__mro__ for n in getattr(cls, "__annotations__", {})}
        shown = ", ".join(n if n in attributes else f"{n}()" for n in lacking)
        raise VitkdInputError(
            f"{stage} needs a data module with {shown} ({protocol.__name__}), which {type(datamodule).__name__} lacks: "
            "pass a data module that implements it, e.g. data_modules.DigitsDataModule"
        )
    return datamodule
