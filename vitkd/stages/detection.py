"""Detection stages (LightningModules, run by ``python -m vitkd.fit``): ``DetrTrainer`` trains a DETR on
labelled boxes (the teacher, or a student from scratch); ``DetrDistillation`` trains a student DETR from a
frozen DETR teacher. Both keep the checkpoint with the best ``val/map`` and report ``test/map``,
``test/map50``, ``params``, ``gflops`` and ``images_per_s`` of the trained model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vitkd.detection.box_ops import normalized_to_pixel_xyxy
from vitkd.detection.criterion import SetCriterion
from vitkd.detection.denoising import DenoisingQueries, make_denoising_queries
from vitkd.detection.detr import DETR, create_detr, postprocess
from vitkd.detection.distill import detr_kd_losses, general_queries, probe_loss, shared_query_losses, teacher_set
from vitkd.detection.evaluate import detection_map
from vitkd.detection.matcher import HungarianMatcher
from vitkd.errors import VitkdInputError
from vitkd.models.probe import AttentionProbe
from vitkd.stages.base import TrainingStage, adamw
from vitkd.teacher import read_checkpoint
from vitkd.teacher_cache import TeacherCache


def load_detr(path: str | Path, img_size: int, in_chans: int, num_classes: int) -> tuple[DETR, dict]:
    """A trained DETR from a vitkd checkpoint (frozen, eval mode) and its hyper-parameters."""
    ckpt = read_checkpoint(path)
    hp = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
    if "arch" not in hp or "state_dict" not in ckpt:
        raise VitkdInputError(
            f"teacher checkpoint {path} is not a DETR stage checkpoint: "
            "train one with experiments/detection/teacher.yaml"
        )
    for key, mine in (("num_classes", num_classes), ("img_size", img_size), ("in_chans", in_chans)):
        if key in hp and hp[key] != mine:
            raise VitkdInputError(
                f"teacher checkpoint {path} has {key}={hp[key]} but the data has {mine}: "
                "distil on data of the teacher's format"
            )
    model = create_detr(
        hp["arch"], num_classes=num_classes, img_size=img_size, in_chans=in_chans, **(hp.get("model_kwargs") or {})
    )
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise VitkdInputError(
            f"teacher checkpoint {path} does not fit DETR arch {hp['arch']!r} "
            f"({len(missing)} missing, {len(unexpected)} unexpected keys)"
        )
    model.eval().requires_grad_(False)
    return model, {"arch": hp["arch"]}


class DetrTrainer(TrainingStage):
    """DETR trained on labelled boxes with the set criterion (``criterion.py``).

    Args:
        arch: a DETR preset of ``vitkd.detection.detr.DETR_PRESETS``.
        img_size, in_chans, num_classes: set from the data module.
        model_kwargs: overrides of the preset (e.g. ``{num_queries: 8}``).
        lr, lr_backbone, weight_decay, warmup_epochs: AdamW (backbone at ``lr_backbone``, default ``lr``)
            with linear warm-up then cosine decay.
        cost_class, cost_bbox, cost_giou: matcher costs (DETR: 1, 5, 2).
        weight_ce, weight_bbox, weight_giou, eos_coef, aux_loss: set loss (DETR: 1, 5, 2, 0.1, on).
        dn_groups, dn_box_noise, dn_label_noise, dn_unknown: denoising queries in training (DN-DETR,
            ``denoising.py``): noised copies per box (0 = off), λ_box, λ_label (DN-DETR: 5, 0.4, 0.2) and the
            share given no label (box-only denoising).
        measure_batch_size: batch of the throughput timed for ``metrics.json`` (0 skips the cost figures).
    """

    monitor = "val/map"
    monitor_mode = "max"

    def __init__(
        self,
        arch: str = "detr_aerial_teacher",
        img_size: int = 64,
        in_chans: int = 3,
        num_classes: int = 4,
        model_kwargs: dict[str, Any] | None = None,
        lr: float = 1e-3,
        lr_backbone: float | None = None,
        weight_decay: float = 1e-4,
        warmup_epochs: float = 1.0,
        cost_class: float = 1.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        weight_ce: float = 1.0,
        weight_bbox: float = 5.0,
        weight_giou: float = 2.0,
        eos_coef: float = 0.1,
        aux_loss: bool = True,
        dn_groups: int = 0,
        dn_box_noise: float = 0.4,
        dn_label_noise: float = 0.2,
        dn_unknown: float = 0.5,
        measure_batch_size: int = 64,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.model = create_detr(
            arch, num_classes=num_classes, img_size=img_size, in_chans=in_chans, **(model_kwargs or {})
        )
        self.matcher = HungarianMatcher(cost_class, cost_bbox, cost_giou)
        self.criterion = SetCriterion(
            num_classes, self.matcher, weight_ce, weight_bbox, weight_giou, eos_coef, aux_loss
        )
        self.val_map, self.test_map = detection_map(), detection_map()

    def forward(self, x: torch.Tensor) -> dict:
        return self.model(x)

    needs_labels = True  # trained on the data's boxes

    def check_data(self, datamodule: Any) -> None:
        super().check_data(datamodule)
        if self.needs_labels and not getattr(datamodule, "train_labeled", True):
            raise VitkdInputError(
                f"{type(self).__name__} with these settings trains on labelled boxes but the training images are "
                "unlabeled (train_unlabeled): use DetrDistillation with --model.init_args.label_source teacher"
            )

    def denoising(self, targets: list[dict]) -> DenoisingQueries | None:
        """This step's denoising queries from ``targets`` (training with ``dn_groups`` > 0), else None."""
        hp = self.hparams
        if not self.training or hp.dn_groups <= 0:
            return None
        return make_denoising_queries(
            targets, hp.num_classes, hp.dn_groups, hp.dn_box_noise, hp.dn_label_noise, hp.dn_unknown
        )

    def losses(self, x: torch.Tensor, targets: list[dict]) -> dict[str, torch.Tensor]:
        """Each weighted loss term of one batch."""
        dn = self.denoising(targets)
        return self.criterion(self.model(x, dn=dn), targets, dn)

    def logs_term(self, name: str) -> bool:
        return "_aux" not in name  # the decoder layers' auxiliary terms count in the loss, not as curves

    def _update_map(self, metric, batch) -> None:
        x, targets = batch
        preds = postprocess(self(x), self.hparams.img_size)
        size = self.hparams.img_size
        gts = [
            {"boxes": normalized_to_pixel_xyxy(t["boxes"].float(), size, size), "labels": t["labels"]} for t in targets
        ]
        metric.update(preds, gts)

    def validation_step(self, batch, batch_idx):
        self._update_map(self.val_map, batch)

    def on_validation_epoch_end(self) -> None:
        r = self.val_map.compute()
        self.log("val/map", r["map"].clamp(min=0).float(), prog_bar=True)
        self.log("val/map50", r["map_50"].clamp(min=0).float())
        self.val_map.reset()

    def test_step(self, batch, batch_idx):
        self._update_map(self.test_map, batch)

    def on_test_epoch_end(self) -> None:
        r = self.test_map.compute()
        self.log("test/map", r["map"].clamp(min=0).float())
        self.log("test/map50", r["map_50"].clamp(min=0).float())
        self.test_map.reset()

    def configure_optimizers(self):
        hp = self.hparams
        backbone = list(self.model.vit.parameters())
        ids = {id(p) for p in backbone}
        rest = [p for p in self.model.parameters() if id(p) not in ids]
        opt = adamw(
            [{"params": rest, "lr": hp.lr}, {"params": backbone, "lr": hp.lr_backbone or hp.lr}],
            amp=self.under_amp(),
            weight_decay=hp.weight_decay,
        )
        return self.cosine_schedule(opt, hp.warmup_epochs)


class DetrDistillation(DetrTrainer):
    """A student DETR distilled from a frozen DETR teacher (terms and equations in ``distill.py``).

    Loss = gt_weight · set loss against the labels (``label_source: data``) or against the teacher's boxes
    scoring ≥ ``pseudo_threshold`` (``label_source: teacher``: no labels used, the data-free setting)
    + kd_cls_weight · (D1) + kd_bbox_weight · (D2) + kd_giou_weight · (D3)
    + sq_cls_weight · (D5) + sq_bbox_weight · (D6) + sq_giou_weight · (D7) + probe_weight · (D4).
    A weight of 0 switches its term off. With ``label_source: teacher`` the training images may be unlabeled
    (a data module's ``train_unlabeled`` folder): the teacher's outputs are then the only targets.

    Args (besides ``DetrTrainer``'s):
        teacher_ckpt: the teacher's checkpoint (a ``DetrTrainer`` run's ``checkpoints/best.ckpt``).
        label_source: ``data`` or ``teacher``.
        pseudo_threshold: teacher score for a pseudo ground-truth box.
        kd_threshold: teacher score for a query to be distilled by (D1)–(D3).
        kd_temperature: τ of (D1) and (D5).
        sq_specific: the teacher's own anchors are shared queries (KD-DETR's specific sampling).
        sq_general: random boxes per image as shared queries (general sampling).
        probe_blocks: (teacher block, student block) of the probe term (D4), negative = from the end.
        teacher_cache: keep the teacher's encoder memory and own outputs per training image
            (``vitkd.teacher_cache``; the detection data are not augmented, so they never change) and reuse
            them from the second epoch; shared queries are still answered by the teacher's decoder each step.
            Off with the probe term (D4), which needs the teacher's attention.
    """

    def __init__(
        self,
        teacher_ckpt: str,
        arch: str = "detr_aerial_student",
        label_source: str = "data",
        gt_weight: float = 1.0,
        pseudo_threshold: float = 0.5,
        kd_threshold: float = 0.3,
        kd_temperature: float = 1.0,
        kd_cls_weight: float = 1.0,
        kd_bbox_weight: float = 5.0,
        kd_giou_weight: float = 2.0,
        sq_cls_weight: float = 0.0,
        sq_bbox_weight: float = 0.0,
        sq_giou_weight: float = 0.0,
        sq_specific: bool = True,
        sq_general: int = 16,
        probe_weight: float = 0.0,
        probe_blocks: tuple[int, int] = (-1, -1),
        teacher_cache: bool = True,
        **kwargs: Any,
    ):
        if label_source not in ("data", "teacher"):
            raise VitkdInputError(
                f"label_source {label_source!r} is not valid: "
                "use 'data' (labelled boxes) or 'teacher' (pseudo ground truth)"
            )
        super().__init__(arch=arch, **kwargs)
        self.save_hyperparameters()
        hp = self.hparams
        self.teacher, self.teacher_info = load_detr(teacher_ckpt, hp.img_size, hp.in_chans, hp.num_classes)
        self.strict_loading = False  # the teacher is not in the stage's checkpoints (Stage.on_save_checkpoint)
        self.probes = None
        if probe_weight > 0:
            t_block, s_block = probe_blocks
            self.probes = (AttentionProbe(self.teacher.vit, [t_block]), AttentionProbe(self.model.vit, [s_block]))
        self.cache = TeacherCache() if teacher_cache and self.probes is None else None

    @torch.no_grad()
    def teacher_outputs(self, x: torch.Tensor, targets: list[dict], queries: torch.Tensor | None) -> dict:
        """The frozen teacher's outputs (own queries, and ``query_outputs`` for ``queries``); in training with the
        cache, its memory and own outputs are read back by image id (targets without ids run the teacher)."""
        if self.cache is None or not self.training or not all("image_id" in t for t in targets):
            return self.teacher(x, queries=queries)

        def compute(xb: torch.Tensor) -> dict[str, torch.Tensor]:
            memory = self.teacher.features(xb)
            own = self.teacher.own_outputs(memory)
            return {"memory": memory, "pred_logits": own["pred_logits"], "pred_boxes": own["pred_boxes"]}

        stored = self.cache([str(t["image_id"]) for t in targets], x, compute)
        out = {"pred_logits": stored["pred_logits"], "pred_boxes": stored["pred_boxes"]}
        if queries is not None:
            out["query_outputs"] = self.teacher.answer(stored["memory"], queries)
        return out

    def report(self) -> dict[str, Any]:
        out = super().report()
        if self.cache is not None:
            out["teacher_cache"] = self.cache.summary()
        return out

    @property
    def needs_labels(self) -> bool:
        return self.hparams.label_source == "data" and self.hparams.gt_weight > 0

    def shared_queries(self, batch: int, device: torch.device) -> torch.Tensor | None:
        """(B, M, 4) the boxes asked of both models for (D5)–(D7), or None when those terms are off."""
        hp = self.hparams
        if not (hp.sq_cls_weight > 0 or hp.sq_bbox_weight > 0 or hp.sq_giou_weight > 0):
            return None
        parts = [self.teacher.anchor_boxes().detach().unsqueeze(0).expand(batch, -1, -1)] if hp.sq_specific else []
        if hp.sq_general > 0:
            parts.append(general_queries(batch, hp.sq_general, device))
        if not parts:
            raise VitkdInputError("shared-query terms are on but no queries: set sq_specific true or sq_general > 0")
        return torch.cat(parts, 1)

    def losses(self, x: torch.Tensor, targets: list[dict]) -> dict[str, torch.Tensor]:
        hp = self.hparams
        queries = self.shared_queries(x.shape[0], x.device)
        t_out = self.teacher_outputs(x, targets, queries)
        if hp.label_source == "teacher":
            targets = teacher_set(t_out, hp.pseudo_threshold)
        dn = self.denoising(targets) if hp.gt_weight > 0 else None
        s_out = self.model(x, dn=dn, queries=queries)
        terms: dict[str, torch.Tensor] = {}
        if hp.gt_weight > 0:
            terms.update({k: hp.gt_weight * v for k, v in self.criterion(s_out, targets, dn).items()})
        if hp.kd_cls_weight > 0 or hp.kd_bbox_weight > 0 or hp.kd_giou_weight > 0:
            kd = detr_kd_losses(s_out, t_out, self.matcher, hp.kd_threshold, hp.kd_temperature)
            terms.update(weighted(kd, kd_cls=hp.kd_cls_weight, kd_bbox=hp.kd_bbox_weight, kd_giou=hp.kd_giou_weight))
        if queries is not None:
            sq = shared_query_losses(s_out, t_out, hp.kd_temperature)
            terms.update(weighted(sq, sq_cls=hp.sq_cls_weight, sq_bbox=hp.sq_bbox_weight, sq_giou=hp.sq_giou_weight))
        if self.probes is not None:
            (t_map,), (s_map,) = self.probes[0].maps().values(), self.probes[1].maps().values()
            terms["probe"] = hp.probe_weight * probe_loss(s_map, t_map.detach())
        return terms


def weighted(terms: dict[str, torch.Tensor], **weights: float) -> dict[str, torch.Tensor]:
    """``weights[k] · terms[k]`` for each term whose weight is above 0 (a weight of 0 switches it off)."""
    return {k: w * terms[k] for k, w in weights.items() if w > 0}
