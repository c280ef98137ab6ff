"""Running configs from the demos: each ``python -m vitkd.fit`` run in its own process, several at a time,
those that need another run's output once it is there.

Each run is forked from a process that has already imported ``vitkd.fit`` (a ``forkserver`` with it preloaded)
where the platform has one: a fresh interpreter would import Lightning, torchmetrics and torchvision again for
every run, seconds that a demo of twenty short runs pays twenty times. The forked run starts from that clean
process, never from an earlier run, so runs share nothing but the imported modules.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from vitkd.efficient.measure import cpu_model
from vitkd.errors import VitkdInputError

# a demo owns its output folder: running it again replaces its earlier runs
DEMO_RUN_FLAGS = ("--overwrite", "true")


def run_logged(args: Sequence[str], log: Path, what: str) -> None:
    """A command in its own process, its output in ``log``; a failure raises one line naming ``what`` and the log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        done = subprocess.run(
            list(args), stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONWARNINGS": "ignore"}
        )
    if done.returncode != 0:
        raise VitkdInputError(f"{what} failed (exit {done.returncode}): see {log}")


_FORKSERVER: Any = None  # the multiprocessing context whose server has vitkd.fit imported, once started


def forked_fit_context() -> Any:
    """The ``forkserver`` context that starts each run with ``vitkd.demos.preload`` (``vitkd.fit``) already
    imported; None where the platform has no forkserver (Windows), and each run is a fresh interpreter."""
    global _FORKSERVER
    if _FORKSERVER is None and "forkserver" in mp.get_all_start_methods():
        _FORKSERVER = mp.get_context("forkserver")
        _FORKSERVER.set_forkserver_preload(["vitkd.demos.preload"])
    return _FORKSERVER


def _forked_fit(argv: list[str], log: str, env: dict[str, str], cwd: str) -> None:
    """A forked run: the caller's environment and folder (the server keeps those it started with), its output
    (every file descriptor 1 and 2 writes to) into ``log``, warnings off as ``run_logged`` has them, then
    ``vitkd.fit``'s main; its return code is the process's exit code."""
    import warnings

    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.environ["PYTHONWARNINGS"] = "ignore"  # for the processes the run starts (loader workers)
    warnings.simplefilter("ignore")
    from vitkd import fit

    try:
        code = fit.main(argv)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    sys.exit(code)


def run_fit_process(argv: Sequence[str], log: Path, what: str) -> None:
    """``python -m vitkd.fit ARGV`` with its output in ``log``, forked from the preloaded server where there is
    one; a failure raises one line naming ``what`` and the log, as ``run_logged`` does."""
    ctx = forked_fit_context()
    if ctx is None:
        return run_logged([sys.executable, "-m", "vitkd.fit", *argv], log, what)
    log.parent.mkdir(parents=True, exist_ok=True)
    proc = ctx.Process(target=_forked_fit, args=(list(argv), str(log), dict(os.environ), os.getcwd()), name=what)
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise VitkdInputError(f"{what} failed (exit {proc.exitcode}): see {log}")


def run_fit(config: str | Path, run_dir: Path, *extra: str, show: Sequence[str] = ()) -> dict:
    """One run in its own process; returns its ``metrics.json``. The log goes to ``run_dir/fit.log``;
    one line with the time and the ``show`` figures is printed."""
    args = [
        "--config",
        str(config),
        "--run_dir",
        str(run_dir),
        *DEMO_RUN_FLAGS,
        "--trainer.enable_progress_bar",
        "false",
        *extra,
    ]
    t0 = time.time()
    run_fit_process(args, run_dir / "fit.log", f"run {run_dir}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    print(
        f"  {run_dir}: {time.time() - t0:.0f}s {json.dumps({k: metrics[k] for k in show if k in metrics})}", flush=True
    )
    return metrics


def run_many(jobs: Sequence[tuple], workers: int, show: Sequence[str] = ()) -> list[dict]:
    """Independent runs ``(config, run_dir, *extra)``, ``workers`` at a time; metrics in job order."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda job: run_fit(*job, show=show), jobs))


def run_graph(
    jobs: Mapping[str, tuple[Sequence[str], Callable[[dict[str, Any]], Any]]], workers: int
) -> dict[str, Any]:
    """Jobs ``name: (after, fn)`` that wait for others: ``fn(inputs)`` starts once every job named in ``after``
    has finished (``inputs``: what each of those returned, by name), ``workers`` at a time; among the jobs
    ready, the one listed first starts first. Returns every job's result by name. When a job fails no new
    job starts, and its error is raised once the running ones end.
    Written by hand: concurrent.futures has no dependencies between tasks, and a workflow engine for one
    machine's dozen runs would be a dependency heavier than this loop."""
    unknown = sorted({d for after, _ in jobs.values() for d in after} - set(jobs))
    if unknown:
        raise ValueError(f"jobs wait for unknown jobs {unknown}")
    ordered: set[str] = set()  # checked before anything runs: a cycle found after an hour of runs helps no one
    while len(ordered) < len(jobs):
        free = {n for n, (after, _) in jobs.items() if n not in ordered and set(after) <= ordered}
        if not free:
            raise ValueError(f"jobs {sorted(set(jobs) - ordered)} wait for each other")
        ordered |= free
    results: dict[str, Any] = {}
    pending, running = dict(jobs), {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        while pending or running:
            for name in [n for n, (after, _) in pending.items() if all(d in results for d in after)]:
                if len(running) == workers:
                    break
                after, fn = pending.pop(name)
                running[pool.submit(fn, {d: results[d] for d in after})] = name
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            done = {running.pop(future): future for future in finished}
            failed = [name for name, future in done.items() if future.exception() is not None]
            if failed:
                # the pool waits for the running jobs before the error is raised: say so now
                still = f", waiting for {sorted(running.values())} to end" if running else ""
                print(f"  {', '.join(failed)} failed; no new job starts{still}", file=sys.stderr, flush=True)
                raise done[failed[0]].exception()
            results.update((name, future.result()) for name, future in done.items())
    return results


# -- the demos' summary tables ------------------------------------------------------------------
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation over seeds (0 for one seed)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def cell(row: Mapping[str, Any], key: str, width: int) -> str:
    """A table cell: ``row[key]`` to 3 places right-aligned in ``width``, or ``-`` where it is absent."""
    return f"{row[key]:>{width}.3f}" if row.get(key) is not None else f"{'-':>{width}}"


def machine() -> str:
    """The CPU's model name with the core count: benchmark figures name the machine."""
    return f"{cpu_model()}, {os.cpu_count()} cores"


def results_file(results: Path, res: Mapping[str, Any]) -> Path:
    """``results/<machine>-<date>.json`` for a results dict holding ``machine`` and ``date``."""
    return Path(results) / f"{re.sub(r'[^a-z0-9]+', '-', res['machine'].lower()).strip('-')}-{res['date']}.json"
