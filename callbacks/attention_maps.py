"""Where the teacher and the student attend: attention-probe heatmaps over a fixed set of images.

Every ``every_n_epochs`` epochs (and after the last one) the probe (Attention Probe, arXiv 2102.05958, Eq. 2, the CLS
row of the post-softmax attention over patch tokens) of chosen blocks is computed for a few fixed images
and drawn over them: image | teacher blocks | student blocks, one row per image. The grid goes to every
image-capable logger (W&B, TensorBoard); with none of those on it is written as
``RUN_DIR/probe_maps/epoch{E:03d}.png``. Rank 0 only, a separate ``no_grad`` forward in eval mode with
the probe hooks attached only for it, so training keeps the fused attention kernel.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn as nn
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import IterableDataset

from callbacks._images import log_image, save_png
from vitkd.models.probe import AttentionProbe
from vitkd.plotting import figure_to_array, pyplot


def as_vit(module: nn.Module | None) -> nn.Module | None:
    """The timm ViT inside ``module`` (itself, or the ``vit`` of a wrapper such as IdleViT), or None."""
    for m in (module, getattr(module, "vit", None)):
        if m is not None and hasattr(m, "blocks") and hasattr(m, "patch_embed") and hasattr(m, "num_prefix_tokens"):
            return m
    return None


def default_blocks(depth: int) -> list[int]:
    """The middle and the last block."""
    return sorted({max(0, depth // 2 - 1), depth - 1})


@torch.no_grad()
def probe_maps(vit: nn.Module, x: torch.Tensor, blocks: list[int], head: str | int = "mean") -> dict[int, torch.Tensor]:
    """Eq. 2 probe maps (B, h, w) of ``blocks`` for images ``x``, in eval mode, hooks removed afterwards."""
    probe = AttentionProbe(vit, blocks, head)
    was_training = vit.training
    try:
        vit.eval()
        param = next(vit.parameters())
        vit(x.to(param.device, param.dtype))
        return {b: m.float().cpu() for b, m in probe.maps().items()}
    finally:
        probe.remove()
        vit.train(was_training)


def _image_of(item) -> torch.Tensor | None:
    """The image tensor (C, H, W) of a dataset item: (image, label), {"image": ...} or a tensor."""
    if isinstance(item, dict):
        item = item.get("image")
    elif isinstance(item, (tuple, list)) and item:
        item = item[0]
    return item if isinstance(item, torch.Tensor) and item.ndim == 3 else None


def first_images(dataset, n: int) -> torch.Tensor | None:
    """The first ``n`` images of a dataset (read from the dataset, so no loader workers start)."""
    items = (
        itertools.islice(iter(dataset), n)
        if isinstance(dataset, IterableDataset)
        else (dataset[i] for i in range(min(n, len(dataset))))
    )
    images = [im for im in map(_image_of, items) if im is not None]
    return torch.stack(images) if images else None


def render_grid(images: torch.Tensor, columns: list[tuple[str, torch.Tensor]], title: str) -> np.ndarray:
    """image | one overlay per (label, maps (B, h, w)) column, one row per image → (H, W, 3) uint8."""
    plt = pyplot()

    n, cols = len(images), 1 + len(columns)
    fig, axes = plt.subplots(n, cols, figsize=(1.7 * cols, 1.7 * n + 0.4), squeeze=False, dpi=100)
    shown = (images.float().cpu() * 0.5 + 0.5).clamp(0, 1)  # inputs are in [-1, 1]
    for r in range(n):
        img = shown[r]
        img = img[0].numpy() if img.shape[0] == 1 else img[:3].permute(1, 2, 0).numpy()
        h, w = img.shape[:2]
        for c in range(cols):
            ax = axes[r][c]
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1, extent=(0, w, h, 0))
            if c > 0:
                m = columns[c - 1][1][r].numpy()
                m = (m - m.min()) / max(float(m.max() - m.min()), 1e-12)
                ax.imshow(m, cmap="jet", alpha=0.5, extent=(0, w, h, 0), interpolation="bilinear")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title("image" if c == 0 else columns[c - 1][0], fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return figure_to_array(fig)


class AttentionProbeLogger(Callback):
    """Attention-probe heatmaps of the teacher and the student over fixed validation images.

    Args:
        every_n_epochs: render after every N-th epoch and after the last one; 0 switches the callback off.
        blocks: blocks probed in each network (negative indices count from the end); None = the middle and
            the last block of each.
        num_images: how many fixed images (rows); taken from the validation set at fit start.
        head: ``mean`` or ``max`` over heads, or a head index.
        key: the logger key (W&B/TensorBoard) of the grid.

    Networks: ``pl_module.teacher`` (when distilling) and ``pl_module.model``; stages without original
    validation images but with a ``generator`` (the data-free GAN) show the generator's images on fixed noise.
    """

    def __init__(
        self,
        every_n_epochs: int = 5,
        blocks: list[int] | None = None,
        num_images: int = 4,
        head: str | int = "mean",
        key: str = "probe_maps",
    ):
        self.every_n_epochs, self.blocks, self.num_images = every_n_epochs, blocks, num_images
        self.head, self.key = head, key
        self._images: torch.Tensor | None = None
        self._noise: torch.Tensor | None = None
        self.written: list[Path] = []

    @property
    def active(self) -> bool:
        return self.every_n_epochs > 0 and self.num_images > 0

    def networks(self, pl_module: pl.LightningModule) -> list[tuple[str, nn.Module]]:
        teacher = as_vit(getattr(pl_module, "teacher", None))
        model = as_vit(getattr(pl_module, "model", None))
        nets = [("teacher", teacher)] if teacher is not None and teacher is not model else []
        if model is not None:
            nets.append(("student" if nets else "model", model))
        return nets

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._images, self._noise = None, None
        if not self.active:
            return
        nets = self.networks(pl_module)
        if self.blocks is not None:  # a bad block index fails now, not at the end of an epoch
            for _name, vit in nets:
                AttentionProbe(vit, self.blocks, self.head).remove()
        if not trainer.is_global_zero or not nets:
            return
        dm = trainer.datamodule
        if dm is not None:
            try:
                self._images = first_images(dm.val_dataloader().dataset, self.num_images)
            except NotImplementedError:
                self._images = None
        gen = getattr(pl_module, "generator", None)
        if self._images is None and isinstance(gen, nn.Module) and "latent_dim" in pl_module.hparams:
            g = torch.Generator().manual_seed(0)
            self._noise = torch.randn(self.num_images, pl_module.hparams.latent_dim, generator=g)
        if self._images is None and self._noise is None:
            rank_zero_warn("AttentionProbeLogger: no validation images found; no probe maps will be drawn")

    def due(self, trainer: pl.Trainer) -> bool:
        if not self.active:
            return False
        epoch = trainer.current_epoch + 1
        last = trainer.should_stop or (
            trainer.max_epochs is not None and trainer.max_epochs > 0 and epoch >= trainer.max_epochs
        )
        return epoch % self.every_n_epochs == 0 or last

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or not self.due(trainer) or (self._images is None and self._noise is None):
            return
        images = self._current_images(pl_module)
        columns = []
        for name, vit in self.networks(pl_module):
            blocks = self.blocks if self.blocks is not None else default_blocks(len(vit.blocks))
            try:
                maps = probe_maps(vit, images, blocks, self.head)
            except RuntimeError as err:  # a model whose token count is not the patch grid
                rank_zero_warn(f"AttentionProbeLogger: no probe maps for the {name}: {err}")
                continue
            columns += [(f"{name} blk {b}", maps[b]) for b in sorted(maps)]
        if not columns:
            return
        epoch = trainer.current_epoch
        grid = render_grid(images, columns, f"attention probe, epoch {epoch}")
        if not log_image(trainer, self.key, grid, step=trainer.global_step, caption=f"epoch {epoch}"):
            self.written.append(save_png(grid, Path(trainer.default_root_dir) / "probe_maps" / f"epoch{epoch:03d}.png"))

    @torch.no_grad()
    def _current_images(self, pl_module: pl.LightningModule) -> torch.Tensor:
        if self._images is not None:
            return self._images
        gen = pl_module.generator
        was_training = gen.training
        gen.eval()
        try:
            return gen(self._noise.to(pl_module.device)).float().cpu()
        finally:
            gen.train(was_training)
