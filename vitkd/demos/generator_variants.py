"""``make generator-variants``: the transformer-generator designs tried, each at the demo's budget.

Every variant is a config of ``experiments/generator/`` (``transformer_gan.yaml`` unless it names another)
with a few arguments changed, trained from
the digits teacher with ``--seeds`` seeds. Variants are compared on ``labelled_val/acc``: the student's
accuracy on the digits' labelled validation split (359 images, no test image among them); the test
accuracy is reported beside it and chooses nothing. Writes ``runs/generator-variants/summary.json`` and
``benchmarks/results/generator-variants/<machine>-<date>.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vitkd.demos.runs import machine, mean_std, results_file, run_fit
from vitkd.errors import OneLineParser, demo_main, positive_int
from vitkd.io import write_json

CONFIG = "experiments/generator/transformer_gan.yaml"
OWN_CONFIG = {"dafl": "experiments/generator/dafl.yaml"}  # variants not built on CONFIG
# the loss settings transformer_gan.yaml had before the redesign (each variant states all it changes)
BEFORE = [
    "--model.init_args.generator_weights.act",
    "0.0",
    "--model.init_args.generator_weights.attention",
    "1.0",
    "--model.init_args.student_weights.patch",
    "0.8",
]
LAM1 = ["--model.init_args.generator_weights.attention", "1.0"]
PATCH = "{patch_size: 4, embed_dim: 64, depth: 2, num_heads: 4, head: patch}"
CONV = "{patch_size: 4, embed_dim: 64, depth: 2, num_heads: 4, head: conv}"
# DAFL's losses and width (dafl.yaml) with two attention blocks between its linear map and its conv head
BLOCKS = [
    "--model.init_args.generator_kwargs",
    "{patch_size: 4, embed_dim: 64, depth: 2, num_heads: 4, head: conv, conv_width: 64}",
    "--model.init_args.generator_weights.act",
    "0.1",
    "--model.init_args.student_weights.patch",
    "0",
]
BLOCKS_LS = [
    "--model.init_args.generator_kwargs",
    "{patch_size: 4, embed_dim: 64, depth: 2, num_heads: 4, head: conv, conv_width: 64, init_values: 1.0e-5}",
    *BLOCKS[2:],
]
FAST = [
    "--model.init_args.synthesizer",
    "fast",
    "--model.init_args.fast_inner_steps",
    "2",
    "--model.init_args.fast_lr_z",
    "0.015",
    "--model.init_args.fast_synth_every",
    "5",
    "--model.init_args.fast_bank_batches",
    "20",
    "--model.init_args.lr_g",
    "5.0e-3",
]
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "dafl": ("the DAFL row itself (dafl.yaml), for comparison", []),
    "patch_head_attn": (
        "today's design: per-token pixel head + seam conv, λ = 1 (peak + consistency)",
        [*BEFORE, "--model.init_args.generator_kwargs", PATCH],
    ),
    "conv_head": (
        "attention blocks, then DAFL's conv upsampling head; λ = 0",
        [*BEFORE, "--model.init_args.generator_kwargs", CONV, "--model.init_args.generator_weights.attention", "0"],
    ),
    "conv_head_attn": ("conv head, λ = 1 (peak + consistency)", [*BEFORE, "--model.init_args.generator_kwargs", CONV]),
    "conv_head_attn_tv": (
        "conv head, λ = 1, total-variation prior 0.05",
        [*BEFORE, "--model.init_args.generator_kwargs", CONV, "--model.init_args.generator_weights.tv", "0.05"],
    ),
    "conv_head_attn_disc": (
        "conv head, λ = 1, adversarial discrepancy term 0.5",
        [*BEFORE, "--model.init_args.generator_kwargs", CONV, "--model.init_args.generator_weights.disc", "0.5"],
    ),
    "dafl_blocks": (
        "DAFL's losses (act 0.1, no L_patch) with attention blocks before its conv head; λ = 0",
        [*BLOCKS, "--model.init_args.generator_weights.attention", "0"],
    ),
    "dafl_blocks_attn": ("as dafl_blocks, λ = 1 (peak + consistency)", [*BLOCKS, *LAM1]),
    "dafl_blocks_ls": (
        "as dafl_blocks, blocks with LayerScale 1e-5 (they start near the identity); λ = 0",
        [*BLOCKS_LS, "--model.init_args.generator_weights.attention", "0"],
    ),
    "dafl_blocks_ls_attn": ("as dafl_blocks_ls, λ = 1", [*BLOCKS_LS, *LAM1]),
    "dafl_blocks_ls_attn01": (
        "as dafl_blocks_ls, λ = 0.1",
        [*BLOCKS_LS, "--model.init_args.generator_weights.attention", "0.1"],
    ),
    "dafl_blocks_ls_attn_fast": (
        "as dafl_blocks_ls_attn, with the fast synthesizer of fast.yaml",
        [*BLOCKS_LS, *LAM1, *FAST],
    ),
    "conv_head_attn_tv_fast": (
        "as conv_head_attn_tv, with the fast synthesizer of fast.yaml",
        [*BEFORE, "--model.init_args.generator_kwargs", CONV, "--model.init_args.generator_weights.tv", "0.05", *FAST],
    ),
}


def main(argv: list[str] | None = None) -> dict:

    p = OneLineParser(
        prog="python -m vitkd.demos.generator_variants",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--teacher", default="runs/demo/teacher/checkpoints/best.ckpt")
    p.add_argument("--root", default="runs/generator-variants")
    p.add_argument("--workers", type=positive_int, default=1)
    p.add_argument("--results", default="benchmarks/results/generator-variants")
    a = p.parse_args(argv)
    root = Path(a.root)
    jobs = [(v, s) for v in a.variants for s in a.seeds]

    def one(job):
        v, s = job
        run_dir = root / v / f"seed{s}"
        if (run_dir / "metrics.json").is_file():
            return json.loads((run_dir / "metrics.json").read_text()) | {"wall_s": None}
        t0 = time.time()
        m = run_fit(
            OWN_CONFIG.get(v, CONFIG),
            run_dir,
            "--model.init_args.teacher_ckpt",
            a.teacher,
            "--model.init_args.labelled_val",
            "true",
            "--torch_threads",
            "1",
            "--seed_everything",
            str(s),
            *VARIANTS[v][1],
            show=("test/acc", "labelled_val/acc", "best_val/agree"),
        )
        return m | {"wall_s": time.time() - t0}

    with ThreadPoolExecutor(max_workers=a.workers) as pool:
        got = dict(zip(jobs, pool.map(one, jobs)))
    rows = []
    for v in a.variants:
        ms = [got[(v, s)] for s in a.seeds]
        rows.append(
            {
                "variant": v,
                "what": VARIANTS[v][0],
                "config": OWN_CONFIG.get(v, CONFIG),
                "args": VARIANTS[v][1],
                "seeds": len(ms),
                "labelled_val_acc_mean": mean_std([m["labelled_val/acc"] for m in ms])[0],
                "test_acc_mean": mean_std([m["test/acc"] for m in ms])[0],
                "test_acc_std": mean_std([m["test/acc"] for m in ms])[1],
                "best_val_agree_mean": mean_std([m["best_val/agree"] for m in ms])[0],
                "generator_params": ms[0].get("generator_params"),
            }
        )
    chosen = max(
        [r for r in rows if r["variant"] != "dafl"] or rows, key=lambda r: r["labelled_val_acc_mean"]
    )  # the transformer design
    res = {
        "machine": machine(),
        "date": dt.date.today().isoformat(),
        "config": CONFIG,
        "rows": rows,
        "chosen": chosen["variant"],
        "chosen_on": "labelled_val/acc (digits validation split, 359 images; never test)",
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    write_json(root / "summary.json", res)
    write_json(results_file(a.results, res), res)
    print("| variant | what | labelled val acc (%) | test acc (%) | val/agree |\n|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['variant']}{' (chosen)' if r is chosen else ''} | {r['what']} "
            f"| {100 * r['labelled_val_acc_mean']:.2f} "
            f"| {100 * r['test_acc_mean']:.2f} ± {100 * r['test_acc_std']:.2f} | {r['best_val_agree_mean']:.3f} |"
        )
    return res


if __name__ == "__main__":
    demo_main(main)
