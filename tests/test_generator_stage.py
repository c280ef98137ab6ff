"""The generator stage through the CLI on tiny settings: a generator and a student step, the hybrid,
the NaN stop, and two DDP ranks drawing different noise."""

import json
import os
import subprocess
import sys

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from tests.conftest import fit
from vitkd.stages.data_free import (
    DataFreeGAN,
    GeneratorDiverged,
    GeneratorLossWeights,
    StudentLossWeights,
    rank_noise_generator,
)

TINY = [
    "--model.init_args.arch",
    "test_vit_patch4_16",
    "--model.init_args.batch_size",
    "8",
    "--model.init_args.steps_per_epoch",
    "1",
    "--model.init_args.student_steps",
    "1",
    "--model.init_args.val_samples",
    "16",
    "--model.init_args.grid_samples",
    "4",
    "--model.init_args.probe_blocks",
    "[0, 1]",
    "--model.init_args.patch_pairs",
    "[[0, 0], [1, 1]]",
    "--trainer.max_epochs",
    "1",
    "--trainer.log_every_n_steps",
    "1",
]


# every L_G and L_total term switched on for the transformer configs (their defaults switch λ and L_patch off)
ON = ["--model.init_args.generator_weights.attention", "1.0", "--model.init_args.student_weights.patch", "0.8"]
LOSSES = {"transformer_gan.yaml": ON, "hybrid.yaml": ON}


def tiny_args(teacher, run_dir, config="transformer_gan.yaml", *extra):
    gen = "{width: 8}" if config == "dafl.yaml" else "{patch_size: 4, embed_dim: 16, depth: 1, num_heads: 2}"
    return [
        "--config",
        f"experiments/generator/{config}",
        "--model.init_args.teacher_ckpt",
        str(teacher),
        "--run_dir",
        str(run_dir),
        "--model.init_args.generator_kwargs",
        gen,
        *TINY,
        *LOSSES.get(config, []),
        *extra,
    ]


def _fresh_stage(teacher, seed=0, **kw) -> DataFreeGAN:
    """The stage as the CLI builds it from transformer_gan.yaml + TINY (same seed, same initial weights)."""
    pl.seed_everything(seed)
    args = dict(
        arch="test_vit_patch4_16",
        teacher_ckpt=str(teacher),
        generator="transformer",
        generator_kwargs={"patch_size": 4, "embed_dim": 16, "depth": 1, "num_heads": 2},
        generator_weights=GeneratorLossWeights(attention=1.0),
        probe_blocks=[0, 1],
        student_weights=StudentLossWeights(patch=0.8),
        patch_pairs=[(0, 0), (1, 1)],
    )
    args.update(kw)
    return DataFreeGAN(**args)


def test_one_generator_and_one_student_step_through_cli(tiny_teacher, tmp_path):
    m = fit(*tiny_args(tiny_teacher, tmp_path, "transformer_gan.yaml", "--trainer.precision", "bf16-mixed"))
    assert 0.0 <= m["test/acc"] <= 1.0 and 0.0 <= m["best_val/agree"] <= 1.0 and m["generator"] == "transformer"
    assert m["gflops"] > 0 and m["images_per_s"] > 0  # the student's cost figures
    assert (tmp_path / "samples" / "epoch000.png").is_file()
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert not any(k.startswith("teacher.") for k in state)
    # both networks moved away from their (identically seeded) initial weights: one step each was taken
    fresh = _fresh_stage(tiny_teacher).state_dict()
    assert not torch.equal(state["generator.to_tokens.weight"], fresh["generator.to_tokens.weight"])
    assert not torch.equal(state["model.head.weight"], fresh["model.head.weight"])
    # every switched-on term of L_G and L_total was logged
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    for k in (
        "train/g_oh",
        "train/g_ie",
        "train/g_attn_peak",
        "train/g_attn_cons",
        "train/s_kd",
        "train/s_ce",
        "train/s_patch",
        "val/class_entropy",
    ):
        assert k in header, k


def test_dafl_and_disc_term_through_cli(tiny_teacher, tmp_path):
    m = fit(*tiny_args(tiny_teacher, tmp_path, "dafl.yaml", "--model.init_args.generator_weights.disc", "0.5"))
    assert m["generator"] == "dafl"
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/g_oh", "train/g_ie", "train/g_act", "train/g_disc"} <= set(header)
    assert "train/g_attn_peak" not in header  # λ = 0 in the DAFL config


def _labelled_shards(tmp_path) -> str:
    from data_modules.shards import encode_png, write_shards

    rng = np.random.default_rng(0)
    samples = (
        {"__key__": f"w{i:04d}", "png": encode_png((rng.random((8, 8)) * 255).astype(np.uint8)), "cls": str(i % 10)}
        for i in range(40)
    )
    write_shards(samples, tmp_path / "sel", pattern="shard-%06d.tar", maxcount=20)
    return str(tmp_path / "sel" / "shard-{000000..000001}.tar")


def test_hybrid_through_cli(tiny_teacher, tmp_path):
    urls = _labelled_shards(tmp_path)
    m = fit(
        *tiny_args(
            tiny_teacher,
            tmp_path / "run",
            "hybrid.yaml",
            "--data.init_args.train_urls",
            urls,
            "--model.init_args.wild_ratio",
            "0.25",
            "--model.init_args.labelled_val",
            "true",
        )
    )
    assert m["wild_per_batch"] == 2 and 0.0 <= m["test/acc"] <= 1.0
    assert 0.0 <= m["labelled_val/acc"] <= 1.0 and m["labelled_val_images"] > 0  # the data module's labelled split
    assert m["val_samples_per_epoch"] == 16  # the held-out noise bank, each sample validated once


def test_hybrid_without_shards_is_refused(tiny_teacher, tmp_path):
    with pytest.raises(Exception, match="train_urls"):
        fit(*tiny_args(tiny_teacher, tmp_path, "transformer_gan.yaml", "--model.init_args.wild_ratio", "0.5"))


class NaNAfterFirstEpoch(DataFreeGAN):
    """Test double: the attention-peak term turns NaN from the second epoch on."""

    def generator_terms(self, x):
        adv, attn = super().generator_terms(x)
        if self.current_epoch >= 1:
            attn["attn_peak"] = attn["attn_peak"] * float("nan")
        return adv, attn


def test_nan_generator_term_stops_and_keeps_last_good_checkpoint(tiny_teacher, tmp_path):
    args = tiny_args(
        tiny_teacher,
        tmp_path,
        "transformer_gan.yaml",
        "--model.class_path",
        "tests.test_generator_stage.NaNAfterFirstEpoch",
        "--trainer.max_epochs",
        "3",
    )
    with pytest.raises(GeneratorDiverged, match="generator loss term 'attn_peak' is not finite at epoch 1") as err:
        fit(*args)
    assert "last good checkpoint kept" in str(err.value)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert not (tmp_path / "metrics.json").exists()
    # the entry point turns it into one line and exit status 2
    from vitkd.fit import main

    assert (
        main(
            [
                "--trainer.enable_progress_bar",
                "false",
                *args[:-2],
                "--trainer.max_epochs",
                "2",
                "--run_dir",
                str(tmp_path / "again"),
            ]
        )
        == 2
    )


@pytest.mark.slow
def test_two_ddp_ranks_draw_different_noise(tiny_teacher, tmp_path):
    """2-process DDP on CPU (gloo): each rank's first noise row comes from seed + rank."""
    cmd = [
        sys.executable,
        "-m",
        "vitkd.fit",
        *tiny_args(tiny_teacher, tmp_path, "dafl.yaml"),
        "--trainer.strategy",
        "ddp_find_unused_parameters_true",
        "--trainer.devices",
        "2",
        "--trainer.accelerator",
        "cpu",
        "--trainer.enable_progress_bar",
        "false",
        "--seed_everything",
        "3",
    ]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((tmp_path / "metrics.json").read_text())
    rows = torch.tensor(m["noise_fingerprint"])
    assert rows.shape == (2, 4)
    for rank in (0, 1):
        expected = torch.randn(8, 100, generator=rank_noise_generator(3, rank))[0, :4]
        assert torch.allclose(rows[rank], expected, atol=1e-6)
    assert not torch.allclose(rows[0], rows[1])


def test_sample_grid_reaches_wandb_offline(tiny_teacher, tmp_path, monkeypatch):
    """With W&B on (offline here: no key), the epoch's sample grid is logged as a W&B image too."""
    import wandb  # noqa: F401  (the dev extra installs it: a missing wandb fails here rather than skipping)

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setattr("vitkd.loggers._has_api_key", lambda: False)
    fit(*tiny_args(tiny_teacher, tmp_path, "transformer_gan.yaml", "--wandb.enabled", "true"))
    assert (tmp_path / "samples" / "epoch000.png").is_file()
    media = list((tmp_path / "wandb").glob("offline-run-*/files/media/images/generator/samples_*.png"))
    assert media, "the sample grid is stored in the offline W&B run"


def _blocks_and_logits(vit, x):
    """Each block's output tokens and the logits of a timm ViT, run block by block (not through the stage's taps)."""
    h = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
    outs = []
    for blk in vit.blocks:
        h = blk(h)
        outs.append(h)
    return outs, vit.head(vit.norm(h)[:, 0])


def _cls_row_token_norm(f):
    """CLS row of the relation with each channel L2-normalised over the tokens (relation_norm="token")."""
    f = f / f.norm(dim=1, keepdim=True)
    return (f[:, :1, :] * f[:, 1:, :]).sum(dim=-1)  # (B, N)


def test_student_terms_match_the_total_loss_by_hand(tiny_teacher):
    """L_total = λKD·L_KD + λCE·L_CE + λpatch·L_patch, each term recomputed from the networks' outputs:
    L_KD = T²·KL(softmax(t/T) ‖ softmax(s/T)) (batch mean), L_CE = CE(s, argmax t), L_patch = mean over the
    (teacher block, student block) pairs of the MSE of the CLS relation rows (channels normalised over tokens).
    Pairs (0, 1), (1, 1): a mix-up of teacher and student block indices changes L_patch. Both heads are scaled
    up so the logits are O(1) (the tiny teacher's are ~0.05) and L_KD depends on T: a fixed T shows."""
    stage = _fresh_stage(
        tiny_teacher,
        student_weights=StudentLossWeights(kd=0.7, ce=0.3, patch=0.8),
        temperature=2.0,
        patch_pairs=[(0, 1), (1, 1)],
        relation_norm="token",
    )
    with torch.no_grad():
        for head in (stage.teacher.head, stage.model.head):
            head.weight.mul_(40.0)
            head.bias.mul_(40.0)
    x = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    terms = stage.student_terms(x)
    assert set(terms) == {"kd", "ce", "patch"}

    with torch.no_grad():
        t_blocks, t = _blocks_and_logits(stage.teacher, x)
        s_blocks, s = _blocks_and_logits(stage.model, x)
        T = 2.0
        p_t = torch.softmax(t / T, dim=1)
        kd = T * T * (p_t * (torch.log(p_t) - torch.log_softmax(s / T, dim=1))).sum(dim=1).mean()
        y = t.argmax(dim=1)
        ce = -torch.log_softmax(s, dim=1)[torch.arange(4), y].mean()
        pair_mse = [
            ((_cls_row_token_norm(s_blocks[sb]) - _cls_row_token_norm(t_blocks[tb])) ** 2).mean()
            for tb, sb in [(0, 1), (1, 1)]
        ]
        patch = (pair_mse[0] + pair_mse[1]) / 2
    assert kd > 1e-2 and ce > 1e-2 and patch > 1e-6  # nonzero, so a term multiplied by 0 cannot pass
    assert not torch.isclose(pair_mse[0], pair_mse[1], rtol=1e-2)  # the two pairs tell apart
    assert terms["kd"].item() == pytest.approx(0.7 * kd.item(), rel=1e-4)
    assert terms["ce"].item() == pytest.approx(0.3 * ce.item(), rel=1e-4)
    assert terms["patch"].item() == pytest.approx(0.8 * patch.item(), rel=1e-4)
    # the terms carry the student's gradient (the step minimises their sum)
    assert terms["kd"].requires_grad and terms["ce"].requires_grad and terms["patch"].requires_grad
