"""The budget sweep and the variant study with stand-in runs: what they read, group and choose."""

import json

import pytest

from vitkd.generators import sweep, variants


def write_run(run_dir, acc, agree, agree_eval, steps):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.json").write_text(
        json.dumps(
            {"test/acc": acc, "best_val/agree": max(agree), "generator_steps": steps, "labelled_val/acc": acc - 0.01}
        )
    )
    lines = ["epoch,step,train/loss_g,val/agree,val/agree_eval"]
    for e, (a, b) in enumerate(zip(agree, agree_eval)):
        lines += [f"{e},{e * 10 + 5},1.0,,", f"{e},{e * 10 + 9},,{a},{b}"]
    (run_dir / "metrics.csv").write_text("\n".join(lines) + "\n")


def test_sweep_reads_points_groups_seeds_and_writes_results(tmp_path, monkeypatch):
    root = tmp_path / "sweep"
    for seed, acc in ((0, 0.2), (1, 0.4)):
        write_run(root / "vit_2ep" / f"seed{seed}", acc, [0.3, 0.5], [0.2, 0.45], 240)
        (root / "vit_2ep" / f"seed{seed}.wall.json").write_text(json.dumps({"wall_s": 480.0}))
    write_run(root / "cnn_2ep" / "seed0", 0.6, [0.4, 0.7], [0.4, 0.6], 240)
    monkeypatch.setattr(sweep, "ensure_teacher", lambda name, threads: {"test_acc": 0.98, "arch": name})
    monkeypatch.setattr(sweep, "run_fit", lambda *a, **k: pytest.fail("a point with metrics.json is read, not rerun"))
    res = sweep.main(
        ["--points", "vit:2:0", "vit:2:1", "cnn:2:0", "--root", str(root), "--results", str(tmp_path / "res")]
    )
    rows = {r["teacher"]: r for r in res["rows"]}
    assert (
        rows["vit"]["seeds"] == 2
        and rows["vit"]["test_acc_mean"] == pytest.approx(0.3)
        and rows["vit"]["test_acc_std"] == pytest.approx(0.1414, abs=1e-4)
    )
    assert rows["vit"]["final_val_agree_train_mode"] == pytest.approx(0.5) and rows["vit"][
        "final_val_agree_eval_mode"
    ] == pytest.approx(0.45)
    assert rows["vit"]["s_per_generator_step"] == pytest.approx(2.0)
    assert res["points"][0]["val_agree_eval_mode"] == [0.2, 0.45]
    assert res["estimate_24000_steps_h"]["vit"] == pytest.approx(24000 * 2.0 / 3600)
    assert len(list((tmp_path / "res").glob("*.json"))) == 1 and (root / "summary.json").is_file()


def test_sweep_point_syntax_is_checked(capsys):
    with pytest.raises(SystemExit):
        sweep.main(["--points", "vit:twenty:0"])
    assert "TEACHER:EPOCHS:SEED" in capsys.readouterr().err


def test_variants_choose_on_labelled_validation_not_test(tmp_path, monkeypatch):
    root = tmp_path / "var"
    # conv_head is best on test, conv_head_attn on the labelled validation split: validation decides
    write_run(root / "conv_head" / "seed0", 0.50, [0.5], [0.5], 240)
    (root / "conv_head" / "seed0" / "metrics.json").write_text(
        json.dumps({"test/acc": 0.9, "labelled_val/acc": 0.3, "best_val/agree": 0.5})
    )
    write_run(root / "conv_head_attn" / "seed0", 0.50, [0.5], [0.5], 240)
    (root / "conv_head_attn" / "seed0" / "metrics.json").write_text(
        json.dumps({"test/acc": 0.4, "labelled_val/acc": 0.6, "best_val/agree": 0.5})
    )
    monkeypatch.setattr(variants, "run_fit", lambda *a, **k: pytest.fail("finished variants are read, not rerun"))
    res = variants.main(
        ["--variants", "conv_head", "conv_head_attn", "--root", str(root), "--results", str(tmp_path / "res")]
    )
    assert res["chosen"] == "conv_head_attn"
