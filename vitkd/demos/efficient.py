"""``make demo-efficient``: accuracy vs GFLOPs vs images/s of the efficient-ViT toolbox on the digits teacher.

Rows (``runs/demo-efficient/summary.json``):
- ``teacher``: the trained digits teacher, unreduced;
- ``gtp_*`` and ``tome_*``: GTP and ToMe on the teacher at several reduction rates, no fine-tuning;
- ``idlevit_*``: IdleViT at several keep ratios, after a short self-distillation fine-tune (and, for reference,
  the same keep ratio with no fine-tuning);
- ``plain_*``, ``shuffle_*``, ``projector_*``: students distilled from the teacher on the original digits
  (CE to labels + KD), plain vs channel-shuffle of equal FLOPs, and plain with vs without the projector ensemble.
Every figure is measured here: test accuracy on the digits test split, FlopCounter GFLOPs per image, and
images/s on this machine (batch size, iterations and threads stated in each row).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from data_modules import DigitsDataModule
from vitkd.demos.runs import DEMO_RUN_FLAGS
from vitkd.efficient.gtp import GTPViT
from vitkd.efficient.idlevit import IdleViT
from vitkd.efficient.measure import measure
from vitkd.efficient.tome import ToMeViT
from vitkd.errors import OneLineParser, demo_main, positive_int
from vitkd.fit import cli_main
from vitkd.io import atomic_path, write_json
from vitkd.plotting import pyplot
from vitkd.teacher import load_teacher

TEACHER = Path("runs/demo/teacher/checkpoints/best.ckpt")
CONFIGS = Path("experiments/efficient")
INPUT = (1, 16, 16)
# the cost figures of a row: what measure() and a fine-tuning run both report
COST_KEYS = (
    "params",
    "gflops",
    "macs_linear",
    "images_per_s",
    "throughput_batch_size",
    "throughput_iters",
    "throughput_threads",
    "throughput_device",
)
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def evaluate(model: torch.nn.Module, loader) -> float:
    model.eval()
    right = total = 0
    with torch.inference_mode():
        for x, y in loader:
            right += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return right / total


def cost(model: torch.nn.Module, bs: int) -> dict:
    m = measure(model, INPUT, batch_size=bs, warmup=3, iters=15)
    return {k: m[k] for k in COST_KEYS}


def fit_run(config: Path, run_dir: Path, *overrides: str) -> dict:
    return cli_main(["--config", str(config), *QUIET, *overrides, "--run_dir", str(run_dir), *DEMO_RUN_FLAGS])


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()

    colours = {
        "teacher": "k",
        "gtp": "tab:blue",
        "tome": "tab:orange",
        "idlevit": "tab:green",
        "plain": "tab:gray",
        "shuffle": "tab:red",
        "projector": "tab:purple",
    }
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for method, c in colours.items():
        pts = [r for r in rows if r["run"].split("_")[0] == method]
        if pts:
            ax.scatter([r["gflops"] * 1e3 for r in pts], [100 * r["test_acc"] for r in pts], c=c, label=method, s=30)
            for r in pts:
                ax.annotate(
                    r["run"],
                    (r["gflops"] * 1e3, 100 * r["test_acc"]),
                    fontsize=6,
                    xytext=(3, 2),
                    textcoords="offset points",
                )
    ax.set_xlabel("MFLOPs per image (FlopCounterMode, attention matmuls included)")
    ax.set_ylabel("digits test accuracy (%)")
    ax.set_title("Efficient-ViT toolbox on the digits teacher (measured)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=130, format="png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = OneLineParser(
        prog="python -m vitkd.demos.efficient",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description=__doc__.splitlines()[0],
    )
    ap.add_argument("--out", default="runs/demo-efficient", help="output folder (its earlier runs are replaced)")
    ap.add_argument("--student_epochs", type=positive_int, default=40)
    ap.add_argument("--student_seeds", type=positive_int, default=2)
    ap.add_argument("--idle_epochs", type=positive_int, default=3)
    ap.add_argument("--throughput_batch", type=positive_int, default=256)
    args = ap.parse_args(argv)
    out = Path(args.out)
    t_start = time.time()
    torch.manual_seed(0)
    if not TEACHER.is_file():
        print(f"[demo-efficient] no teacher at {TEACHER}: training it (about 3 minutes)", flush=True)
        cli_main(
            [
                "--config",
                "experiments/digits/teacher.yaml",
                *QUIET,
                "--run_dir",
                str(TEACHER.parent.parent),
                *DEMO_RUN_FLAGS,
            ]
        )
    teacher, _ = load_teacher(TEACHER)
    loader = DigitsDataModule(img_size=16).test_dataloader()
    bs = args.throughput_batch
    rows: list[dict] = []

    def add(run: str, model: torch.nn.Module, **extra) -> None:
        rows.append({"run": run, "test_acc": evaluate(model, loader), **cost(model, bs), "fine_tuned": False, **extra})
        r = rows[-1]
        print(
            f"[demo-efficient] {run:28s} acc {r['test_acc']:.4f}  MFLOPs {r['gflops'] * 1e3:6.2f}  "
            f"img/s {r['images_per_s']:8.0f}",
            flush=True,
        )

    add("teacher", teacher)
    # token reduction on the trained teacher, no fine-tuning (16 patches, 6 blocks)
    for p in (1, 2):
        add(f"gtp_mixed_p{p}", GTPViT(teacher, num_prop=p, graph="mixed"), tokens_removed_per_block=p)
    add("gtp_spatial_p2", GTPViT(teacher, num_prop=2, graph="spatial"), tokens_removed_per_block=2)
    add("gtp_semantic_p2", GTPViT(teacher, num_prop=2, graph="semantic"), tokens_removed_per_block=2)
    add(
        "gtp_prune_p2",
        GTPViT(teacher, num_prop=2, alpha=0.0, token_scale=False),
        tokens_removed_per_block=2,
        note="alpha 0, no token scale: GTP's selection with plain pruning",
    )
    for r in (1, 2):
        add(f"tome_r{r}", ToMeViT(teacher, r=r), tokens_removed_per_block=r)
    # IdleViT: short fine-tune per keep ratio, plus the same ratio without fine-tuning
    for keep in (0.75, 0.5, 0.25):
        add(f"idlevit_k{keep:.2f}_no_finetune", IdleViT(teacher, keep_ratio=keep), keep_ratio=keep)
        m = fit_run(
            CONFIGS / "idlevit.yaml",
            out / f"idlevit_k{keep:.2f}",
            "--model.init_args.keep_ratio",
            str(keep),
            "--trainer.max_epochs",
            str(args.idle_epochs),
        )
        rows.append(
            {
                "run": f"idlevit_k{keep:.2f}",
                "test_acc": m["test/acc"],
                **{k: m[k] for k in COST_KEYS},
                "fine_tuned": True,
                "keep_ratio": keep,
                "epochs": m["epochs"],
                "run_dir": m["run_dir"],
            }
        )
        print(
            f"[demo-efficient] {rows[-1]['run']:28s} acc {m['test/acc']:.4f}  MFLOPs {m['gflops'] * 1e3:6.2f}  "
            f"img/s {m['images_per_s']:8.0f}",
            flush=True,
        )
    # students distilled the same way: plain vs channel-shuffle (equal FLOPs), plain vs + projector ensemble
    for name in ("plain", "shuffle", "projector"):
        runs = []
        for seed in range(args.student_seeds):
            runs.append(
                fit_run(
                    CONFIGS / f"{name}.yaml",
                    out / name / f"seed{seed}",
                    "--seed_everything",
                    str(seed),
                    "--trainer.max_epochs",
                    str(args.student_epochs),
                    "--model.init_args.measure_batch_size",
                    str(bs),
                )
            )
        accs = [m["test/acc"] for m in runs]
        first = runs[0]
        rows.append(
            {
                "run": f"{name}_student",
                "test_acc": statistics.mean(accs),
                "test_accs": accs,
                "seeds": len(accs),
                "test_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                **{
                    k: first[k]
                    for k in (
                        "params",
                        "gflops",
                        "macs_linear",
                        "throughput_batch_size",
                        "throughput_iters",
                        "throughput_threads",
                        "throughput_device",
                    )
                },
                "images_per_s": statistics.mean(m["images_per_s"] for m in runs),
                "fine_tuned": True,
                "epochs": first["epochs"],
                "config": str(CONFIGS / f"{name}.yaml"),
            }
        )
        print(
            f"[demo-efficient] {rows[-1]['run']:28s} acc {rows[-1]['test_acc']:.4f}  "
            f"MFLOPs {first['gflops'] * 1e3:6.2f}  img/s {rows[-1]['images_per_s']:8.0f}  ({accs})",
            flush=True,
        )
    t = next(r for r in rows if r["run"] == "teacher")
    for r in rows:
        r["speedup_vs_teacher"] = r["images_per_s"] / t["images_per_s"]
        r["gflops_vs_teacher"] = r["gflops"] / t["gflops"]
    write_json(out / "summary.json", rows)
    plot(rows, out / "accuracy_vs_gflops.png")
    print(
        f"[demo-efficient] wrote {out / 'summary.json'} and {out / 'accuracy_vs_gflops.png'} "
        f"in {time.time() - t_start:.0f} s",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    demo_main(main)  # a failed run ends the demo with one line
