"""Probe blocks in any order: each λa weighs its own block's V_a and each ``va_blk<B>`` column holds block B's
V_a (the probe's rows come in the blocks' forward order, whatever order ``probe_blocks`` gives)."""

import csv

import pytest
import torch

from tests.conftest import fit
from vitkd.errors import VitkdInputError
from vitkd.models import create_model
from vitkd.selection.scoring import attention_value, confidence_value
from vitkd.stages.selector import AttentionProbeSelector


@pytest.fixture(scope="module")
def deep_teacher(tmp_path_factory):
    """An untrained 6-block teacher saved as a plain state dict (its arch passed to the selector)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("deep") / "teacher.pt"
    torch.save(create_model("digits_student_patch4_16").state_dict(), path)
    return str(path)


def _selector(teacher, blocks, weights):
    return AttentionProbeSelector(
        teacher, 5, teacher_arch="digits_student_patch4_16", probe_blocks=blocks, lambda_a=weights
    )


def test_unsorted_probe_blocks_score_as_sorted(deep_teacher):
    x = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        given = _selector(deep_teacher, [3, 1], [0.3, 0.02]).score(x)
        ordered = _selector(deep_teacher, [1, 3], [0.02, 0.3]).score(x)
    for k in ordered:
        torch.testing.assert_close(given[k], ordered[k], rtol=0, atol=0, msg=lambda m: f"{k}: {m}")
    assert list(given) == list(ordered)
    # by hand: block B's V_a under va_blk<B>, V = 0.02·V_a(1) + 0.3·V_a(3) + 0.9·V_n
    sel = _selector(deep_teacher, [3, 1], [0.3, 0.02])
    teacher = sel.teacher
    with torch.inference_mode():
        logits = teacher(x)
        rows = sel.probe.rows()
    va1, va3 = attention_value(rows[1]), attention_value(rows[3])
    assert not torch.allclose(va1, va3), "the two blocks' V_a differ: the test could not tell them apart otherwise"
    torch.testing.assert_close(given["va_blk1"], va1)
    torch.testing.assert_close(given["va_blk3"], va3)
    torch.testing.assert_close(given["value"], 0.02 * va1 + 0.3 * va3 + 0.9 * confidence_value(logits))
    assert sel.scorer.names() == ["va_blk1", "va_blk3", "vn", "value"]


def test_a_block_named_twice_is_refused(deep_teacher):
    with pytest.raises(VitkdInputError, match="name a block twice"):
        _selector(deep_teacher, [1, -5], [0.05, 0.05])  # -5 is block 1 of 6


def _select(teacher, pool, run_dir, blocks, weights):
    fit(
        "--config",
        "experiments/digits/select.yaml",
        "--model.init_args.teacher_ckpt",
        str(teacher),
        "--data.init_args.wild_urls",
        pool,
        "--model.init_args.num_keep",
        "30",
        "--model.init_args.probe_blocks",
        blocks,
        "--model.init_args.lambda_a",
        weights,
        "--trainer.precision",
        "32-true",
        "--run_dir",
        str(run_dir),
    )
    with open(run_dir / "scores.csv") as f:
        return list(csv.reader(f))


def test_unsorted_probe_blocks_write_the_same_scores_through_the_cli(tiny_teacher, tiny_pool, tmp_path):
    given = _select(tiny_teacher, tiny_pool, tmp_path / "given", "[1, 0]", "[0.3, 0.02]")
    ordered = _select(tiny_teacher, tiny_pool, tmp_path / "ordered", "[0, 1]", "[0.02, 0.3]")
    assert given[0] == ordered[0] == ["key", "va_blk0", "va_blk1", "vn", "value", "pred", "selected", "src", "cls"]
    assert given[1:] == ordered[1:]
    # the same scores, so the same fingerprint: either run's parts resume the other
    given_fp, ordered_fp = (
        (tmp_path / run / "score_parts" / "fingerprint.json").read_text() for run in ("given", "ordered")
    )
    assert given_fp == ordered_fp
