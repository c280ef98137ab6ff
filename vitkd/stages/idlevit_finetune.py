"""IdleViT fine-tuning stage: self-distillation from the unreduced model (Xu et al., "IdleViT: Efficient Vision
Transformer via Token Idle and Token Cut Loss", arXiv 2310.05654).

L = w_ce·CE + w_cut·(mean token cut loss over idle layers) + w_kd·KL(T ‖ S, T = 1)
    + w_feat·MSE(normalize(f_S), normalize(f_T)),
where the teacher T is the same trained ViT without idling (frozen) and f is the pooled pre-logit feature.
The authors' defaults are w_cut = 20, w_kd = 5 and w_feat = 100·w_kd (ImageNet, 30 epochs).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from vitkd.efficient.idlevit import IdleViT
from vitkd.efficient.measure import measure
from vitkd.losses import kd_loss
from vitkd.stages.base import adamw
from vitkd.stages.distillation import DistillationStage, weight_group


@dataclass(frozen=True)
class IdleViTLossWeights:
    """The weights of L = ce·CE + cut·L_cut + kd·KL(T ‖ S, T = 1) + feat·MSE(normalize(f_S), normalize(f_T))
    (IdleViT, arXiv 2310.05654); 0 switches a term off. The defaults are the authors' (cut 20, KD 5,
    feature 100·KD).

    The authors' cut loss scores only every other idle layer (their loop deletes from the list it iterates)
    yet divides by all of them; vitkd scores every idle layer, so at their cut weight 20 vitkd's term is about
    2× theirs.
    """

    ce: float = 1.0
    cut: float = 20.0
    kd: float = 5.0
    feat: float = 500.0


class IdleViTFinetune(DistillationStage):
    """Fine-tunes a copy of a trained ViT with token idling, distilled from the unreduced original.

    Args:
        teacher_ckpt / teacher_arch: the trained ViT (it is both the initialisation and the frozen teacher).
        keep_ratio: fraction of image tokens computed in each idle layer (one value or one per idle layer).
        idle_layers: blocks that idle tokens (default: the last two thirds).
        label_source: ``data`` (batch labels) or ``teacher`` (the unreduced model's argmax) for the CE term.
        loss_weights: the weight of each term (``IdleViTLossWeights``; config keys
            ``loss_weights: {ce: 1.0, cut: 20.0, kd: 5.0, feat: 500.0}``).
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
        loss_weights: IdleViTLossWeights = IdleViTLossWeights(),
        lr: float = 1e-4,
        weight_decay: float = 0.05,
        warmup_epochs: float = 0.0,
        measure_batch_size: int = 256,
    ):
        def student(teacher: torch.nn.Module) -> IdleViT:
            return IdleViT(copy.deepcopy(teacher).train().requires_grad_(True), keep_ratio, idle_layers)

        super().__init__(
            student, teacher_ckpt, teacher_arch, img_size=img_size, in_chans=in_chans, num_classes=num_classes
        )
        self.save_hyperparameters()
        self.weights = weight_group(IdleViTLossWeights, loss_weights)
        self.save_weight_groups(loss_weights=self.weights)
        self.add_accuracy(num_classes)

    @torch.no_grad()
    def teacher_outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The unreduced teacher's ``logits`` and pooled pre-logit feature ``feat`` (one trunk pass)."""
        with self.teacher_precision(x):
            tokens = self.teacher.forward_features(x)
            return {
                "logits": self.teacher.forward_head(tokens),
                "feat": self.teacher.forward_head(tokens, pre_logits=True),
            }

    def losses(
        self, x: torch.Tensor, y: torch.Tensor, teacher_out: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        hp, w = self.hparams, self.weights
        tout = teacher_out if teacher_out is not None else self.teacher_outputs(x)
        t_logits, t_feat = tout["logits"], tout["feat"]
        s_logits, s_feat, cut = self.model.forward_aux(x, with_cut_loss=w.cut > 0)
        out: dict[str, torch.Tensor] = {}
        if w.ce > 0:
            target = y if hp.label_source == "data" else t_logits.argmax(dim=1)
            out["ce"] = w.ce * F.cross_entropy(s_logits.float(), target)
        if w.cut > 0 and cut is not None:
            out["cut"] = w.cut * cut
        if w.kd > 0:
            out["kd"] = w.kd * kd_loss(s_logits, t_logits, 1.0)
        if w.feat > 0:
            out["feat"] = w.feat * F.mse_loss(F.normalize(s_feat.float(), dim=-1), F.normalize(t_feat.float(), dim=-1))
        return out

    def configure_optimizers(self):
        opt = adamw(
            list(self.model.parameters()),
            amp=self.under_amp(),
            lr=self.hparams.lr,
            weight_decay=self.hparams.weight_decay,
        )
        return self.cosine_schedule(opt, self.hparams.warmup_epochs)

    def report(self) -> dict[str, Any]:
        hp = self.hparams
        out = super().report()
        out["keep"] = {str(k): v for k, v in self.model.keep.items()}
        if hp.measure_batch_size > 0:
            out["teacher_gflops"] = measure(
                self.teacher, (hp.in_chans, hp.img_size, hp.img_size), batch_size=8, warmup=0, iters=1
            )["gflops"]
        return out
