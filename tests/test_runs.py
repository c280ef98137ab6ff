"""How the demos run their jobs (vitkd.demos.runs.run_graph) and write an embedded data set once
(vitkd.io.build_once)."""

import threading
import time

import pytest

from vitkd.demos.runs import run_graph
from vitkd.io import build_once


def _recording_jobs(spec: dict[str, tuple[str, ...]], log: list, pause: float = 0.0) -> dict:
    def job(name):
        def fn(results):
            log.append(("start", name, sorted(results)))
            time.sleep(pause)
            log.append(("end", name))
            return f"out-{name}"

        return fn

    return {name: (after, job(name)) for name, after in spec.items()}


def test_a_job_starts_after_what_it_waits_for_and_the_first_listed_ready_job_first():
    log: list = []
    # one worker: the order is fixed. c is ready at once but listed after b, which waits for a
    jobs = _recording_jobs({"a": (), "b": ("a",), "c": (), "d": ("b", "c")}, log)
    results = run_graph(jobs, workers=1)
    assert results == {n: f"out-{n}" for n in "abcd"}
    starts = [(name, seen) for kind, name, *seen in log if kind == "start"]
    # each job is handed the results of the jobs it waits for, and only those
    assert starts == [("a", [[]]), ("b", [["a"]]), ("c", [[]]), ("d", [["b", "c"]])]


def test_a_job_waiting_for_two_starts_after_the_slower_one_ends():
    log: list = []
    spec = {"slow": (), "fast": (), "both": ("slow", "fast")}
    jobs = {name: (after, fn) for name, (after, fn) in _recording_jobs(spec, log).items()}
    slow_fn = jobs["slow"][1]

    def slower(results):
        time.sleep(0.3)
        return slow_fn(results)

    jobs["slow"] = ((), slower)
    run_graph(jobs, workers=2)
    order = [(kind, name) for kind, name, *_ in log]
    assert order.index(("start", "both")) > order.index(("end", "slow")) > order.index(("end", "fast"))


def test_two_workers_run_two_ready_jobs_at_once_and_a_waiting_job_after_its_inputs():
    log: list = []
    jobs = _recording_jobs({"slow": (), "other": (), "after_slow": ("slow",)}, log, pause=0.2)
    run_graph(jobs, workers=2)
    order = [(kind, name) for kind, name, *_ in log]
    assert set(order[:2]) == {("start", "slow"), ("start", "other")}  # both at once
    assert order.index(("start", "after_slow")) > order.index(("end", "slow"))


def test_a_failed_job_is_raised_after_the_running_ones_end_and_nothing_new_starts(capsys):
    started, ended = [], []

    def boom(results):
        raise RuntimeError("run x failed")

    def slow(results):
        time.sleep(0.3)
        ended.append("slow")

    jobs = {
        "x": ((), boom),
        "slow": ((), slow),
        "y": (("x",), lambda r: started.append("y")),
        "z": ((), lambda r: started.append("z")),
    }
    with pytest.raises(RuntimeError, match="run x failed"):
        run_graph(jobs, workers=2)
    assert started == [] and ended == ["slow"]
    assert "x failed; no new job starts, waiting for ['slow'] to end" in capsys.readouterr().err


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"a": ("nope",)}, "unknown jobs \\['nope'\\]"),
        ({"a": (), "b": ("c",), "c": ("b",)}, "jobs \\['b', 'c'\\] wait for each other"),
    ],
)
def test_jobs_that_can_never_start_are_named_before_any_job_runs(spec, message):
    ran = []
    with pytest.raises(ValueError, match=message):
        run_graph({n: (after, lambda r, n=n: ran.append(n)) for n, after in spec.items()}, workers=2)
    assert ran == []


def test_build_once_builds_once_when_callers_start_together(tmp_path):
    """Two callers at once (the demo's parallel selections both asking for the pool): one builds, the other
    waits for it and then finds it; nothing is built again once it exists."""
    target, builds = tmp_path / "pool", []

    def build():
        builds.append(1)
        time.sleep(0.3)  # long enough for the second caller to arrive while the first is building
        tmp = tmp_path / ".pool.tmp"
        tmp.mkdir()
        (tmp / "meta.json").write_text("{}")
        tmp.rename(target)

    callers = [threading.Thread(target=build_once, args=(target, build)) for _ in range(2)]
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    assert builds == [1] and (target / "meta.json").is_file()
    build_once(target, build)
    assert builds == [1]


def test_build_once_builds_again_what_was_left_without_its_last_file(tmp_path):
    target, builds = tmp_path / "pool", []
    target.mkdir()  # e.g. an interrupted copy: the folder is there, the file written last is not

    def build():
        builds.append(1)
        (target / "meta.json").write_text("{}")

    build_once(target, build, done=target / "meta.json")
    build_once(target, build, done=target / "meta.json")
    assert builds == [1]


def test_a_forked_run_sees_the_callers_environment_and_folder(tiny_teacher, tiny_pool, tmp_path, monkeypatch):
    """Demo runs are forked from a server that imported vitkd.fit once: each still runs in the environment and
    the folder of the moment it is asked for (not the server's), its output in its log; a failure is one line
    naming the log."""
    from pathlib import Path

    from vitkd.demos import runs
    from vitkd.errors import VitkdInputError

    if runs.forked_fit_context() is None:
        pytest.skip("no forkserver on this platform: runs are fresh interpreters (run_logged)")
    runs.run_fit_process(["--print_config"], tmp_path / "first.log", "print")  # the server runs from here on
    assert "trainer:" in (tmp_path / "first.log").read_text()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    config = Path(__file__).resolve().parents[1] / "experiments" / "digits" / "select.yaml"
    args = ("--model.init_args.teacher_ckpt", str(tiny_teacher), "--model.init_args.probe_blocks", "[0, 1]")
    args += ("--model.init_args.num_keep", "10", "--data.init_args.wild_urls", tiny_pool, "--wandb.enabled", "false")
    metrics = runs.run_fit(config, Path("sel"), *args)
    assert metrics["num_kept"] == 10 and (tmp_path / "sel" / "fit.log").is_file()  # a relative run_dir: here
    assert (tmp_path / "cache" / "vitkd" / "precision.json").is_file()  # precision auto's cache: this XDG_CACHE_HOME
    with pytest.raises(VitkdInputError) as err:
        runs.run_fit_process(["--no_such_option", "1"], tmp_path / "bad.log", "run bad")
    assert str(err.value) == f"run bad failed (exit 2): see {tmp_path / 'bad.log'}"
    assert "vitkd: error:" in (tmp_path / "bad.log").read_text()
