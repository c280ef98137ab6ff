"""A picture for a person to look at: the same images with each model's boxes (and the ground truth) side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from vitkd.io import atomic_path
from vitkd.plotting import pyplot

COLOURS = ("tab:red", "tab:blue", "tab:green", "tab:orange", "tab:purple", "tab:cyan")


def draw_detections(
    path: str | Path,
    images: torch.Tensor,
    columns: Sequence[tuple[str, Sequence[dict]]],
    class_names: Sequence[str],
    score_threshold: float = 0.5,
) -> Path:
    """Writes a PNG grid: one row per image of ``images`` (N, C, H, W in [0, 1]), one column per
    ``(title, per-image dicts)``; each dict holds ``boxes`` (xyxy pixels), ``labels`` and optional ``scores``
    (boxes scoring below ``score_threshold`` are not drawn; ground truth has no scores)."""
    plt = pyplot()
    n, cols = len(images), len(columns)
    fig, axes = plt.subplots(n, cols, figsize=(2.2 * cols, 2.2 * n), squeeze=False)
    for i in range(n):
        img = images[i].float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
        if img.shape[2] == 1:
            img = img[..., 0]
        for j, (title, dets) in enumerate(columns):
            ax = axes[i][j]
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=9)
            d = dets[i]
            scores = d.get("scores")
            for k, (box, label) in enumerate(zip(d["boxes"].tolist(), d["labels"].tolist())):
                if scores is not None and float(scores[k]) < score_threshold:
                    continue
                x0, y0, x1, y1 = box
                colour = COLOURS[int(label) % len(COLOURS)]
                ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linewidth=1.2))
                text = class_names[int(label)] + (f" {float(scores[k]):.2f}" if scores is not None else "")
                ax.text(x0, y0 - 0.5, text, color=colour, fontsize=5, va="bottom")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path
