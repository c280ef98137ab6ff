"""Probe distillation of a student ViT from a frozen teacher (Wang et al., "Attention Probe: Vision Transformer
Distillation in the Wild", arXiv 2102.05958, Eq. 10).

One stage covers the paper's student and its baselines by switching terms:
attention probe = CE through Q + α·L_P + β·L_KD on selected wild shards; DFND = CE through Q + β·L_KD
on confidence-selected shards; KD on original data = CE to the true labels + β·L_KD.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from vitkd.errors import VitkdInputError
from vitkd.losses import NoisyAdaptation, cls_relation, kd_loss, relation_rows_loss
from vitkd.losses.projector_ensemble import ProjectorEnsemble, projector_ensemble_loss
from vitkd.models import create_model
from vitkd.stages.base import adamw
from vitkd.stages.distillation import DistillationStage, weight_group


@dataclass(frozen=True)
class ProbeLossWeights:
    """The weights of L = ce·H_CE(Q(N_S(x)), ŷ) + alpha·L_P + beta·L_KD + projector·L_PEFD (Eq. 10 of
    "Attention Probe: Vision Transformer Distillation in the Wild", arXiv 2102.05958, plus PEFD's feature
    term); 0 switches a term off.

    Attributes:
        ce: the CE term (through DFND's Q when ``noisy_adaptation``).
        alpha: the probe relation loss L_P (Eq. 8).
        beta: L_KD (Eq. 9).
        projector: the projector-ensemble feature loss (PEFD, "Improved Feature Distillation via Projector
            Ensemble", arXiv 2210.15274); 0, the default, switches it off.
    """

    ce: float = 1.0
    alpha: float = 0.8
    beta: float = 1.0
    projector: float = 0.0


class ProbeDistillation(DistillationStage):
    """Student distillation: L = w.ce·H_CE(Q(N_S(x)), ŷ) + w.alpha·L_P + w.beta·L_KD (Eq. 10), w = ``loss_weights``.

    Args:
        arch: student timm model name.
        teacher_ckpt, teacher_arch, teacher_bf16, teacher_cache, teacher_cache_file: the frozen teacher
            (``DistillationStage``).
            ``teacher_cache`` needs ``--data.init_args.augment false`` or ``augment_views K`` (each sample's
            ``K`` fixed augmented views): freshly augmented inputs differ every epoch.
            ``teacher_bf16`` suits a teacher much wider than its student; under ``bf16-mixed`` the teacher is
            in bf16 already.
        loss_weights: the weight of each term (``ProbeLossWeights``; config keys
            ``loss_weights: {ce: 1.0, alpha: 0.8, beta: 1.0, projector: 0.0}``).
        label_source: ``teacher`` — ŷ is the teacher's argmax (data-free); ``data`` — ŷ is the batch label
            (the KD-on-original-data baseline).
        noisy_adaptation: pass the student's softmax through DFND's Q before the CE.
        q_diagonal: Q's fixed diagonal; ``None`` reads the teacher's best validation accuracy from its checkpoint.
        q_lr: learning rate of Q's off-diagonal logits (Adam, constant).
        probe_pairs: (teacher block, student block) pairs compared by L_P.
        relation_norm: ``token`` normalises each channel over tokens (authors' code, the default, which gave the
            published numbers); ``channel`` normalises each token (the paper's cosine relation, Eq. 7).
        temperature: of L_KD (Eq. 9).
        num_projectors, projector_act: PEFD ensemble size (authors: 3) and projector activation (authors: ReLU).
        measure_batch_size: batch size of the throughput measured for ``metrics.json`` (0 skips the cost figures).
    """

    def __init__(
        self,
        arch: str,
        teacher_ckpt: str,
        teacher_arch: str | None = None,
        img_size: int = 16,
        in_chans: int = 1,
        num_classes: int = 10,
        loss_weights: ProbeLossWeights = ProbeLossWeights(),
        label_source: Literal["teacher", "data"] = "teacher",
        noisy_adaptation: bool = True,
        q_diagonal: float | None = None,
        q_lr: float = 1e-3,
        probe_pairs: list[tuple[int, int]] = [(3, 3), (7, 7), (11, 11)],
        relation_norm: Literal["token", "channel"] = "token",
        temperature: float = 4.0,
        lr: float = 7e-4,
        weight_decay: float = 0.025,
        warmup_epochs: float = 1.0,
        model_kwargs: dict[str, Any] | None = None,
        num_projectors: int = 3,
        projector_act: Literal["relu", "none"] = "relu",
        measure_batch_size: int = 256,
        teacher_cache: bool = False,
        teacher_cache_file: str | None = None,
        teacher_bf16: bool | Literal["auto"] = False,
    ):
        w = weight_group(ProbeLossWeights, loss_weights)
        if not any((w.ce, w.alpha, w.beta, w.projector)):
            raise VitkdInputError(
                "every loss term is switched off: "
                "set one of --model.init_args.loss_weights.{ce,alpha,beta,projector} above 0"
            )
        super().__init__(
            create_model(arch, img_size=img_size, in_chans=in_chans, num_classes=num_classes, **(model_kwargs or {})),
            teacher_ckpt,
            teacher_arch,
            img_size=img_size,
            in_chans=in_chans,
            num_classes=num_classes,
            teacher_bf16=teacher_bf16,
            teacher_cache=teacher_cache,
            teacher_cache_file=teacher_cache_file,
        )
        self.save_hyperparameters()
        self.weights = w
        self.save_weight_groups(loss_weights=w)
        if noisy_adaptation and w.ce > 0:
            diag = q_diagonal if q_diagonal is not None else self.teacher_info.get("val_acc")
            if diag is None:
                raise VitkdInputError(
                    f"teacher checkpoint {teacher_ckpt} records no validation accuracy: "
                    "set --model.q_diagonal (the teacher's accuracy)"
                )
            self.q = NoisyAdaptation(num_classes, diag)
        else:
            self.q = None
        if w.alpha > 0:
            self.pair_taps(probe_pairs)
        self.projectors = (
            ProjectorEnsemble(self.model.num_features, self.teacher.num_features, num_projectors, projector_act)
            if w.projector > 0
            else None
        )
        self.add_accuracy(num_classes)

    @torch.no_grad()
    def teacher_outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """What the loss terms need from the frozen teacher for a batch: ``logits``, ``relation`` (the CLS
        relation row of each probed block, (B, L, N), for L_P) and ``pooled`` (PEFD). Computed every step, or
        once per sample by the teacher-output cache when the inputs are not augmented."""
        with self.teacher_precision(x):
            logits, pooled = _logits_and_pooled(self.teacher, x, self.projectors is not None)
        out = {"logits": logits.float()}
        if self.taps:
            feats = self.taps[0].features()
            rows = [
                cls_relation(feats[t], self.hparams.relation_norm, self.teacher.num_prefix_tokens)
                for t, _ in self.pairs
            ]
            out["relation"] = torch.stack(rows, dim=1)
        if pooled is not None:
            out["pooled"] = pooled.float()
        return out

    def losses(
        self, x: torch.Tensor, y: torch.Tensor | None, teacher_out: dict[str, Any] | None = None
    ) -> dict[str, torch.Tensor]:
        """Each weighted term of Eq. 10 for a batch; terms with weight 0 are not computed.

        ``teacher_out``: the teacher's outputs for ``x`` from ``teacher_outputs``; computed here when None.
        """
        hp, w = self.hparams, self.weights
        pefd = self.projectors is not None
        tout = teacher_out if teacher_out is not None else self.teacher_outputs(x)
        t_logits = tout["logits"]
        s_logits, s_pooled = _logits_and_pooled(self.model, x, pefd)
        target = y if hp.label_source == "data" else t_logits.argmax(dim=1)
        out: dict[str, torch.Tensor] = {}
        if w.ce > 0:
            ce = self.q(s_logits, target) if self.q is not None else F.cross_entropy(s_logits.float(), target)
            out["ce"] = w.ce * ce
        if w.alpha > 0:
            s_feats = self.taps[1].features()
            s_rows = [cls_relation(s_feats[s], hp.relation_norm, self.model.num_prefix_tokens) for _, s in self.pairs]
            out["probe"] = w.alpha * relation_rows_loss(s_rows, tout["relation"].unbind(dim=1))
        if w.beta > 0:
            out["kd"] = w.beta * kd_loss(s_logits, t_logits, hp.temperature)
        if pefd:
            out["projector"] = w.projector * projector_ensemble_loss(s_pooled, tout["pooled"], self.projectors)
        return out

    def configure_optimizers(self):
        params = list(self.model.parameters()) + (
            list(self.projectors.parameters()) if self.projectors is not None else []
        )
        groups = [{"params": params, "lr": self.hparams.lr, "weight_decay": self.hparams.weight_decay}]
        if self.q is not None:
            # DFND trains θ with its own Adam(1e-3) every step: here a constant-lr group with no decay
            groups.append({"params": self.q.parameters(), "lr": self.hparams.q_lr, "weight_decay": 0.0})
        opt = adamw(groups, amp=self.under_amp())
        return self.cosine_schedule(opt, self.hparams.warmup_epochs, constant_groups=(1,) if self.q is not None else ())

    def report(self) -> dict[str, Any]:
        out = super().report()
        if self.q is not None:
            out["q_diagonal"] = self.q.diagonal
        return out


def _logits_and_pooled(
    model: torch.nn.Module, x: torch.Tensor, pooled: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``model(x)``, plus the pooled pre-logit feature when asked (one trunk pass either way)."""
    if not pooled:
        return model(x), None
    tokens = model.forward_features(x)
    return model.forward_head(tokens), model.forward_head(tokens, pre_logits=True)
