"""Figures people would rather see than read; returned as matplotlib figures for logging."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless: workers and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def component_usage_figure(labels: np.ndarray, component: np.ndarray, num_components: int,
                           class_names: list[str] | None = None) -> Figure:
    """Share of each true class assigned to each dominant component (MIX'EM supplementary
    Figs. 4-13, one histogram row per class), as a class x component heatmap."""
    classes = np.unique(labels)
    usage = np.zeros((len(classes), num_components))
    for row, c in enumerate(classes):
        usage[row] = np.bincount(component[labels == c], minlength=num_components) / max(1, (labels == c).sum())
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * num_components, 1.0 + 0.4 * len(classes)))
    im = ax.imshow(usage, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for (r, m), v in np.ndenumerate(usage):
        if v >= 0.05:
            ax.text(m, r, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.6 else "black")
    ax.set_xlabel("dominant mixture component")
    ax.set_ylabel("true class")
    ax.set_xticks(range(num_components))
    ax.set_yticks(range(len(classes)), labels=class_names or [str(c) for c in classes])
    ax.set_title("component usage per class (share of the class)")
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    return fig
