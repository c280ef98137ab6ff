"""The demo's table: every row, selection columns only where a selection was used."""
from vitkd.demo import table


def test_table_shows_selection_bounds():
    rows = [
        {"run": "teacher", "data": "original (labels)", "params": 675562, "test_acc_mean": 0.98333, "test_acc_std": 0.0},
        {"run": "attention_probe", "data": "wild", "params": 77000, "test_acc_mean": 0.9574, "test_acc_std": 0.0212,
         "precision": 0.4611, "precision_max": 2 / 3, "value_auroc": 0.6371},
    ]
    head, rule, teacher, ap = table(rows).splitlines()
    assert head.split()[-4:] == ["precision", "(max)", "V", "AUROC"] and set(rule) == {"-"}
    assert teacher.split()[-3:] == ["-", "-", "-"] and "98.33 ± 0.00" in teacher
    assert ap.split()[-3:] == ["0.461", "0.667", "0.637"] and "95.74 ± 2.12" in ap


def test_a_demo_runs_again_over_its_own_runs(tiny_teacher, tiny_pool, tmp_path):
    """Running a demo twice replaces its earlier runs (a plain rerun into a finished run_dir is refused, and the
    selector refuses scores of another teacher): the second selection scores with the new teacher."""
    import json
    import os

    from vitkd.runs import run_fit

    args = ("--model.init_args.teacher_ckpt", str(tiny_teacher), "--model.init_args.probe_blocks", "[0, 1]", "--model.init_args.num_keep", "10",
            "--data.init_args.wild_urls", tiny_pool, "--wandb.enabled", "false")
    first = run_fit("experiments/digits/select.yaml", tmp_path / "sel", *args)
    os.utime(tiny_teacher)  # as if the demo's teacher had been trained again: the saved scores no longer fit
    second = run_fit("experiments/digits/select.yaml", tmp_path / "sel", *args)
    assert first["shards_scored_this_run"] == second["shards_scored_this_run"] == 3
    fingerprint = json.loads((tmp_path / "sel" / "score_parts" / "fingerprint.json").read_text())
    assert fingerprint["teacher_mtime"] == int(tiny_teacher.stat().st_mtime)


def test_demo_options_are_checked_before_any_run(tmp_path, capsys):
    import pytest

    from vitkd.demo import main

    with pytest.raises(SystemExit) as exit_:
        main(["--jobs", "0", "--out", str(tmp_path / "demo")])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and err.count("\n") == 0 and "--jobs" in err and "positive integer, got 0" in err
    assert not (tmp_path / "demo").exists()
