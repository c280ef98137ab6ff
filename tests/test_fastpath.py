"""The fast paths (bf16 autocast, fused attention with the CLS-row probe, cached teacher outputs) give the
same selection and the same loss values as the plain fp32 path, and the benchmark's reference-style loops
compute the same quantities as vitkd (so ``make bench`` compares like with like)."""

import csv
import json

import pytest
import torch

from benchmarks.reference import HookedAttention, ReferenceDistiller, reference_model, reference_scores
from tests.conftest import fit
from vitkd.errors import VitkdInputError
from vitkd.stages import AttentionProbeSelector, ProbeDistillation
from vitkd.teacher_cache import TeacherCache

BF16_RTOL = 2e-2  # bf16 keeps 8 mantissa bits (2^-8 ≈ 4e-3 per rounding); a few roundings through a 2-block ViT


def _select(teacher, pool, run_dir, precision, *extra):
    fit(
        "--config",
        "experiments/digits/select.yaml",
        "--model.init_args.teacher_ckpt",
        str(teacher),
        "--model.init_args.probe_blocks",
        "[0, 1]",
        "--model.init_args.num_keep",
        "60",
        "--data.init_args.wild_urls",
        pool,
        "--trainer.precision",
        precision,
        "--run_dir",
        str(run_dir),
        *extra,
    )
    rows = list(csv.DictReader(open(run_dir / "scores.csv")))
    return {r["key"]: float(r["value"]) for r in rows}, {r["key"] for r in rows if r["selected"] == "1"}


@pytest.mark.parametrize("bf16", ["bf16-mixed", "bf16-true", "bf16-true+compile"])
def test_bf16_selection_keeps_the_fp32_keys(tiny_teacher, tiny_pool, tmp_path, bf16):
    """bf16 autocast, the teacher's weights and inputs in bf16 (``bf16-true``), and that compiled with weight
    freezing, keep the fp32 selection."""
    v32, kept32 = _select(tiny_teacher, tiny_pool, tmp_path / "fp32", "32-true")
    extra = ("--model.init_args.compile", "true") if bf16.endswith("+compile") else ()
    v16, kept16 = _select(tiny_teacher, tiny_pool, tmp_path / "bf16", bf16.split("+")[0], *extra)
    assert v32.keys() == v16.keys() and len(kept32) == len(kept16) == 60
    dev = {k: abs(v16[k] - v32[k]) for k in v32}
    # every value within bf16 tolerance of its fp32 value, and the bf16 run really ran in lower precision
    assert all(d <= BF16_RTOL * max(1.0, abs(v32[k])) for k, d in dev.items()), max(dev.values())
    assert max(dev.values()) > 0
    # Two samples can swap order under bf16 only if their fp32 values are closer than the sum of their bf16
    # deviations, so a sample can change sides of the cut only if its fp32 value lies within its own
    # deviation plus the largest one of the k-th value. On this barely trained teacher all 120 values lie
    # within ~0.01 of each other, so that band is wide; the samples outside it must be kept (or not) by both.
    kth, maxdev = sorted(v32.values())[59], max(dev.values())
    border = {k for k, v in v32.items() if abs(v - kth) <= dev[k] + maxdev}
    assert len(kept32 - border) >= 10 and len(v32.keys() - kept32 - border) >= 10, "too few samples left to compare"
    assert kept32 - border == kept16 - border


def test_compiled_selection_scores_like_eager(tiny_teacher, tiny_pool, tmp_path):
    """``--model.init_args.compile true`` (torch.compile of the scoring) keeps the same samples with the same values."""
    v_eager, kept_eager = _select(tiny_teacher, tiny_pool, tmp_path / "eager", "32-true")
    v_comp, kept_comp = _select(
        tiny_teacher, tiny_pool, tmp_path / "compiled", "32-true", "--model.init_args.compile", "true"
    )
    assert v_eager.keys() == v_comp.keys()
    assert max(abs(v_comp[k] - v_eager[k]) for k in v_eager) <= 1e-5
    assert kept_comp == kept_eager
    fingerprint = (tmp_path / "compiled" / "score_parts" / "fingerprint.json").read_text()
    assert '"compile": true' in fingerprint  # parts scored eagerly are not mixed with compiled ones on resume


@pytest.fixture(scope="module")
def stage(tiny_teacher):
    torch.manual_seed(0)
    return ProbeDistillation(
        arch="test_vit_patch4_16", teacher_ckpt=str(tiny_teacher), q_diagonal=0.9, probe_pairs=[(0, 0), (1, 1)]
    )


@pytest.fixture(scope="module")
def batch():
    return torch.randn(32, 1, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("relation_norm", ["token", "channel"])
def test_bf16_losses_match_fp32(stage, batch, relation_norm):
    stage.hparams.relation_norm = relation_norm
    with torch.no_grad():
        fp32 = stage.losses(batch, None)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = stage.losses(batch, None)
    assert fp32.keys() == bf16.keys() == {"ce", "probe", "kd"}
    for k in fp32:
        assert fp32[k].dtype == bf16[k].dtype == torch.float32, k  # loss terms are reduced in fp32 under autocast
        torch.testing.assert_close(bf16[k], fp32[k], rtol=BF16_RTOL, atol=1e-4, msg=lambda m: f"{k}: {m}")
    assert any(not torch.equal(bf16[k], fp32[k]) for k in fp32), "autocast had no effect"


def test_cached_teacher_outputs_give_identical_losses(stage, batch):
    cached = stage.teacher_outputs(batch)
    with torch.no_grad():
        direct = stage.losses(batch, None)
        from_cache = stage.losses(batch, None, teacher_out=cached)
    assert direct.keys() == from_cache.keys()
    for k in direct:
        assert torch.equal(direct[k], from_cache[k]), k


def test_teacher_cache_returns_each_keys_outputs(stage, batch):
    """Keys seen before are read back (rows of the right samples, in batch order); only new keys reach the teacher."""
    cache, seen = TeacherCache(), []

    def counting(x):
        seen.append(len(x))
        return stage.teacher_outputs(x)

    keys = [f"k{i}" for i in range(len(batch))]
    with torch.no_grad():
        cache(keys[:20], batch[:20], counting)
        mixed = [7, 25, 3, 31, 7]  # known and new keys, a repeat, out of order
        got = cache([keys[i] for i in mixed], batch[mixed], counting)
        want = stage.teacher_outputs(batch[mixed])
    assert seen == [20, 2] and len(cache) == 22 and (cache.hits, cache.misses) == (3, 22)
    assert got.keys() == want.keys() == {"logits", "relation"}
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")
    assert cache.nbytes() == 22 * (10 + 2 * 16) * 4  # logits + one 16-patch relation row per probed block, fp32


def _student(teacher, urls, run_dir, *extra):
    fit(
        "--config",
        "experiments/digits/attention_probe.yaml",
        "--model.init_args.arch",
        "test_vit_patch4_16",
        "--model.init_args.teacher_ckpt",
        str(teacher),
        "--model.init_args.probe_pairs",
        "[[0, 0], [1, 1]]",
        "--data.init_args.train_urls",
        urls,
        "--data.init_args.val_fraction",
        "0.2",
        "--data.init_args.batch_size",
        "16",
        "--data.init_args.augment",
        "false",
        "--trainer.max_epochs",
        "3",
        "--trainer.log_every_n_steps",
        "1",
        "--run_dir",
        str(run_dir),
        *extra,
    )
    log = list(csv.DictReader(open(run_dir / "metrics.csv")))
    return [float(r["train/loss"]) for r in log if r.get("train/loss")], json.loads(
        (run_dir / "metrics.json").read_text()
    )


def test_training_with_teacher_cache_matches_recomputing(tiny_teacher, tiny_pool, tmp_path):
    """Un-augmented training through the cache: the teacher runs once per sample, and every logged loss
    equals the run that recomputes the teacher each step."""
    _select(tiny_teacher, tiny_pool, tmp_path / "sel", "32-true")
    urls = str(tmp_path / "sel" / "selected" / "shard-000000.tar")
    plain, _ = _student(tiny_teacher, urls, tmp_path / "plain")
    cached, m = _student(tiny_teacher, urls, tmp_path / "cached", "--model.init_args.teacher_cache", "true")
    assert len(plain) == len(cached) >= 6
    torch.testing.assert_close(torch.tensor(cached), torch.tensor(plain), rtol=1e-4, atol=1e-6)
    c = m["teacher_cache"]
    n_train = c["samples"]  # each training sample once in the cache, then read back in epochs 2 and 3
    assert c["misses"] == n_train and c["hits"] == 2 * n_train and 40 <= n_train <= 60  # 60 kept, ~20% held out


def test_teacher_cache_over_fixed_augmented_views_matches_recomputing(tiny_teacher, tiny_pool, tmp_path):
    """Augmented training through the cache with 2 fixed views per sample (view = epoch mod 2): the teacher
    runs once per sample and view, and every logged loss equals the run that recomputes it each step."""
    _select(tiny_teacher, tiny_pool, tmp_path / "sel", "32-true")
    urls = str(tmp_path / "sel" / "selected" / "shard-000000.tar")
    views = ("--data.init_args.augment", "true", "--data.init_args.augment_views", "2")
    plain, _ = _student(tiny_teacher, urls, tmp_path / "plain", *views)
    cached, m = _student(tiny_teacher, urls, tmp_path / "cached", *views, "--model.init_args.teacher_cache", "true")
    unaugmented, _ = _student(tiny_teacher, urls, tmp_path / "unaugmented")
    assert len(plain) == len(cached) == len(unaugmented) >= 6
    torch.testing.assert_close(torch.tensor(cached), torch.tensor(plain), rtol=1e-4, atol=1e-6)
    assert not torch.allclose(torch.tensor(plain), torch.tensor(unaugmented))  # the views are augmented
    c = m["teacher_cache"]
    n_train = c["samples"] // 2  # epochs 1 and 2 fill one view each, epoch 3 reads view 0 back
    assert c["samples"] == c["misses"] == 2 * n_train and c["hits"] == n_train and 40 <= n_train <= 60


def test_teacher_cache_file_keeps_rows_only_for_the_same_fingerprint(tmp_path):
    cache = TeacherCache()
    cache(["a", "b"], torch.arange(4.0).view(2, 2), lambda x: {"logits": 2 * x})
    cache.save(tmp_path / "c.pt", "f1")
    back = TeacherCache()
    assert back.load(tmp_path / "c.pt", "f1") is None and back.loaded == len(back) == 2
    out = back(["b", "a"], torch.zeros(2, 2), lambda x: {"logits": x})  # read back: never recomputed
    torch.testing.assert_close(out["logits"], torch.tensor([[4.0, 6.0], [0.0, 2.0]]))
    assert back.misses == 0 and back.hits == 2
    assert "another" in TeacherCache().load(tmp_path / "c.pt", "f2")
    (tmp_path / "c.pt").write_bytes(b"not a torch file")
    assert TeacherCache().load(tmp_path / "c.pt", "f1").startswith("unreadable")
    assert TeacherCache().load(tmp_path / "none.pt", "f1") == "no such file yet"


def test_teacher_cache_file_is_shared_by_seeds_over_the_same_views(tiny_teacher, tiny_pool, tmp_path):
    """Two fixed views drawn with ``view_seed`` 0: the seed-1 run reads every row the seed-0 run wrote and logs
    the losses of a seed-1 run that runs the teacher itself; other views or a damaged file are recomputed and
    the file replaced."""
    _select(tiny_teacher, tiny_pool, tmp_path / "sel", "32-true")
    urls = str(tmp_path / "sel" / "selected" / "shard-000000.tar")
    file = tmp_path / "teacher_outputs.pt"
    views = ["--data.init_args.augment", "true", "--data.init_args.augment_views", "2"]
    views += ["--data.init_args.view_seed", "0", "--model.init_args.teacher_cache", "true"]
    kept = [*views, "--model.init_args.teacher_cache_file", str(file)]
    _, first = _student(tiny_teacher, urls, tmp_path / "s0", *kept, "--seed_everything", "0")
    n_rows = first["teacher_cache"]["samples"]
    assert first["teacher_cache"]["misses"] == n_rows > 0 and first["teacher_cache"]["loaded"] == 0
    assert file.exists()
    shared, m = _student(tiny_teacher, urls, tmp_path / "s1", *kept, "--seed_everything", "1")
    own, _ = _student(tiny_teacher, urls, tmp_path / "s1-own", *views, "--seed_everything", "1")
    assert m["teacher_cache"]["loaded"] == n_rows and m["teacher_cache"]["misses"] == 0
    torch.testing.assert_close(torch.tensor(shared), torch.tensor(own), rtol=1e-4, atol=1e-6)
    other = [*kept[:5], "1", *kept[6:]]  # view_seed 1: other inputs, so other outputs
    _, m = _student(tiny_teacher, urls, tmp_path / "v1", *other, "--seed_everything", "1")
    assert m["teacher_cache"]["loaded"] == 0 and m["teacher_cache"]["misses"] == n_rows
    fingerprint = torch.load(file, weights_only=True)["fingerprint"]
    file.write_bytes(file.read_bytes()[:100])  # a damaged file
    _, m = _student(tiny_teacher, urls, tmp_path / "v1-again", *other, "--seed_everything", "1")
    assert m["teacher_cache"]["loaded"] == 0 and m["teacher_cache"]["misses"] == n_rows
    replaced = TeacherCache()  # written whole again, for the same inputs
    assert replaced.load(file, fingerprint) is None and replaced.loaded == n_rows


def test_teacher_cache_refuses_augmented_inputs(tiny_teacher, tiny_pool, tmp_path):
    with pytest.raises(VitkdInputError, match="augment false"):
        fit(
            "--config",
            "experiments/digits/attention_probe.yaml",
            "--model.init_args.arch",
            "test_vit_patch4_16",
            "--model.init_args.teacher_ckpt",
            str(tiny_teacher),
            "--model.init_args.probe_pairs",
            "[[0, 0], [1, 1]]",
            "--model.init_args.teacher_cache",
            "true",
            "--data.init_args.train_urls",
            tiny_pool,
            "--data.init_args.augment_views",
            "0",  # a fresh draw every epoch (the config's fixed views can be cached)
            "--trainer.max_epochs",
            "1",
            "--run_dir",
            str(tmp_path / "aug"),
        )


def test_reference_selector_scores_like_vitkd(tiny_teacher, batch):
    sel = AttentionProbeSelector(teacher_ckpt=str(tiny_teacher), num_keep=1, probe_blocks=[0, 1], probe_head="mean")
    ref = reference_model(sel.teacher).eval()
    hooks = HookedAttention(ref, [0, 1])
    with torch.inference_mode():
        fast = sel.score(batch)
    with torch.no_grad():
        slow = reference_scores(ref, hooks, batch, [0, 1], "mean", [0.05, 0.05], 0.9)
    for k in ("va_blk0", "va_blk1", "vn", "value"):
        torch.testing.assert_close(fast[k], slow[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("relation_norm", ["token", "channel"])
def test_reference_distill_loss_equals_vitkd(stage, batch, relation_norm):
    stage.hparams.relation_norm = relation_norm
    with torch.no_grad():
        vitkd_loss = sum(stage.losses(batch, None).values())
    ref = ReferenceDistiller(
        stage.teacher, stage.model, [(0, 0), (1, 1)], 10, q_diagonal=0.9, relation_norm=relation_norm
    )
    assert ref.step(batch) == pytest.approx(float(vitkd_loss), rel=1e-5)  # the loss before the reference's update


def test_teacher_bf16_runs_the_teacher_in_bf16_and_returns_fp32(stage, batch):
    fp32 = stage.teacher_outputs(batch)
    stage.teacher_bf16 = True
    try:
        bf16 = stage.teacher_outputs(batch)
    finally:
        stage.teacher_bf16 = False
    with torch.autocast(
        "cpu", dtype=torch.bfloat16
    ):  # off, the trainer's own autocast still applies (not switched off)
        outer = stage.teacher_outputs(batch)
    assert bf16.keys() == fp32.keys() == {"logits", "relation"}
    for k in fp32:
        assert bf16[k].dtype == torch.float32, k
        torch.testing.assert_close(bf16[k], fp32[k], rtol=BF16_RTOL, atol=5e-2, msg=lambda m: f"{k}: {m}")
        torch.testing.assert_close(outer[k], bf16[k], rtol=0, atol=0, msg=lambda m: f"{k}: {m}")
    assert not torch.equal(bf16["logits"], fp32["logits"]), "bf16 had no effect"
