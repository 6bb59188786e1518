"""Figures people would rather see than read; returned as matplotlib figures for logging.

Figures are built as ``matplotlib.figure.Figure`` objects, not through pyplot: nothing global
keeps them alive (long sweeps and re-evaluations draw thousands) and no display is needed."""

from __future__ import annotations

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle


def _subplots(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float], squeeze: bool = True,
              layout: str | None = None):
    fig = Figure(figsize=figsize, layout=layout)
    return fig, fig.subplots(nrows, ncols, squeeze=squeeze)


def component_usage_figure(labels: np.ndarray, component: np.ndarray, num_components: int,
                           class_names: list[str] | None = None) -> Figure:
    """Share of each true class assigned to each dominant component (MIX'EM supplementary
    Figs. 4-13, one histogram row per class), as a class x component heatmap."""
    classes = np.unique(labels)
    usage = np.zeros((len(classes), num_components))
    for row, c in enumerate(classes):
        usage[row] = np.bincount(component[labels == c], minlength=num_components) / max(1, (labels == c).sum())
    fig, ax = _subplots(figsize=(1.0 + 0.45 * num_components, 1.0 + 0.4 * len(classes)))
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


def confusion_figure(counts: np.ndarray, mapping: dict[int, int], num_classes: int) -> Figure:
    """Confusion matrix after the Hungarian assignment (MIX'EM Fig. 4): rows true classes,
    columns clusters ordered by the class they were matched to, normalised per class."""
    order = sorted(range(counts.shape[0]), key=lambda c: mapping.get(c, num_classes + c))
    table = counts[order][:, :num_classes].T.astype(float)
    table /= np.maximum(table.sum(1, keepdims=True), 1)
    fig, ax = _subplots(figsize=(1.5 + 0.45 * len(order), 1.2 + 0.45 * num_classes))
    im = ax.imshow(table, vmin=0, vmax=1, cmap="Blues", aspect="auto")
    for (r, c), v in np.ndenumerate(table):
        if v >= 0.05:
            ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v > 0.6 else "black")
    ax.set_xticks(range(len(order)), labels=[f"{c}->{mapping[c]}" if c in mapping else str(c) for c in order],
                  rotation=90, fontsize=7)
    ax.set_yticks(range(num_classes))
    ax.set_xlabel("cluster -> matched class")
    ax.set_ylabel("true class")
    ax.set_title("confusion after Hungarian assignment (row-normalised)")
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    return fig


def accuracy_vs_inertia_figure(inertias: np.ndarray, accuracies: np.ndarray, best: int) -> Figure:
    """Every K-means initialisation's accuracy against its inertia (MIX'EM Fig. 5): low inertia
    does not guarantee high accuracy."""
    fig, ax = _subplots(figsize=(5, 3.5))
    ax.scatter(inertias, accuracies, s=14, alpha=0.7, label="initialisations")
    ax.scatter([inertias[best]], [accuracies[best]], s=60, marker="*", color="red", label="best inertia (kept)")
    ax.set_xlabel("inertia")
    ax.set_ylabel("ACC")
    ax.set_title(f"K-means over {len(inertias)} initialisations")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def tsne_figure(x: np.ndarray, labels: np.ndarray, max_points: int = 2000, seed: int = 0) -> Figure:
    """t-SNE of a random sample of representations coloured by true label (MIX'EM Fig. 3)."""
    from sklearn.manifold import TSNE

    rng = np.random.default_rng(seed)
    idx = rng.choice(len(x), size=min(max_points, len(x)), replace=False)
    embedded = TSNE(n_components=2, init="pca", random_state=seed,
                    perplexity=min(30.0, (len(idx) - 1) / 3)).fit_transform(x[idx])
    fig, ax = _subplots(figsize=(5, 5))
    sc = ax.scatter(embedded[:, 0], embedded[:, 1], c=labels[idx], s=4, cmap="tab20")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"t-SNE of {len(idx)} representations (colour = true class)")
    fig.colorbar(sc, ax=ax, fraction=0.04)
    fig.tight_layout()
    return fig


#: Grids up to this many cells a side are drawn cell by cell, each annotated with its value
#: (failed / missing ones hatched); larger ones (a 300-trial random search drawn as a grid) as
#: a plain image of a bounded size, where those cells show grey: one text and one patch per cell
#: of a 300 x 300 grid grew past 23 GB.
ANNOTATED_CELLS_PER_SIDE = 20


def _tick_labels(values: list, limit: int = ANNOTATED_CELLS_PER_SIDE) -> tuple[list[int], list[str]]:
    step = max(1, -(-len(values) // limit))
    positions = list(range(0, len(values), step))
    return positions, [f"{values[i]:g}" if isinstance(values[i], float) else str(values[i]) for i in positions]


def heatmap_figure(cells: list, x: str, y: str, facet: str | None, metric: str, title: str = "") -> Figure:
    """Annotated heatmaps of ``metric`` over a loss-weight grid, one panel per facet value
    (MIX'EM supplementary Figs. 1-3). ``cells`` have ``facet, x, y, mean, std, n, status``;
    failed and missing cells are hatched and labelled (grey beyond
    :data:`ANNOTATED_CELLS_PER_SIDE` cells a side), never coloured as a value."""
    facets = list(dict.fromkeys(c.facet for c in cells))
    xs = list(dict.fromkeys(c.x for c in cells))
    ys = list(dict.fromkeys(c.y for c in cells))
    column, row_of = {v: i for i, v in enumerate(xs)}, {v: i for i, v in enumerate(ys)}
    annotate = max(len(xs), len(ys)) <= ANNOTATED_CELLS_PER_SIDE
    finite = [c.mean for c in cells if c.status == "ok"]
    vmin, vmax = (min(finite), max(finite)) if finite else (0.0, 1.0)
    shown_x, shown_y = min(len(xs), ANNOTATED_CELLS_PER_SIDE), min(len(ys), ANNOTATED_CELLS_PER_SIDE)
    fig, axes = _subplots(1, len(facets), figsize=(min(40.0, 2.5 + 1.2 * shown_x * len(facets)), 2.0 + 0.8 * shown_y),
                          squeeze=False, layout="constrained")
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
    for ax, f in zip(axes[0], facets):
        grid = np.full((len(ys), len(xs)), np.nan)
        for c in cells:
            if c.facet == f and c.status == "ok":
                grid[row_of[c.y], column[c.x]] = c.mean
        im = ax.imshow(np.ma.masked_invalid(grid), vmin=vmin, vmax=vmax + 1e-12, cmap=cmap, origin="lower",
                       aspect=None if annotate else "auto", interpolation="nearest")
        for c in (c for c in cells if c.facet == f and annotate):
            col, row = column[c.x], row_of[c.y]
            if c.status == "ok":
                text = f"{c.mean:.3f}" + (f"\n±{c.std:.3f}" if c.n > 1 else "")
                bright = (c.mean - vmin) / max(vmax - vmin, 1e-12) > 0.6
                ax.text(col, row, text, ha="center", va="center", fontsize=8, color="black" if bright else "white")
            else:
                ax.add_patch(Rectangle((col - 0.5, row - 0.5), 1, 1, fill=False, hatch="///", color="grey"))
                ax.text(col, row, c.status, ha="center", va="center", fontsize=8, color="dimgrey")
        ax.set_xticks(*_tick_labels(xs))
        ax.set_yticks(*_tick_labels(ys))
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        if facet:
            ax.set_title(f"{facet} = {f:g}" if isinstance(f, float) else f"{facet} = {f}", fontsize=9)
    fig.colorbar(im, ax=list(axes[0]), fraction=0.04)
    failed = "" if annotate else "; grey: failed or not run"
    fig.suptitle((f"{title}: {metric} (mean over seeds)" if title else metric) + failed, fontsize=10)
    return fig


def cluster_sizes_figure(relative_sizes: np.ndarray) -> Figure:
    """Clusters sorted by relative size N_c K / N, with the balanced size 1 and the empty
    clusters marked (ExCB supplementary Fig. 1)."""
    ordered = np.sort(relative_sizes)[::-1]
    fig, ax = _subplots(figsize=(5, 3.2), layout="constrained")
    ax.bar(range(len(ordered)), ordered, width=1.0, color="tab:blue")
    ax.axhline(1.0, color="tab:red", linestyle="--", label="balanced (N/K samples)")
    empty = int((ordered == 0).sum())
    ax.set_xlabel("cluster (sorted by size)")
    ax.set_ylabel("relative size N_c K / N")
    ax.set_title(f"cluster sizes: {empty} of {len(ordered)} empty ({empty / len(ordered):.1%}), largest {ordered[0]:.2f}")
    ax.legend()
    return fig
