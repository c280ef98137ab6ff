"""The table ``make bench`` prints from a results dict: one row per figure, then the headline and the peaks."""

from __future__ import annotations

from typing import Any


def _selector_rows(name: str, s: dict) -> list[tuple[str, ...]]:
    config = s["vitkd_best_config"].split(", inference")[0] + " (equal batch)"
    rows = [
        (
            f"selector {name}",
            f"{s['vitkd_best']['images_per_s']:.0f}",
            f"{s['reference']['images_per_s']:.0f}",
            f"{s['speedup_ratio']:.2f}x",
            config,
        )
    ]
    for n in s["batches"]:
        variants = [k for k in ("fp32", "bf16", "bf16_true", "bf16_true_compiled") if f"vitkd_{k}_b{n}" in s]
        rates = " / ".join(f"{s[f'vitkd_{k}_b{n}']['images_per_s']:.0f}" for k in variants)
        ref = f"{s[f'reference_b{n}']['images_per_s']:.0f}"
        rows.append((f"  batch {n}: " + " / ".join(variants), rates, ref, "", ""))
    return rows


def _distill_rows(name: str, d: dict, f: dict) -> list[tuple[str, ...]]:
    config = d["vitkd_best_config"].split(",")[0] + f", batch {d['batch']}"
    config += ", cache amortised" if "cache" in d["vitkd_best_config"] else ""
    rows = [
        (
            f"distill {name}",
            f"{d['vitkd_best']['images_per_s']:.0f}",
            f"{d['reference']['images_per_s']:.0f}",
            f"{d['speedup_ratio']:.2f}x",
            config,
        )
    ]
    rows.append(
        (
            "  teacher every step",
            f"{d['vitkd_teacher_every_step_best']['images_per_s']:.0f}",
            "",
            f"{d['speedup_ratio_teacher_every_step']:.2f}x",
            d["teacher_every_step_best_config"].split(",")[0],
        )
    )
    every = [k for k in ("vitkd_fp32", "vitkd_bf16", "vitkd_fp32_teacher_bf16", "vitkd_bf16_compiled") if k in d]
    rows.append(
        ("  " + " / ".join(k[6:] for k in every), " / ".join(f"{d[k]['images_per_s']:.0f}" for k in every), "", "", "")
    )
    fp32, bf16 = d["vitkd_fp32_cached_teacher"]["images_per_s"], d["vitkd_bf16_cached_teacher"]["images_per_s"]
    c = "bf16" if bf16 >= fp32 else "fp32"
    rows.append(
        (
            "  cache warm",
            f"{d[f'vitkd_{c}_cached_teacher']['images_per_s']:.0f}",
            "",
            f"{d['speedup_ratio_cached_teacher']:.2f}x",
            c,
        )
    )

    if "vitkd_augmented_fixed_views" in d:
        rows.append(
            (
                "  augmented, fixed views",
                f"{d['vitkd_augmented_fixed_views']['images_per_s']:.0f}",
                "",
                f"{d['speedup_ratio_augmented_fixed_views']:.2f}x",
                d["augmented_fixed_views_config"].split(":")[0],
            )
        )

    def share(who: str) -> str:
        return " / ".join(
            f"{100 * f[f'{what}_{who}_fraction_of_peak']:.1f}% {f[f'{what}_{who}_peak_precision']}"
            for what in ("selector", "distill")
        )

    rows.append(("  % of peak sel/distill", share("vitkd"), share("reference"), "", "at the precision each ran at"))
    return rows


def _scale_rows(sc: dict) -> list[tuple[str, ...]]:
    """The 100k selection, its levers (``100000_<lever>``, in the order they ran), then the 1M selection."""
    rows = []
    for n in ("100000", *(k for k in sc if k.startswith("100000_")), "1000000"):
        if n in sc:
            label = f"select {int(n.split('_')[0]):,} wild" + (f" + {n.split('_', 1)[1]}" if "_" in n else "")
            rows.append(
                (
                    label,
                    f"{sc[n]['images_per_s']:.0f}",
                    "",
                    "",
                    f"{sc[n]['wall_s']:.0f} s, peak RSS {sc[n]['peak_rss_mb']:.0f} MB",
                )
            )
    return rows


def _generator_rows(g: dict) -> list[tuple[str, ...]]:
    return [
        (
            f"DAFL step, batch {g['batch']} (distilled)",
            f"{g['vitkd_joint']['distilled_images_per_s']:.0f}",
            f"{g['reference']['images_per_s']:.0f}",
            f"{g['speedup_joint']:.2f}x",
            "joint synthesizer, fp32",
        ),
        (
            "  fast synthesizer (distilled)",
            f"{g['vitkd_fast']['distilled_images_per_s']:.0f}",
            "",
            f"{g['speedup_fast']:.2f}x",
            f"fast/joint {g['fast_over_joint']:.2f}x; 2 inner steps every 5 student steps",
        ),
    ]


def _stream_rows(st: dict) -> list[tuple[str, ...]]:
    rows = []
    for k in ("plain", "memory_cache"):
        per_epoch = st[k]["images_per_s_per_epoch"]
        rows.append(
            (
                f"shard stream, {st['samples']:,} samples, {k}",
                " / ".join(f"{v:.0f}" for v in per_epoch),
                "",
                "",
                "epochs " + " / ".join(str(e + 1) for e in range(len(per_epoch))),
            )
        )
    return rows


def _headline(res: dict[str, Any]) -> str:
    """The paper pair's ratios and shares of the machine's peak, each with its target."""
    t = res.get("targets", {"not_judged": "this run measured only the generator row"})
    if "not_judged" in t:
        return f"targets not judged: {t['not_judged']}"
    sel, dis = t["selector_fraction_of_peak"], t["distill_every_step_fraction_of_peak"]
    ratio = t["distill_speedup_ratio_teacher_every_step"]

    def met(x: dict) -> str:
        return "met" if x["met"] else "missed"

    return (
        f"headline ({res['headline_preset']}): selector {res['selector_speedup_ratio']:.2f}x the reference at "
        f"{100 * sel['value']:.0f}% of the {res['selector_peak_precision']} peak "
        f"(target >= {100 * sel['target']:.0f}%: {met(sel)}); "
        f"distillation step with the teacher every step {ratio['value']:.2f}x "
        f"(target >= {ratio['target']:.0f}x: {met(ratio)}) at {100 * dis['value']:.0f}% of the "
        f"{res['distill_every_step_peak_precision']} peak (target >= {100 * dis['target']:.0f}%: {met(dis)})"
    )


def table(res: dict[str, Any]) -> str:
    rows = [("figure", "vitkd img/s", "reference img/s", "ratio", "vitkd config")]
    for name in res.get("selector", {}):
        rows += _selector_rows(name, res["selector"][name])
        rows += _distill_rows(name, res["distill"][name], res["flops"][name])
    sc = res.get("scale", {})
    rows += _scale_rows(sc)
    if "generator" in res:
        rows += _generator_rows(res["generator"])
    if "stream" in res:
        rows += _stream_rows(res["stream"])
    if "memory_ratio_1m_over_100k" in sc:
        rows.append(
            (
                "  1M / 100k",
                "",
                "",
                "",
                f"memory {sc['memory_ratio_1m_over_100k']:.2f}x, time {sc['time_ratio_1m_over_100k']:.1f}x",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.append(_headline(res))
    peak = res["peak"]
    lines.append(
        f"bf16 matmul peak {peak['bf16']['flop_per_s'] / 1e9:.0f} GFLOP/s, "
        f"fp32 {peak['fp32']['flop_per_s'] / 1e9:.0f} GFLOP/s; "
        f"{res['device']}, {res['threads']} threads, load {res['load_average_before']}"
    )
    return "\n".join(lines)
