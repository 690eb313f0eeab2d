"""Attention figures drawn from the tidy frames of :meth:`AttentionRows.to_frame`."""

from __future__ import annotations

from typing import Any

import numpy as np

from .style import GROUP_COLORS, GROUP_LABELS


def plot_group_share_heatmap(frame, group: str = "image", *, ax: Any = None, title: str | None = None,
                             annotate: bool | None = None, cmap: str = "rocket_r"):
    """Layer x head heatmap of the mean attention share of one token group.

    Args:
        frame: tidy table with columns ``layer``, ``head``, ``group``, ``mass`` (e.g. ``rows.to_frame()``);
            samples are averaged.
        group: which group's share to show.
        annotate: write the value in each cell (default: when the grid has at most 12 x 16 cells).
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    sub = frame[frame["group"] == group]
    if sub.empty:
        raise ValueError(f"no rows for group {group!r}; groups present: {sorted(frame['group'].unique())}")
    table = sub.pivot_table(index="layer", columns="head", values="mass", aggfunc="mean", observed=True)
    if ax is None:
        _, ax = plt.subplots(figsize=(1.2 + 0.55 * table.shape[1], 1.0 + 0.45 * table.shape[0]))
    if annotate is None:
        annotate = table.shape[0] <= 12 and table.shape[1] <= 16
    sns.heatmap(table, ax=ax, vmin=0, vmax=1, cmap=cmap, annot=annotate, fmt=".2f", square=False,
                cbar_kws={"label": f"share of attention on {GROUP_LABELS.get(group, group)} tokens"},
                linewidths=0.5, linecolor="white", annot_kws={"size": 8})
    ax.set_xlabel("head")
    ax.set_ylabel("LM layer")
    ax.set_title(title or f"{GROUP_LABELS.get(group, group).capitalize()} share of the answer query's attention")
    return ax


def plot_group_shares(frame, *, ax: Any = None, title: str | None = None):
    """Stacked bars: per layer, mean share of each token group (heads and samples averaged)."""
    import matplotlib.pyplot as plt

    table = frame.pivot_table(index="layer", columns="group", values="mass", aggfunc="mean", observed=True)
    if ax is None:
        _, ax = plt.subplots(figsize=(1.5 + 0.6 * len(table), 3.2))
    bottom = np.zeros(len(table))
    for group in table.columns:
        vals = table[group].to_numpy()
        ax.bar(table.index.astype(str), vals, bottom=bottom, color=GROUP_COLORS.get(group),
               label=GROUP_LABELS.get(group, group), width=0.75)
        bottom += vals
    ax.set_ylim(0, 1)
    ax.set_xlabel("LM layer")
    ax.set_ylabel("share of attention")
    ax.legend(frameon=False, bbox_to_anchor=(1.0, 1.0), loc="upper left")
    ax.set_title(title or "Where the answer query looks, per layer")
    return ax


def plot_image_attention(image, grid_scores, *, ax: Any = None, title: str | None = None, alpha: float = 0.55,
                         cmap: str = "magma"):
    """Overlay per-patch attention ``[rows, cols]`` on the image it was computed from.

    Args:
        image: the (processed or original) picture, a PIL image or ``[H, W, 3]`` array.
        grid_scores: ``[rows, cols]`` scores, e.g. ``ImageTokens.paint(row)`` averaged over heads.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(3.4, 3.4))
    arr = np.asarray(image)
    scores = np.asarray(grid_scores, dtype=float)
    ax.imshow(arr)
    h, w = arr.shape[:2]
    im = ax.imshow(scores, cmap=cmap, alpha=alpha, extent=(0, w, h, 0), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or "Attention on image patches")
    plt.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="attention")
    return ax
