"""The demo's table: every row, selection columns only where a selection was used."""

from vitkd.demos.pipeline import table


def test_table_shows_selection_bounds():
    rows = [
        {
            "run": "teacher",
            "data": "original (labels)",
            "params": 675562,
            "test_acc_mean": 0.98333,
            "test_acc_std": 0.0,
        },
        {
            "run": "attention_probe",
            "data": "wild",
            "params": 77000,
            "test_acc_mean": 0.9574,
            "test_acc_std": 0.0212,
            "precision": 0.4611,
            "precision_max": 2 / 3,
            "value_auroc": 0.6371,
        },
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

    from vitkd.demos.runs import run_fit

    args = (
        "--model.init_args.teacher_ckpt",
        str(tiny_teacher),
        "--model.init_args.probe_blocks",
        "[0, 1]",
        "--model.init_args.num_keep",
        "10",
        "--data.init_args.wild_urls",
        tiny_pool,
        "--wandb.enabled",
        "false",
    )
    first = run_fit("experiments/digits/select.yaml", tmp_path / "sel", *args)
    os.utime(tiny_teacher)  # as if the demo's teacher had been trained again: the saved scores no longer fit
    second = run_fit("experiments/digits/select.yaml", tmp_path / "sel", *args)
    assert first["shards_scored_this_run"] == second["shards_scored_this_run"] == 3
    fingerprint = json.loads((tmp_path / "sel" / "score_parts" / "fingerprint.json").read_text())
    assert fingerprint["teacher_mtime"] == int(tiny_teacher.stat().st_mtime)


def test_demo_options_are_checked_before_any_run(tmp_path, capsys):
    import pytest

    from vitkd.demos.pipeline import main

    with pytest.raises(SystemExit) as exit_:
        main(["--jobs", "0", "--out", str(tmp_path / "demo")])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and err.count("\n") == 0 and "--jobs" in err and "positive integer, got 0" in err
    assert not (tmp_path / "demo").exists()


def test_demo_jobs_pass_each_student_its_selection_and_wait_for_what_they_use(tmp_path):
    """The demo's job graph with a stand-in for each run: a student on a selection trains on that selection's
    shards and starts after it; scratch needs no teacher; the table's mean ± sample std comes from the seeds."""
    import statistics

    from vitkd.demos.pipeline import SELECTIONS, STUDENTS, demo_jobs, summary_rows
    from vitkd.demos.runs import run_graph

    calls, ended = [], set()

    def fake_fit(config, run_dir, *args, show=()):
        calls.append((run_dir.relative_to(tmp_path).as_posix(), config.name, list(args), set(ended)))
        name = run_dir.relative_to(tmp_path).as_posix()
        ended.add(name)
        if name.startswith("select"):
            return {
                "selected_urls": f"{name}/selected/shard-000000.tar",
                "num_kept": 5,
                "precision": 0.5,
                "precision_max": 0.6,
            }
        seed = int(name.rsplit("seed", 1)[1]) if "seed" in name else 0
        return {"test/acc": 0.9 + 0.01 * seed + 0.001 * len(name), "params": 7}

    def fake_pool(out):
        ended.add("pool")

    jobs = demo_jobs(tmp_path, [0, 1, 2], fit=fake_fit, pool=fake_pool)
    done = run_graph(jobs, workers=1)
    runs = {name: (cfg, args, before) for name, cfg, args, before in calls}
    # one at a time, the first listed of the ready jobs: teacher, pool, selections, long students, short ones
    order = [c[0] for c in calls]
    assert order[:4] == ["teacher", "select_ap", "select_dfnd", "select_random"] and order[-3:] == [
        "scratch/seed0",
        "scratch/seed1",
        "scratch/seed2",
    ]
    teacher_arg = ["--model.init_args.teacher_ckpt", str(tmp_path / "teacher" / "checkpoints" / "best.ckpt")]
    for name, cfg, _, sel in STUDENTS:
        for seed in (0, 1, 2):
            got_cfg, args, before = runs[f"{name}/seed{seed}"]
            assert got_cfg == cfg and args[:2] == ["--seed_everything", str(seed)]
            assert (args[2:4] == teacher_arg) == (name != "scratch")
            waits = jobs[f"{name}/seed{seed}"][0]
            want = () if name == "scratch" else ("teacher",) if sel is None else ("teacher", sel)
            # a later seed of a wild-data student reads the first seed's teacher outputs, so it waits for it
            want += (f"{name}/seed0",) if sel is not None and seed else ()
            assert waits == want and set(waits) <= before
            if sel is not None:
                assert (
                    args[-2:] == ["--data.init_args.train_urls", f"{sel}/selected/shard-000000.tar"] and sel in before
                )
                file = str(tmp_path / name / "teacher_outputs.pt")
                assert args[4:6] == ["--model.init_args.teacher_cache_file", file]
            else:
                assert "--data.init_args.train_urls" not in args
    for sel, cfg in SELECTIONS.items():
        assert (
            runs[sel][0] == cfg
            and runs[sel][1] == teacher_arg
            and jobs[sel][0] == ("teacher", "pool")
            and {"teacher", "pool"} <= runs[sel][2]
        )
    # as the demo runs it, several at a time: every job still finds the results it is handed
    calls.clear(), ended.clear()
    assert run_graph(demo_jobs(tmp_path, [0, 1, 2], fit=fake_fit, pool=fake_pool), workers=8).keys() == done.keys()
    assert all(set(jobs[name][0]) <= before for name, _, _, before in calls)

    rows = {r["run"]: r for r in summary_rows(done, [0, 1, 2])}
    accs = [done[f"dfnd/seed{s}"]["test/acc"] for s in (0, 1, 2)]
    assert rows["dfnd"]["test_acc_mean"] == statistics.fmean(accs) and rows["dfnd"]["test_acc_std"] == statistics.stdev(
        accs
    )
    assert rows["dfnd"]["precision"] == 0.5 and rows["dfnd"]["num_kept"] == 5 and "precision" not in rows["scratch"]
    assert list(rows) == ["teacher", "scratch", "kd_original", "dfnd", "random_wild", "attention_probe"]


def test_the_demo_writes_the_pool_its_selection_config_names(tmp_path, monkeypatch):
    import vitkd.demos.pipeline
    from data_modules.wild_pool import POOL_VERSION

    configs = tmp_path / "configs"
    configs.mkdir()
    data_dir = tmp_path / "data"
    (configs / "select.yaml").write_text(
        "data:\n  class_path: data_modules.DigitsDataModule\n  init_args:\n"
        f"    data_dir: {data_dir}\n    wild_pool_size: 7\n    wild_pool_seed: 3\n"
    )
    monkeypatch.setattr(vitkd.demos.pipeline, "CONFIGS", configs)
    vitkd.demos.pipeline.write_pool(tmp_path / "out")
    pool = f"digits-wild-v{POOL_VERSION}-7-s3"
    assert (data_dir / pool / "meta.json").is_file() and pool in (tmp_path / "out" / "pool.log").read_text()
