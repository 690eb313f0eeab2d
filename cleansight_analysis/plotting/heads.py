"""Fig. 9: per-head ablation and activation patching heatmaps (LM layer x head)."""

from __future__ import annotations

from typing import Any

from ..errors import InputError
from .style import set_style

#: Largest grid side whose cells are annotated with their value (larger grids get colour only).
ANNOTATE_MAX = 16


def head_grid(table: Any, value: str) -> Any:
    """``[layers x heads]`` DataFrame of ``value`` from per-head rows (rows with ``layer < 0`` dropped)."""
    for col in ("layer", "head", value):
        if col not in getattr(table, "columns", []):
            raise InputError(f"head_grid: the table lacks column {col!r}")
    rows = table[(table["layer"] >= 0) & (table["head"] >= 0)]
    if rows.empty:
        raise InputError("head_grid: no per-head rows (layer >= 0)")
    return rows.pivot_table(index="layer", columns="head", values=value, aggfunc="mean").sort_index()


def _heatmap(ax: Any, grid: Any, *, cmap: str, vmin: float, vmax: float, center: float | None, label: str,
             title: str, fmt: str = ".2f", mark: tuple[int, int] | None = None) -> None:
    import seaborn as sns
    from matplotlib.patches import Rectangle

    annotate = max(grid.shape) <= ANNOTATE_MAX
    grid = grid.round(2) + 0.0  # no "-0.00" labels
    sns.heatmap(grid, ax=ax, cmap=cmap, vmin=vmin, vmax=vmax, center=center, annot=annotate, fmt=fmt,
                annot_kws={"fontsize": 9}, linewidths=0.4, linecolor="white", square=False,
                cbar_kws={"label": label, "shrink": 0.85})
    ax.set_title(title)
    ax.set_xlabel("head")
    ax.set_ylabel("LM layer")
    ax.tick_params(axis="y", rotation=0)
    if mark is not None:
        layers, heads = list(grid.index), list(grid.columns)
        if mark[0] in layers and mark[1] in heads:
            xy = (heads.index(mark[1]), layers.index(mark[0]))
            ax.add_patch(Rectangle(xy, 1, 1, fill=False, lw=4, ec="white"))  # visible on dark and light cells
            ax.add_patch(Rectangle(xy, 1, 1, fill=False, lw=1.8, ec="black"))


def plot_head_ablation(ablation: Any, patching: Any = None, *, title: str | None = None):
    """One row per attack: ASR with each head zero-ablated, clean accuracy with it ablated, and (when
    ``patching`` is given) the share of the target log-prob gap restored by patching each head
    (one panel per direction). The most effective head of each panel is outlined.

    Args:
        ablation: :func:`~cleansight_analysis.experiments.heads.head_ablation_table` rows (``attack, layer,
            head, asr, clean_acc``; the ``layer = -1`` baseline row gives the reference in the titles).
        patching: :func:`~cleansight_analysis.experiments.heads.head_patching_table` rows (``attack,
            direction, layer, head, restored``) or None.
        title: figure title.

    Returns:
        the matplotlib Figure (``n_attacks x (2 + n_directions)`` axes).
    """
    import matplotlib.pyplot as plt

    for col in ("attack", "layer", "head", "asr", "clean_acc"):
        if col not in getattr(ablation, "columns", []):
            raise InputError(f"plot_head_ablation: the ablation table lacks column {col!r}")
    if patching is not None:
        for col in ("attack", "direction", "layer", "head", "restored"):
            if col not in getattr(patching, "columns", []):
                raise InputError(f"plot_head_ablation: the patching table lacks column {col!r}")
    set_style()
    attacks = list(dict.fromkeys(ablation["attack"]))
    directions = [] if patching is None else list(dict.fromkeys(patching["direction"]))
    ncols = 2 + len(directions)
    shape = head_grid(ablation[ablation["attack"] == attacks[0]], "asr").shape
    cell = 0.55 if max(shape) <= ANNOTATE_MAX else 0.18
    width = max(4.6, shape[1] * cell + 1.6)
    height = max(3.6, shape[0] * cell * 0.85 + 1.3)
    fig, axes = plt.subplots(len(attacks), ncols, figsize=(width * ncols, height * len(attacks) + 0.4),
                             squeeze=False)
    for i, attack in enumerate(attacks):
        sub = ablation[ablation["attack"] == attack]
        base = sub[sub["layer"] < 0]
        base_asr = float(base["asr"].iloc[0]) if len(base) else float("nan")
        base_acc = float(base["clean_acc"].iloc[0]) if len(base) else float("nan")
        n = int(sub["n"].iloc[0]) if "n" in sub.columns else None
        asr = head_grid(sub, "asr")
        low = asr.stack().idxmin()
        _heatmap(axes[i, 0], asr, cmap="rocket", vmin=0, vmax=1, center=None, label="ASR with the head ablated",
                 title=f"{attack}: ASR, one head zeroed\n(no ablation: {base_asr:.2f}"
                       + (f", n = {n})" if n else ")"), mark=low)
        acc = head_grid(sub, "clean_acc")
        _heatmap(axes[i, 1], acc, cmap="mako", vmin=0, vmax=1, center=None,
                 label="clean accuracy with the head ablated",
                 title=f"{attack}: clean accuracy, one head zeroed\n(no ablation: {base_acc:.2f})")
        for j, direction in enumerate(directions):
            rows = patching[(patching["attack"] == attack) & (patching["direction"] == direction)]
            ax = axes[i, 2 + j]
            if rows.empty:
                ax.set_axis_off()
                continue
            grid = head_grid(rows, "restored")
            top = grid.stack().idxmax()
            _heatmap(ax, grid, cmap="vlag", vmin=-1, vmax=1, center=0.0,
                     label="share of log-prob gap restored", mark=top,
                     title=f"{attack}: patching {direction}\n(target first-token log-prob gap restored)")
    fig.suptitle(title or "Per-head ablation and activation patching (hook_z, one head at a time)", y=1.0)
    fig.tight_layout()
    return fig


__all__ = ["ANNOTATE_MAX", "head_grid", "plot_head_ablation"]
