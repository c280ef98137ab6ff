"""``make demo-generator``: DAFL, transformer-GAN and hybrid students (3 seeds each) from the demo's teacher.

Needs the digits teacher of ``make demo`` (``runs/demo/teacher``) and, for the hybrid, its attention-probe
selection (``runs/demo/select_ap``); trains them if missing. Writes every run under
``runs/demo-generator/`` and the table as ``runs/demo-generator/summary.json`` (rows ``dafl``,
``transformer_gan``, ``hybrid`` with ``test_acc_mean`` and ``test_acc_std``), printed beside the
``kd_original`` and ``attention_probe`` rows of ``runs/demo/summary.json`` when that file exists.
Checkpoints are chosen on held-out generated images (``val/agree``), never on the test split.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
import warnings
from pathlib import Path

from vitkd.errors import OneLineParser, positive_int, demo_main
from vitkd.fit import cli_main
from vitkd.io import write_json
from vitkd.runs import DEMO_RUN_FLAGS

CONFIGS = Path("experiments/generator")
STUDENTS = [
    # run name, config, data the student trains on
    ("dafl", "dafl.yaml", "DAFL generator"),
    ("transformer_gan", "transformer_gan.yaml", "transformer-GAN generator"),
    ("hybrid", "hybrid.yaml", "transformer-GAN + selected wild (1:1)"),
]


def run(args: list[str]) -> dict:
    t0 = time.time()
    metrics = cli_main([*args, *DEMO_RUN_FLAGS, "--trainer.enable_progress_bar", "false"])
    keep = ("test/acc", "best_val/agree")
    print(f"  {args[args.index('--run_dir') + 1]}: {time.time() - t0:.0f}s {json.dumps({k: metrics[k] for k in keep if k in metrics})}", flush=True)
    return metrics


def table(rows: list[dict]) -> str:
    head = f"{'run':<16} {'data used':<40} {'params':>8}  {'test acc (%)':>16}"
    lines = [head, "-" * len(head)]
    for r in rows:
        acc = f"{100 * r['test_acc_mean']:.2f} ± {100 * r['test_acc_std']:.2f}"
        lines.append(f"{r['run']:<16} {r.get('data', ''):<40} {r.get('params', 0):>8}  {acc:>16}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = OneLineParser(prog="python -m vitkd.generators.demo", formatter_class=argparse.ArgumentDefaultsHelpFormatter, description=__doc__)
    p.add_argument("--out", default="runs/demo-generator", help="output folder (its earlier runs are replaced)")
    p.add_argument("--demo", default="runs/demo", help="the skeleton demo's run directory (teacher, selection, summary)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of each student run")
    p.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads (1 measured fastest for these tiny models on a shared 2-core CPU)")
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    out, demo = Path(a.out), Path(a.demo)
    t0 = time.time()
    teacher = demo / "teacher" / "checkpoints" / "best.ckpt"
    if not teacher.is_file():
        print("[setup] training the digits teacher (runs/demo/teacher)", flush=True)
        run(["--config", "experiments/digits/teacher.yaml", "--run_dir", str(demo / "teacher")])
    selected = demo / "select_ap" / "selected" / "meta.json"
    if not selected.is_file():
        print("[setup] attention-probe selection (runs/demo/select_ap)", flush=True)
        run(["--config", "experiments/digits/select.yaml", "--run_dir", str(demo / "select_ap"), "--model.init_args.teacher_ckpt", str(teacher)])
    shards = json.loads(selected.read_text()).get("shards")
    sel_urls = str(demo / "select_ap" / "selected" / (f"shard-{{000000..{shards - 1:06d}}}.tar" if shards else "shard-{000000..000001}.tar"))

    rows = []
    for name, cfg, data in STUDENTS:
        print(f"[{name}]", flush=True)
        accs, params, gparams = [], None, None
        for seed in a.seeds:
            extra = ["--model.init_args.teacher_ckpt", str(teacher)]
            if name == "hybrid":
                extra += ["--data.init_args.train_urls", sel_urls]
            m = run(["--config", str(CONFIGS / cfg), "--run_dir", str(out / name / f"seed{seed}"), "--seed_everything", str(seed), *extra])
            accs.append(m["test/acc"])
            params, gparams = m["params"], m.get("generator_params")
        rows.append({
            "run": name,
            "data": data,
            "params": params,
            "generator_params": gparams,
            "test_acc_mean": statistics.fmean(accs),
            "test_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "test_accs": accs,
            "seeds": len(accs),
        })
    write_json(out / "summary.json", rows)

    shown = list(rows)
    skeleton = demo / "summary.json"
    if skeleton.is_file():
        ref = {r["run"]: r for r in json.loads(skeleton.read_text())}
        shown += [ref[k] for k in ("kd_original", "attention_probe") if k in ref]
    print(table(shown))
    print(f"demo-generator finished in {time.time() - t0:.0f}s; table in {out / 'summary.json'}")


if __name__ == "__main__":
    demo_main(main)  # a failed run ends the demo with one line
