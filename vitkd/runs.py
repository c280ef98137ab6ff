"""Running configs from the demos: each ``python -m vitkd.fit`` run in its own process, several at a time."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

from vitkd.errors import VitkdInputError


# a demo owns its output folder: running it again replaces its earlier runs
DEMO_RUN_FLAGS = ("--overwrite", "true")


def run_fit(config: str | Path, run_dir: Path, *extra: str, show: Sequence[str] = ()) -> dict:
    """One run in its own process; returns its ``metrics.json``. The log goes to ``run_dir/fit.log``;
    one line with the time and the ``show`` figures is printed."""
    args = [sys.executable, "-m", "vitkd.fit", "--config", str(config), "--run_dir", str(run_dir), *DEMO_RUN_FLAGS, "--trainer.enable_progress_bar", "false", *extra]
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(run_dir / "fit.log", "w") as log:
        done = subprocess.run(args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if done.returncode != 0:
        raise VitkdInputError(f"run {run_dir} failed (exit {done.returncode}): see {run_dir / 'fit.log'}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    print(f"  {run_dir}: {time.time() - t0:.0f}s {json.dumps({k: metrics[k] for k in show if k in metrics})}", flush=True)
    return metrics


def run_many(jobs: Sequence[tuple], workers: int, show: Sequence[str] = ()) -> list[dict]:
    """Independent runs ``(config, run_dir, *extra)``, ``workers`` at a time; metrics in job order."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda job: run_fit(*job, show=show), jobs))


def demo_main(main: Callable[[], None]) -> None:
    """A demo's entry point: a failed run ends the demo with one line that names its log."""
    try:
        main()
    except VitkdInputError as err:
        sys.exit(f"vitkd: error: {err}")
