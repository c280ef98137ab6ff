"""Headless matplotlib for every figure vitkd writes (reports, callbacks, demos).

matplotlib is imported on first use, so modules that may draw stay cheap to import.
"""

from __future__ import annotations

import numpy as np


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (unless a backend was chosen already)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def figure_to_array(fig) -> np.ndarray:
    """Render a matplotlib figure to an (H, W, 3) uint8 array, then close it."""
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    pyplot().close(fig)
    return rgb
