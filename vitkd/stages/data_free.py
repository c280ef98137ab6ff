"""Data-free distillation through a generator: DAFL and vitkd's transformer-augmented GAN (one stage).

Two optimizers, manual optimization. Each training step:

1. generator step — x = G(z); the frozen teacher is the discriminator:
   L_G = L_adv + λ·L_attention (``vitkd.losses.data_free``; DAFL is L_adv = DAFL's three terms, λ = 0);
2. student step(s) on x.detach() (optionally mixed with selected wild shards — the hybrid):
   L_total = λKD·L_KD + λCE·L_CE + λpatch·L_patch with L_KD the T²-scaled KL to the teacher
   (``kd_loss``), L_CE the cross-entropy to the teacher's argmax, L_patch the probe-distillation patch
   relation loss (``probe_relation_loss``), as in ``ProbeDistillation``.

``synthesizer: fast`` replaces step 1 by Fast-DFKD's meta-synthesis (``vitkd.generators.fast``): every
``fast_synth_every`` steps one round of ``fast_inner_steps`` inner steps on a copy of the generator and a
learnable z, whose kept batch joins a memory bank; the student steps on batches drawn from the bank.

There is no original training data: an "epoch" is ``steps_per_epoch`` steps. Validation never touches the
original data either: it is the student's agreement with the teacher's argmax (``val/agree``) on images
the current generator makes from a fixed held-out noise bank (never used for training); the best
checkpoint is chosen on it. The generator makes those images with batch statistics in its batch norms
(``val_generator_mode: train``, the default), as in training: DAFL never puts its generator in eval mode,
so the student only ever learns from batch-normed images, and running statistics of a generator whose
weights move at lr 0.2 describe none of its batches. ``val/agree_eval`` logs the other mode beside it.
That measures how well the student copies the teacher on the generator's
own distribution, not accuracy on real digits. Test accuracy is on the datamodule's original test split.

Under DDP (``--trainer.strategy ddp_find_unused_parameters_true``: each of the two backward passes uses
only one network) each rank draws its own noise from a generator seeded with ``seed + rank``. A non-finite
generator (or student) loss term stops the run with a message naming the term; the checkpoints already on
disk (``last.ckpt`` from the previous epoch) are left untouched. The check reads the loss flags on the host
only every ``finite_check_every`` steps (default: the trainer's ``log_every_n_steps``) and at an epoch's
last step, before any checkpoint of that epoch, so a step costs no host sync.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchmetrics.classification import MulticlassAccuracy
from torchvision.utils import save_image

from vitkd.data_contract import DataFreeData
from vitkd.errors import VitkdInputError
from vitkd.generators import MemoryBank, create_generator, meta_synthesize, photometric_view
from vitkd.io import atomic_path
from vitkd.losses import (
    adversarial_loss,
    attention_loss,
    generator_loss,
    kd_loss,
    probe_relation_loss,
    total_variation_loss,
)
from vitkd.models import AttentionProbe, count_params, create_model
from vitkd.precision import TimedNet
from vitkd.stages.base import adam, adamw, warmup_cosine
from vitkd.stages.distillation import DistillationStage, weight_group

VAL_SEED_OFFSET = 1_000_003  # the held-out noise bank never coincides with a training stream


class GeneratorDiverged(VitkdInputError):
    """A loss term became NaN or infinite; the message names the term and what to lower."""


def rank_noise_generator(seed: int, rank: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The noise stream of one process: a torch.Generator seeded with ``seed + rank``."""
    g = torch.Generator(device=device)
    g.manual_seed(int(seed) + int(rank))
    return g


@contextmanager
def batch_statistics(module: torch.nn.Module):
    """Batch norms of ``module`` normalise with the batch's statistics (train mode) and leave their running
    statistics as they are (momentum 0) inside the block; every mode and momentum is restored after."""
    bns = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [(m.training, m.momentum, m.track_running_stats) for m in bns]
    for m in bns:
        m.train()
        m.momentum, m.track_running_stats = 0.0, False  # batch statistics; running ones neither used nor updated
    try:
        yield
    finally:
        for m, (training, momentum, track) in zip(bns, saved):
            m.train(training)
            m.momentum, m.track_running_stats = momentum, track


def has_batch_norm(module: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.modules())


@dataclass(frozen=True)
class GeneratorLossWeights:
    """The weights of L_G = L_adv + attention·L_attention with L_adv = oh·L_oh + ie·L_ie + act·L_a + disc·L_disc
    + tv·L_tv and L_attention = peak·L_peak + consistency·L_cons (``vitkd.losses.data_free``; DAFL, "Data-Free
    Learning of Student Networks", arXiv 1904.01186, is L_adv's first three terms with attention = 0); 0
    switches a term off.

    Attributes:
        oh, ie, act: DAFL's one-hot, information-entropy and activation terms (its MNIST setting: 1, 5, 0.1).
        disc: the student–teacher discrepancy term.
        tv: vitkd's total-variation smoothness prior.
        attention: λ, the weight of L_attention (0 switches it off).
        peak, consistency: the L_attention terms (read from the teacher's attention probe).
    """

    oh: float = 1.0
    ie: float = 5.0
    act: float = 0.1
    disc: float = 0.0
    tv: float = 0.0
    attention: float = 0.0
    peak: float = 1.0
    consistency: float = 1.0


@dataclass(frozen=True)
class StudentLossWeights:
    """The weights of L_total = kd·L_KD + ce·L_CE + patch·L_patch: L_KD the T²-scaled KL to the teacher, L_CE the
    cross-entropy to the teacher's argmax, L_patch the probe-distillation patch relation loss; 0 switches a
    term off."""

    kd: float = 1.0
    ce: float = 1.0
    patch: float = 0.0


class _Steps(Dataset):
    """``n`` dummy items: the generator stage's epoch length (noise is drawn in the step, not loaded)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class DataFreeGAN(DistillationStage):
    """Generator + student trained together from a frozen teacher, without the teacher's data.

    Args:
        arch: student timm model name.
        teacher_ckpt, teacher_arch: the frozen teacher (as in ``ProbeDistillation``).
        generator: ``dafl`` (DAFL's conv generator) or ``transformer`` (vitkd's transformer-augmented one).
        generator_kwargs: extra arguments of the generator class.
        latent_dim: size of the noise vector z.
        batch_size: generated images per step and process (also the student batch size).
        steps_per_epoch: training steps per epoch and process.
        student_steps: student updates per generator update (the extra ones on fresh samples).
        seed: base of the noise seeds (rank r draws from ``seed + r``); ``None`` takes the run's
            ``seed_everything`` value.
        val_samples, grid_samples: size of the held-out noise bank and of the per-epoch image grid.
        generator_weights: the weights of L_G's terms (``GeneratorLossWeights``; config keys
            ``generator_weights: {oh: 1.0, ie: 5.0, act: 0.1, disc: 0.0, tv: 0.0, attention: 0.0, peak: 1.0,
            consistency: 1.0}``).
        probe_blocks, probe_head: teacher blocks whose CLS attention probe L_attention reads.
        view_strength: photometric jitter of the second view (consistency term).
        student_weights: λKD, λCE, λpatch of the student loss (``StudentLossWeights``; config keys
            ``student_weights: {kd: 1.0, ce: 1.0, patch: 0.0}``).
        temperature: of L_KD.
        patch_pairs, relation_norm: (teacher block, student block) pairs and normalisation of L_patch.
        wild_ratio: hybrid — fraction of each student batch taken from the datamodule's ``train_urls``
            shards (selected wild images); 0 is purely data-free.
        lr_g, betas_g: Adam for G (DAFL's reference uses lr 0.2 with Adam's default betas (0.9, 0.999)).
        lr_s, weight_decay, warmup_epochs, student_schedule: AdamW for S with warm-up + cosine
            (``cosine``) or a constant lr (``constant``; with weight_decay 0 that is DAFL's Adam).
        synthesizer: ``joint`` (DAFL: one generator step, then the student on that batch) or ``fast``
            (Fast-DFKD's meta-synthesis into a memory bank).
        fast_inner_steps, fast_lr_z, fast_synth_every, fast_bank_batches: the fast synthesizer's inner
            steps per round (inner Adam at ``lr_g``, meta Adam at ``lr_g × fast_inner_steps`` as the
            authors'), the lr of the learnable z, student steps per round, and the memory bank's size in
            batches.
        val_generator_mode: batch norms of the generator during validation and sample grids: ``train``
            (batch statistics, as in training) or ``eval`` (running statistics).
        finite_check_every: steps between host-side checks of the loss flags (None: log_every_n_steps).
        labelled_val: also report the best checkpoint's accuracy on the datamodule's labelled validation
            split (``labelled_val/acc``), for choosing between generator designs; checkpoints stay chosen
            on ``val/agree``.
    """

    monitor = "val/agree"
    data_contract = DataFreeData

    def __init__(
        self,
        arch: str,
        teacher_ckpt: str,
        teacher_arch: str | None = None,
        img_size: int = 16,
        in_chans: int = 1,
        num_classes: int = 10,
        generator: Literal["dafl", "transformer"] = "transformer",
        generator_kwargs: dict[str, Any] | None = None,
        latent_dim: int = 100,
        batch_size: int = 128,
        steps_per_epoch: int = 50,
        student_steps: int = 1,
        seed: int | None = None,
        val_samples: int = 1024,
        grid_samples: int = 64,
        generator_weights: GeneratorLossWeights = GeneratorLossWeights(),
        probe_blocks: list[int] = [1, 3],
        probe_head: str = "mean",
        view_strength: float = 0.2,
        student_weights: StudentLossWeights = StudentLossWeights(),
        temperature: float = 4.0,
        patch_pairs: list[tuple[int, int]] = [(1, 1), (3, 3), (5, 5)],
        relation_norm: Literal["token", "channel"] = "token",
        wild_ratio: float = 0.0,
        lr_g: float = 1e-3,
        betas_g: tuple[float, float] = (0.5, 0.999),
        lr_s: float = 2e-3,
        weight_decay: float = 0.025,
        warmup_epochs: float = 1.0,
        student_schedule: Literal["cosine", "constant"] = "cosine",
        synthesizer: Literal["joint", "fast"] = "joint",
        fast_inner_steps: int = 2,
        fast_lr_z: float = 0.015,
        fast_synth_every: int = 5,
        fast_bank_batches: int = 20,
        val_generator_mode: Literal["train", "eval"] = "train",
        finite_check_every: int | None = None,
        labelled_val: bool = False,
        model_kwargs: dict[str, Any] | None = None,
    ):
        g = weight_group(GeneratorLossWeights, generator_weights)
        sw = weight_group(StudentLossWeights, student_weights)
        if not 0.0 <= wild_ratio < 1.0:
            raise VitkdInputError(
                f"wild_ratio {wild_ratio} is outside [0, 1): "
                "set --model.init_args.wild_ratio to the fraction of wild images per student batch"
            )
        if steps_per_epoch < 1 or batch_size < 2 or student_steps < 1:
            raise VitkdInputError(
                "steps_per_epoch and student_steps must be ≥ 1 and batch_size ≥ 2 (batch statistics): "
                "fix --model.init_args"
            )
        for name, value, allowed in (
            ("synthesizer", synthesizer, ("joint", "fast")),
            ("val_generator_mode", val_generator_mode, ("train", "eval")),
            ("student_schedule", student_schedule, ("cosine", "constant")),
        ):
            if value not in allowed:
                raise VitkdInputError(f"{name} {value!r} is not one of {allowed}: set --model.init_args.{name}")
        if synthesizer == "fast" and val_generator_mode == "eval":
            raise VitkdInputError(
                "the fast synthesizer trains copies of the generator, so its running batch-norm statistics "
                "describe no batch: use val_generator_mode train"
            )
        if synthesizer == "fast" and (fast_inner_steps < 1 or fast_synth_every < 1 or fast_bank_batches < 1):
            raise VitkdInputError(
                "the fast synthesizer needs fast_inner_steps, fast_synth_every and fast_bank_batches ≥ 1: "
                "fix --model.init_args"
            )
        if not any((sw.kd, sw.ce, sw.patch)):
            raise VitkdInputError(
                "every student loss term is switched off: "
                "set one of --model.init_args.student_weights.{kd,ce,patch} above 0"
            )
        super().__init__(
            create_model(arch, img_size=img_size, in_chans=in_chans, num_classes=num_classes, **(model_kwargs or {})),
            teacher_ckpt,
            teacher_arch,
            img_size=img_size,
            in_chans=in_chans,
            num_classes=num_classes,
        )
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.g_weights, self.s_weights = g, sw
        self.save_weight_groups(generator_weights=g, student_weights=sw)
        self.generator = create_generator(generator, img_size, in_chans, latent_dim, **(generator_kwargs or {}))
        # the teacher's logits are banked with the images unless the student loss needs its features too
        self.reuse_logits = sw.patch == 0
        self.bank = (
            MemoryBank(
                fast_bank_batches * batch_size, (in_chans, img_size, img_size), num_classes if self.reuse_logits else 0
            )
            if synthesizer == "fast"
            else None
        )
        self.generator_steps = 0  # generator forward/backward passes so far (inner steps for ``fast``)
        self.student_images = 0  # images the student has stepped on so far
        self.use_attention = g.attention > 0 and (g.peak > 0 or g.consistency > 0)
        self.probe = AttentionProbe(self.teacher, probe_blocks, probe_head) if self.use_attention else None
        if sw.patch > 0:
            self.pair_taps(patch_pairs)
        self.n_wild = int(round(wild_ratio * batch_size))
        self.images_per_step = batch_size * student_steps  # what the throughput callback counts per step
        self._nonfinite: dict[str, dict[str, torch.Tensor]] = {}
        self._val_classes: torch.Tensor | None = None  # teacher class counts over this validation epoch
        self.val_agree = MulticlassAccuracy(num_classes, average="micro")
        self.val_agree_other = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self._noise: torch.Generator | None = None
        self._noise_state: torch.Tensor | None = None  # a resumed checkpoint's noise stream, until training starts
        self._wild_iter = None
        self._wild_loader: DataLoader | None = None
        self.noise_fingerprint: list | None = None

    # -- running the stage ------------------------------------------------------------------------
    def base_seed(self) -> int:
        if self.hparams.seed is not None:
            return int(self.hparams.seed)
        return int(os.environ.get("PL_GLOBAL_SEED", 0))

    def noise_bank(self, n: int) -> torch.Tensor:
        """The held-out noise (same on every rank, split by the distributed sampler); never trained on."""
        g = rank_noise_generator(self.base_seed() + VAL_SEED_OFFSET, 0)
        return torch.randn(n, self.hparams.latent_dim, generator=g)

    def execute(self, trainer, datamodule, ckpt_path: str | None = None) -> dict[str, Any]:
        hp = self.hparams
        self.check_data(datamodule)
        if self.n_wild > 0:
            if not datamodule.train_urls:
                raise VitkdInputError(
                    "wild_ratio > 0 (hybrid) needs selected shards: "
                    "set --data.init_args.train_urls 'dir/shard-{000000..000001}.tar'"
                )
            self._wild_loader = datamodule.train_stream(trainer, self.n_wild)
            self._datamodule = datamodule
        steps = DataLoader(_Steps(hp.steps_per_epoch * trainer.world_size), batch_size=1)
        val = DataLoader(TensorDataset(self.noise_bank(hp.val_samples)), batch_size=512)
        trainer.fit(self, train_dataloaders=steps, val_dataloaders=val, ckpt_path=ckpt_path)
        metrics = self.test_best(trainer, dataloaders=datamodule.test_dataloader())
        if hp.labelled_val:  # the best checkpoint's weights are loaded by the test above
            metrics.update(self.labelled_accuracy(datamodule.labelled_val_dataloader()))
        metrics["validation"] = "student-teacher argmax agreement on generated images from a held-out noise bank"
        return metrics

    @torch.no_grad()
    def labelled_accuracy(self, loader) -> dict[str, Any]:
        """Student accuracy on a labelled loader (summed over ranks)."""
        was = self.model.training
        self.model.eval()
        counts = torch.zeros(2, device=self.device)
        for x, y in loader:
            x, y = x.to(self.device), y.to(self.device)
            counts += torch.stack(
                [(self.model(x).argmax(dim=1) == y).sum().float(), torch.tensor(float(len(y)), device=self.device)]
            )
        self.model.train(was)
        if self.trainer is not None and self.trainer.world_size > 1:
            counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        return {"labelled_val/acc": float(counts[0] / counts[1].clamp_min(1)), "labelled_val_images": int(counts[1])}

    def report(self) -> dict[str, Any]:
        out = super().report()
        out.update(
            generator_params=count_params(self.generator),
            generator=self.hparams.generator,
            synthesizer=self.hparams.synthesizer,
        )
        out.update(
            generator_steps=int(self.generator_steps),
            student_images=int(self.student_images),
            batch_size=self.hparams.batch_size,
        )
        if self.noise_fingerprint is not None:
            out["noise_fingerprint"] = self.noise_fingerprint
        if self.n_wild:
            out["wild_per_batch"] = self.n_wild
        return out

    def setup(self, stage: str) -> None:
        super().setup(stage)
        strategy = self.trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, DDPStrategy) and not getattr(strategy, "_ddp_kwargs", {}).get(
            "find_unused_parameters", False
        ):
            raise VitkdInputError(
                "the generator stage's two backward passes each use one network, which plain DDP rejects: "
                "use --trainer.strategy ddp_find_unused_parameters_true"
            )

    def on_train_start(self) -> None:
        self._noise = rank_noise_generator(self.base_seed(), self.global_rank, self.device)
        if self._noise_state is not None:  # resumed: the noise stream goes on where the checkpoint left it
            self._noise.set_state(self._noise_state)
            self._noise_state = None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self._noise is not None:
            checkpoint["vitkd_noise_state"] = self._noise.get_state()
        checkpoint["vitkd_generator_steps"] = int(self.generator_steps)
        checkpoint["vitkd_student_images"] = int(self.student_images)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._noise_state = checkpoint.get("vitkd_noise_state")
        # a resume continues the counts; testing the best checkpoint after training keeps the run's totals
        self.generator_steps = max(self.generator_steps, int(checkpoint.get("vitkd_generator_steps", 0)))
        self.student_images = max(self.student_images, int(checkpoint.get("vitkd_student_images", 0)))

    def draw_noise(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.hparams.latent_dim, generator=self._noise, device=self.device)

    def _next_wild(self) -> torch.Tensor:
        if self._wild_iter is None:
            self._wild_iter = iter(self._wild_loader)
        try:
            x, _ = next(self._wild_iter)
        except StopIteration:  # a new pass over the shards
            self._wild_iter = iter(self._wild_loader)
            x, _ = next(self._wild_iter)
        # the datamodule's own batch-level augmentation, as the wild-shard students get it
        x, _ = self._datamodule.on_after_batch_transfer((x.to(self.device), None), 0)
        return x

    # -- the losses -------------------------------------------------------------------------------
    def timed_nets(self) -> list[TimedNet]:
        """The generator from noise and the student, trained; the teacher forward+backward too, since the
        generator's gradients pass through it."""
        hp = self.hparams
        image = (hp.in_chans, hp.img_size, hp.img_size)
        return [
            TimedNet("generator", self.generator, (hp.latent_dim,), train=True),
            TimedNet("model", self.model, image, train=True),
            TimedNet("teacher", self.teacher, image, train=True),
        ]

    def teacher_out(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher logits and pre-logits features (the DAFL activation term's f_T)."""
        f = self.teacher.forward_features(x)
        return self.teacher.forward_head(f), self.teacher.forward_head(f, pre_logits=True)

    def probes(self) -> list[torch.Tensor]:
        rows = self.probe.rows()
        return [rows[b] for b in self.probe.blocks]

    def generator_terms(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(L_adv terms, L_attention terms) for generated images x; gradients flow to x only."""
        hp, g = self.hparams, self.g_weights
        t_logits, t_feats = self.teacher_out(x)
        self._teacher_logits = t_logits
        probes_a = self.probes() if self.use_attention else None
        s_logits = self.model(x) if g.disc else None
        adv = adversarial_loss(t_logits, t_feats, s_logits, g.oh, g.ie, g.act, g.disc)
        if g.tv:
            adv["tv"] = g.tv * total_variation_loss(x)
        attn: dict[str, torch.Tensor] = {}
        if self.use_attention:
            probes_b = None
            if g.consistency:
                self.teacher(photometric_view(x, hp.view_strength, self._noise))
                probes_b = self.probes()
            attn = attention_loss(probes_a, probes_b, g.peak, g.consistency)
        return adv, attn

    def student_terms(self, x: torch.Tensor, t_logits: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """λKD·L_KD + λCE·L_CE + λpatch·L_patch on images x (teacher pseudo-labels), as named terms.
        ``t_logits``: the teacher's logits of x when already known (the teacher is frozen: they are the same)."""
        hp, w = self.hparams, self.s_weights
        t_feats = None
        if t_logits is None:
            with torch.no_grad():
                t_logits = self.teacher(x)
                t_feats = self.taps[0].features() if self.taps else None
        s_logits = self.model(x)
        out: dict[str, torch.Tensor] = {}
        if w.kd:
            out["kd"] = w.kd * kd_loss(s_logits, t_logits, hp.temperature)
        if w.ce:
            out["ce"] = w.ce * F.cross_entropy(s_logits.float(), t_logits.argmax(dim=1))
        if w.patch:
            s_feats = self.taps[1].features()
            out["patch"] = w.patch * probe_relation_loss(
                [s_feats[s] for _, s in self.pairs],
                [t_feats[t] for t, _ in self.pairs],
                hp.relation_norm,
                self.model.num_prefix_tokens,
            )
        return out

    def note_finite(self, terms: dict[str, torch.Tensor], which: str) -> None:
        """Record on device whether each term is NaN or infinite (no host sync); ``check_finite`` reads it."""
        flags = self._nonfinite.setdefault(which, {})
        for k, v in terms.items():
            bad = ~torch.isfinite(v.detach())
            flags[k] = bad if k not in flags else flags[k] | bad

    def check_due(self, batch_idx: int) -> bool:
        every = self.hparams.finite_check_every or (self.trainer.log_every_n_steps if self._trainer is not None else 1)
        return (batch_idx + 1) % max(1, every) == 0 or batch_idx + 1 == self.hparams.steps_per_epoch

    def check_finite(self) -> None:
        """Stop (on every rank together) when a term ``note_finite`` recorded was NaN or infinite, naming it;
        the generator's terms are named before the student's (a bad generator makes the student's terms bad too)."""
        names = [(w, k) for w in ("generator", "student") for k in self._nonfinite.get(w, {})]
        if not names:
            return
        flags = torch.stack([self._nonfinite[w][k].float() for w, k in names])
        self._nonfinite = {}
        if self.trainer is not None and self.trainer.world_size > 1:
            flags = self.trainer.strategy.reduce(flags, reduce_op="sum")
        bad = [(w, k) for (w, k), f in zip(names, flags.tolist()) if f > 0]
        if bad:
            which, bad = bad[0][0], [k for w, k in bad if w == bad[0][0]]
            ckpt = self.trainer.checkpoint_callback if self.trainer is not None else None
            last = Path(ckpt.dirpath) / "last.ckpt" if ckpt is not None and ckpt.dirpath else None
            kept = (
                f"last good checkpoint kept: {last}"
                if last is not None and last.is_file()
                else "no checkpoint was written before it"
            )
            weight = "lr_s" if which == "student" else "lr_g"
            raise GeneratorDiverged(
                f"{which} loss term {bad[0]!r} is not finite at epoch {self.current_epoch} step {self._step_in_epoch}; "
                f"run stopped, {kept}: lower --model.init_args.{weight} or that term's weight"
            )

    # -- training ---------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        """Step 1 (``joint_generator_step`` or ``fast_generator_step``), then the student step(s)."""
        hp = self.hparams
        self._step_in_epoch = batch_idx
        opt_g, opt_s = self.optimizers()
        sched = self.lr_schedulers()
        if hp.synthesizer == "fast":
            x, terms_g, loss_g = self.fast_generator_step(opt_g, batch_idx)
        else:
            x, terms_g, loss_g = self.joint_generator_step(opt_g)

        # 2. student step(s) on the generated batch (+ wild images for the hybrid)
        n_gen = hp.batch_size - self.n_wild
        self.toggle_optimizer(opt_s)
        for k in range(hp.student_steps):
            t_logits = None
            if hp.synthesizer == "fast":
                if self.reuse_logits:
                    xs, t_logits = self.bank.sample_pairs(n_gen, self._noise)
                else:
                    xs = self.bank.sample(n_gen, self._noise)
            elif k == 0:
                xs = x.detach()[:n_gen]
                if self.reuse_logits:
                    t_logits = self._teacher_logits.detach()[:n_gen]
            else:
                with torch.no_grad():
                    xs = self.generator(self.draw_noise(hp.batch_size))[:n_gen]
            if self.n_wild:
                xs = torch.cat([xs, self._next_wild().to(xs.dtype)])
                t_logits = None  # the wild images' logits are not known yet
            terms_s = self.student_terms(xs, t_logits)
            self.note_finite(terms_s, "student")
            loss_s = torch.stack(list(terms_s.values())).sum()
            opt_s.zero_grad(set_to_none=True)
            self.manual_backward(loss_s)
            opt_s.step()
            sched.step()
            self.student_images += xs.shape[0]
        self.untoggle_optimizer(opt_s)
        if self.check_due(batch_idx):
            self.check_finite()

        bs = hp.batch_size
        for k, v in terms_g.items():
            self.log(f"train/g_{k}", v.detach(), batch_size=bs)
        for k, v in terms_s.items():
            self.log(f"train/s_{k}", v.detach(), batch_size=bs)
        if loss_g is not None:
            self.log("train/loss_g", loss_g.detach(), prog_bar=True, batch_size=bs)
        self.log("train/loss_s", loss_s.detach(), prog_bar=True, batch_size=bs)

    def first_noise(self) -> torch.Tensor:
        """A batch of noise; the first one's fingerprint (every rank's) goes to ``metrics.json``."""
        z = self.draw_noise(self.hparams.batch_size)
        if self.noise_fingerprint is None:
            fp = self.all_gather(z[0, :4].float().detach())
            self.noise_fingerprint = fp.reshape(-1, 4).cpu().tolist()
        return z

    def joint_generator_step(self, opt_g):
        """DAFL's step 1: x = G(z), one generator update on L_G with the teacher as the discriminator."""
        z = self.first_noise()
        self.toggle_optimizer(opt_g)
        x = self.generator(z)
        adv, attn = self.generator_terms(x)
        terms_g = {**adv, **attn}
        self.note_finite(terms_g, "generator")
        loss_g = generator_loss(adv, attn, self.g_weights.attention)
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(loss_g)
        opt_g.step()
        self.untoggle_optimizer(opt_g)
        self.generator_steps += 1
        return x, terms_g, loss_g

    def fast_generator_step(self, opt_g, batch_idx: int):
        """Fast-DFKD's step 1, every ``fast_synth_every`` steps: one meta-synthesis round into the bank."""
        hp = self.hparams
        if batch_idx % hp.fast_synth_every:  # every epoch starts with a round, so a resumed bank is topped up
            return None, {}, None
        z = self.first_noise()
        logged: dict[str, torch.Tensor] = {}

        def loss_fn(x: torch.Tensor) -> torch.Tensor:
            adv, attn = self.generator_terms(x)
            logged.clear()
            logged.update(adv, **attn)
            self.note_finite(logged, "generator")
            return generator_loss(adv, attn, self.g_weights.attention)

        self.toggle_optimizer(opt_g)
        opt_g.zero_grad(set_to_none=True)
        x, loss_g = meta_synthesize(
            self.generator, z, loss_fn, hp.fast_inner_steps, hp.lr_g, hp.fast_lr_z, backward=self.manual_backward
        )
        if self.trainer is not None and self.trainer.world_size > 1:  # the meta generator is one across ranks
            for p in self.generator.parameters():
                if p.grad is not None:
                    p.grad = self.trainer.strategy.reduce(p.grad, reduce_op="mean")
        opt_g.step()
        self.untoggle_optimizer(opt_g)
        if self.reuse_logits:
            with torch.no_grad():
                self.bank.push(x, self.teacher(x))
        else:
            self.bank.push(x)
        self.generator_steps += hp.fast_inner_steps
        return x, dict(logged), loss_g

    @contextmanager
    def generator_mode(self, mode: str):
        """The generator's batch norms in ``mode`` (``train``: batch statistics, running ones untouched)."""
        if mode == "train":
            with batch_statistics(self.generator):
                yield
        else:
            was = self.generator.training
            self.generator.eval()
            try:
                yield
            finally:
                self.generator.train(was)

    def validation_step(self, batch, batch_idx):
        (z,) = batch
        mode = self.hparams.val_generator_mode
        modes = [(mode, self.val_agree, "val/agree")]
        # with no batch norm the two modes make the same images; the fast synthesizer's meta generator is never
        # run in train mode itself (its copies are), so its running statistics are its initial ones
        if has_batch_norm(self.generator) and self.hparams.synthesizer != "fast":
            other = "eval" if mode == "train" else "train"
            modes.append((other, self.val_agree_other, f"val/agree_{other}"))
        for m, metric, key in modes:
            with self.generator_mode(m):
                x = self.generator(z)
            t = self.teacher(x).argmax(dim=1)
            metric.update(self.model(x).float(), t)
            if key == "val/agree":
                counts = torch.bincount(t, minlength=self.hparams.num_classes).float()
                self._val_classes = counts if self._val_classes is None else self._val_classes + counts
            self.log(key, metric, on_epoch=True, prog_bar=key == "val/agree", batch_size=len(z))

    def on_validation_epoch_end(self) -> None:
        """``val/class_entropy``: entropy of the teacher's class histogram over the held-out generated images,
        divided by log(classes): 1 when the classes are balanced, 0 when every image is one class. A collapsed
        generator makes ``val/agree`` trivially 1; this figure shows it."""
        counts, self._val_classes = self._val_classes, None
        if counts is None:
            return
        if self._trainer is not None and self.trainer.world_size > 1:
            counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        p = counts / counts.sum().clamp_min(1)
        entropy = -(p * p.clamp_min(1e-12).log()).sum() / math.log(self.hparams.num_classes)
        self.log("val/class_entropy", entropy, batch_size=1)

    def on_train_epoch_end(self) -> None:
        """Save the generator's samples on the fixed grid noise as a PNG (and to W&B when it logs images)."""
        if not self.trainer.is_global_zero or self.hparams.grid_samples <= 0:
            return
        with torch.no_grad(), self.generator_mode(self.hparams.val_generator_mode):
            z = self.noise_bank(self.hparams.grid_samples).to(self.device)
            x = self.generator(z).float().cpu()
        path = Path(self.trainer.default_root_dir) / "samples" / f"epoch{self.current_epoch:03d}.png"
        with atomic_path(path) as tmp:
            save_image(x * 0.5 + 0.5, str(tmp), nrow=int(math.ceil(math.sqrt(len(x)))), format="png")
        for logger in self.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key="generator/samples", images=[str(path)], step=self.global_step)

    def configure_optimizers(self):
        hp = self.hparams
        # the fast synthesizer's meta optimiser: Adam at lr_g × inner steps, betas (0.5, 0.999), as the authors'
        lr_g, betas = (
            (hp.lr_g * hp.fast_inner_steps, (0.5, 0.999)) if hp.synthesizer == "fast" else (hp.lr_g, tuple(hp.betas_g))
        )
        opt_g = adam(list(self.generator.parameters()), amp=self.under_amp(), lr=lr_g, betas=betas)
        opt_s = adamw(list(self.model.parameters()), amp=self.under_amp(), lr=hp.lr_s, weight_decay=hp.weight_decay)
        if hp.student_schedule == "constant":
            return [opt_g, opt_s], [torch.optim.lr_scheduler.LambdaLR(opt_s, lambda _s: 1.0)]
        per_epoch = hp.steps_per_epoch * hp.student_steps
        total = max(1, (self.trainer.max_epochs or 1) * per_epoch)
        warmup = hp.warmup_epochs * per_epoch

        return [opt_g, opt_s], [torch.optim.lr_scheduler.LambdaLR(opt_s, warmup_cosine(total, warmup))]
