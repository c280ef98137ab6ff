"""IdleViT fine-tuning stage: self-distillation from the unreduced model (Xu et al., "IdleViT: Efficient Vision Transformer via Token Idle and Token Cut Loss", arXiv 2310.05654).

L = w_ce·CE + w_cut·(mean token cut loss over idle layers) + w_kd·KL(T ‖ S, T = 1)
    + w_feat·MSE(normalize(f_S), normalize(f_T)),
where the teacher T is the same trained ViT without idling (frozen) and f is the pooled pre-logit feature.
The authors' defaults are w_cut = 20, w_kd = 5 and w_feat = 100·w_kd (ImageNet, 30 epochs).
"""
from __future__ import annotations

import copy
from typing import Any, Literal

import torch
import torch.nn.functional as F

from vitkd.efficient.idlevit import IdleViT
from vitkd.efficient.measure import measure
from vitkd.losses import kd_loss
from vitkd.stages.base import ClassificationStage


class IdleViTFinetune(ClassificationStage):
    """Fine-tunes a copy of a trained ViT with token idling, distilled from the unreduced original.

    Args:
        teacher_ckpt / teacher_arch: the trained ViT (it is both the initialisation and the frozen teacher).
        keep_ratio: fraction of image tokens computed in each idle layer (one value or one per idle layer).
        idle_layers: blocks that idle tokens (default: the last two thirds).
        label_source: ``data`` (batch labels) or ``teacher`` (the unreduced model's argmax) for the CE term.
        ce_weight, cut_weight, kd_weight, feat_weight: weights of the four terms (0 switches a term off).
        lr, weight_decay, warmup_epochs: AdamW with warm-up then cosine decay.
        measure_batch_size: batch size of the throughput in ``metrics.json``.
    """

    def __init__(
        self,
        teacher_ckpt: str,
        teacher_arch: str | None = None,
        img_size: int = 16,
        in_chans: int = 1,
        num_classes: int = 10,
        keep_ratio: float | list[float] = 0.7,
        idle_layers: list[int] | None = None,
        label_source: Literal["data", "teacher"] = "data",
        ce_weight: float = 1.0,
        cut_weight: float = 20.0,
        kd_weight: float = 5.0,
        feat_weight: float = 500.0,
        lr: float = 1e-4,
        weight_decay: float = 0.05,
        warmup_epochs: float = 0.0,
        measure_batch_size: int = 256,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.load_frozen_teacher(teacher_ckpt, teacher_arch)
        student = copy.deepcopy(self.teacher).train().requires_grad_(True)
        self.model = IdleViT(student, keep_ratio, idle_layers)
        self.add_accuracy(num_classes)

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        hp = self.hparams
        with torch.no_grad():
            t_tokens = self.teacher.forward_features(x)
            t_logits, t_feat = self.teacher.forward_head(t_tokens), self.teacher.forward_head(t_tokens, pre_logits=True)
        s_logits, s_feat, cut = self.model.forward_aux(x, with_cut_loss=hp.cut_weight > 0)
        out: dict[str, torch.Tensor] = {}
        if hp.ce_weight > 0:
            target = y if hp.label_source == "data" else t_logits.argmax(dim=1)
            out["ce"] = hp.ce_weight * F.cross_entropy(s_logits.float(), target)
        if hp.cut_weight > 0 and cut is not None:
            out["cut"] = hp.cut_weight * cut
        if hp.kd_weight > 0:
            out["kd"] = hp.kd_weight * kd_loss(s_logits, t_logits, 1.0)
        if hp.feat_weight > 0:
            out["feat"] = hp.feat_weight * F.mse_loss(F.normalize(s_feat.float(), dim=-1), F.normalize(t_feat.float(), dim=-1))
        return out


    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.model.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        return self.cosine_schedule(opt, self.hparams.warmup_epochs)

    def report(self) -> dict[str, Any]:
        hp = self.hparams
        out = super().report()
        out["keep"] = {str(k): v for k, v in self.model.keep.items()}
        if hp.measure_batch_size > 0:
            out["teacher_gflops"] = measure(self.teacher, (hp.in_chans, hp.img_size, hp.img_size), batch_size=8, warmup=0, iters=1)["gflops"]
        return out
