"""Fig. 2: attention stealing, drawn from the tables of :mod:`cleansight_analysis.experiments.stealing`.

(a) :func:`plot_share_bars`: stacked bars of the answer query's attention per token group, the paper's
bars next to ours; (b) :func:`plot_token_attention`: the query's attention over every position of one
clean and one triggered input; (c) :func:`plot_thief_maps`: the attention on the image grid overlaid on
the example images, the trigger outlined. :func:`plot_attention_stealing` assembles the three panels.
No model calls here.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from ..results import array_cell
from .perturbation import attack_label
from .style import GROUP_COLORS, GROUP_LABELS, set_style

#: Stacking order of the bars (bottom to top).
BAR_GROUPS: tuple[str, ...] = ("image", "prompt", "system", "template_tail")
#: Short x labels of the conditions.
CONDITION_SHORT: dict[str, str] = {"clean": "clean", "triggered": "trig."}
#: Colour of the trigger outline in (c).
TRIGGER_COLOR = "#39ff14"


def _short(condition: str) -> str:
    if condition in CONDITION_SHORT:
        return CONDITION_SHORT[condition]
    if condition.startswith("triggered + "):
        return "trig.+" + condition[len("triggered + "):].split(" ")[0]
    return condition


def _array(value: Any, dtype: Any = float) -> np.ndarray | None:
    """An array cell, fresh or reloaded from the cache; None stays None."""
    return array_cell(value, dtype)


def _stack(ax: Any, x: float, shares: dict[str, float], *, width: float = 0.8, label_min: float = 0.06,
           hatch: str | None = None) -> None:
    bottom = 0.0
    for g in BAR_GROUPS:
        v = float(shares.get(g, 0.0) or 0.0)
        if v <= 0:
            continue
        ax.bar(x, v, width, bottom=bottom, color=GROUP_COLORS[g], edgecolor="white", linewidth=0.6, hatch=hatch)
        if v >= label_min and g in ("image", "prompt", "system"):
            ax.text(x, bottom + v / 2, f"{100 * v:.0f}", ha="center", va="center", fontsize=9,
                    color="white" if g != "template_tail" else "black", fontweight="bold")
        bottom += v


def plot_share_bars(summary, paper=None, *, attack: str | None = None, ax: Any = None, title: str | None = None):
    """Stacked bars of group shares for one attack: the paper's bars, ours in the middle layers, ours in
    the stealing layer.

    Args:
        summary: :func:`~cleansight_analysis.experiments.stealing.share_summary` (columns ``attack, window,
            layers, condition, group, share``).
        paper: :func:`~cleansight_analysis.experiments.stealing.paper_shares` (``attack, condition, group,
            share``) or None.
        attack: which attack (default: the first in ``summary``).

    Numbers inside the segments are percent; the paper's bars are hatched.
    """
    import matplotlib.pyplot as plt
    from matplotlib.transforms import blended_transform_factory

    if ax is None:
        _, ax = plt.subplots(figsize=(6.0, 3.8))
    attack = attack or summary["attack"].iloc[0]
    ours = summary[summary["attack"] == attack]
    blocks: list[tuple[str, list[tuple[str, dict[str, float], str | None]]]] = []
    ref = None if paper is None else paper[paper["attack"] == attack]
    if ref is not None and not ref.empty:
        bars = [(("poisoned" if c == "triggered" else c), part.set_index("group")["share"].to_dict(), "//")
                for c, part in ref.groupby("condition", sort=False)]
        blocks.append(("paper\n(LLaVA-1.5-7B, middle)", bars))
    elif paper is not None:
        blocks.append(("paper\n(not reported)", []))
    for window in dict.fromkeys(ours["window"]):
        part = ours[ours["window"] == window]
        label = part["layers"].iloc[0]
        name = f"ours, {label}\n(middle third)" if window == "middle" else f"ours, {label}\n(largest image rise)"
        bars = [(_short(c), p.set_index("group")["share"].to_dict(), None)
                for c, p in part.groupby("condition", sort=False)]
        blocks.append((name, bars))
    x, ticks, tick_labels = 0.0, [], []
    trans = blended_transform_factory(ax.transData, ax.transAxes)
    for b, (name, bars) in enumerate(blocks):
        start = x
        if not bars:
            ax.text(x + 0.5, 0.5, "no numbers\nin the paper", ha="center", va="center", fontsize=9, color="0.4",
                    transform=trans)
            x += 2.0
        for label, shares, hatch in bars:
            _stack(ax, x, shares, hatch=hatch)
            ticks.append(x)
            tick_labels.append(label)
            x += 1.0
        mid = (start + x - 1.0) / 2 if bars else start + 0.5
        ax.text(mid, -0.16, name, ha="center", va="top", fontsize=9.5, transform=trans)
        if b < len(blocks) - 1:
            ax.axvline(x - 0.3, color="0.75", lw=0.8, ls=":")
        x += 0.4
    ax.set_xticks(ticks)
    ax.set_xticklabels(tick_labels, fontsize=9.5)
    ax.set_xlim(-0.6, x - 0.8)
    ax.set_ylim(0, 1.0)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_yticklabels([f"{v:.0f}" for v in np.linspace(0, 100, 6)])
    ax.set_ylabel("share of the answer query's attention (%)")
    ax.set_title(title or attack_label(attack))
    return ax


def _image_patch_label(position: int, image_positions: np.ndarray) -> str:
    n = len(image_positions)
    side = int(round(math.sqrt(n)))
    idx = int(np.searchsorted(image_positions, position))
    if side * side == n:
        return f"patch ({idx // side},{idx % side})"
    return f"image token {idx}"


def plot_token_attention(tokens, layer: int, *, axes: Sequence[Any] | None = None, annotate: int = 3,
                         conditions: Sequence[str] | None = None):
    """The answer query's head-averaged attention on every position, one axis per condition.

    Args:
        tokens: :func:`~cleansight_analysis.experiments.stealing.token_attention_table` rows (``condition,
            layer, position, token, group, attention``) of one example.
        layer: which LM layer.
        axes: one axis per condition (default: a new figure with stacked axes).
        annotate: label the ``annotate`` largest positions with their token (image tokens as patches).
        conditions: order (default: as in the table).
    """
    import matplotlib.pyplot as plt

    part = tokens[tokens["layer"] == layer]
    if part.empty:
        raise ValueError(f"no token rows for layer {layer}; layers present: {sorted(tokens['layer'].unique())}")
    conditions = list(conditions or dict.fromkeys(part["condition"]))
    if axes is None:
        _, axes = plt.subplots(len(conditions), 1, figsize=(8, 2.2 * len(conditions)), sharex=True, sharey=True)
    axes = list(np.atleast_1d(axes))
    ymax = float(part["attention"].max())
    for ax, condition in zip(axes, conditions):
        rows = part[part["condition"] == condition].sort_values("position")
        pos = rows["position"].to_numpy()
        img_pos = rows.loc[rows["group"] == "image", "position"].to_numpy()
        if len(img_pos):
            ax.axvspan(img_pos.min() - 0.5, img_pos.max() + 0.5, color=GROUP_COLORS["image"], alpha=0.08, lw=0)
        for g in BAR_GROUPS:
            sel = rows["group"] == g
            if sel.any():
                ax.bar(rows.loc[sel, "position"], rows.loc[sel, "attention"], width=1.0, color=GROUP_COLORS[g],
                       label=GROUP_LABELS.get(g, g), linewidth=0)
        top = rows.nlargest(annotate, "attention")
        for _, r in top.iterrows():
            text = (_image_patch_label(int(r["position"]), img_pos) if r["group"] == "image"
                    else repr(str(r["token"]))[1:-1])
            ax.annotate(text, (r["position"], r["attention"]), xytext=(0, 3), textcoords="offset points",
                        ha="center", va="bottom", fontsize=9, color=GROUP_COLORS.get(r["group"], "k"))
        share = float(rows.loc[rows["group"] == "image", "attention"].sum())
        ax.set_title(f"{condition} input: {100 * share:.0f} % of the attention on image tokens", fontsize=10.5,
                     loc="left")
        ax.set_ylim(0, ymax * 1.22)
        ax.set_xlim(pos.min() - 1, pos.max() + 1)
        ax.set_ylabel("attention")
    axes[-1].set_xlabel(f"position in the input sequence (layer {layer}; heads averaged)")
    return axes


def _outline(ax: Any, cells: np.ndarray, extent: tuple[float, float, float, float], **kw: Any) -> None:
    """Draw the boundary of the True cells of ``cells`` ``[rows, cols]`` on an image with ``extent``."""
    rows, cols = cells.shape
    x0, x1, y1, y0 = extent  # imshow extent (left, right, bottom, top) with y pointing down
    cw, ch = (x1 - x0) / cols, (y1 - y0) / rows
    for r in range(rows):
        for c in range(cols):
            if not cells[r, c]:
                continue
            left, top = x0 + c * cw, y0 + r * ch
            if c == 0 or not cells[r, c - 1]:
                ax.plot([left, left], [top, top + ch], **kw)
            if c == cols - 1 or not cells[r, c + 1]:
                ax.plot([left + cw, left + cw], [top, top + ch], **kw)
            if r == 0 or not cells[r - 1, c]:
                ax.plot([left, left + cw], [top, top], **kw)
            if r == rows - 1 or not cells[r + 1, c]:
                ax.plot([left, left + cw], [top + ch, top + ch], **kw)


def _glow(values: np.ndarray, cmap: str, alpha: float) -> np.ndarray:
    """RGBA ``[rows, cols, 4]`` of ``values`` in [0, 1]: colour from ``cmap``, opacity growing with the value."""
    import matplotlib.pyplot as plt

    v = np.clip(np.asarray(values, dtype=float), 0.0, 1.0)
    rgba = plt.get_cmap(cmap)(v)
    rgba[..., 3] = alpha * np.sqrt(v)
    return rgba


def plot_thief_maps(thief, examples, layers: dict[str, int], *, axes: Any = None, cmap: str = "plasma",
                    alpha: float = 0.85, conditions: Sequence[str] = ("clean", "triggered")):
    """Attention of the answer query on the image grid, overlaid on the example image (rows: conditions,
    columns: attacks); the picture is drawn in grey so that the colour is the attention only; each column is
    scaled to its largest value; the trigger is outlined for patch triggers (dotted on the clean control).

    Args:
        thief: :func:`~cleansight_analysis.experiments.stealing.thief_table` rows (``attack, condition, layer,
            top1_hit_rate, chance_share, example_map, trigger_cells``; ``top1_share`` if present is quoted).
        examples: :func:`~cleansight_analysis.experiments.stealing.example_table` rows (``attack, condition,
            image``).
        layers: the layer shown per attack.
        axes: ``[len(conditions), n_attacks]`` axes (default: a new figure).

        cmap, alpha: colour map of the overlay and its opacity at the column's maximum (opacity grows with
            the square root of the value, so weakly attended patches leave the picture visible).

    Returns:
        ``(axes, mappable)``: the axes array and a mappable of the [0, 1] colour scale (for a colorbar).
    """
    import matplotlib.pyplot as plt
    import pandas as pd

    attacks = [a for a in dict.fromkeys(thief["attack"]) if a in layers]
    if axes is None:
        _, axes = plt.subplots(len(conditions), len(attacks), figsize=(2.6 * len(attacks), 2.8 * len(conditions)),
                               squeeze=False)
    axes = np.asarray(axes).reshape(len(conditions), len(attacks))
    overlay = None
    for j, attack in enumerate(attacks):
        layer = int(layers[attack])
        sub = thief[(thief["attack"] == attack) & (thief["layer"] == layer)]
        maps = {c: _array(sub[sub["condition"] == c]["example_map"].iloc[0]) for c in conditions}
        vmax = max(float(m.max()) for m in maps.values())
        for i, condition in enumerate(conditions):
            ax = axes[i, j]
            row = sub[sub["condition"] == condition].iloc[0]
            ex = examples[(examples["attack"] == attack) & (examples["condition"] == condition)]
            img = _array(ex["image"].iloc[0], np.uint8)
            h, w = img.shape[:2]
            extent = (0, w, h, 0)
            grey = img[..., :3].astype(float) @ np.array([0.299, 0.587, 0.114]) if img.ndim == 3 else img
            ax.imshow(grey, cmap="gray", vmin=0, vmax=255, interpolation="nearest", extent=extent)
            ax.imshow(_glow(maps[condition] / vmax, cmap, alpha), extent=extent, interpolation="nearest")
            overlay = plt.cm.ScalarMappable(norm=plt.Normalize(0, 1), cmap=cmap)
            cells = _array(row["trigger_cells"], bool)
            if cells is not None and cells.ndim == 2:
                _outline(ax, cells, extent, color=TRIGGER_COLOR, lw=2.2,
                         ls="-" if condition == "triggered" else ":")
                if condition == "triggered":
                    note = (f"top-1 on trigger: {100 * row['top1_hit_rate']:.0f} % "
                            f"(chance {100 * row['chance_share']:.1f} %)")
                else:
                    note = f"top-1 on trigger's place: {100 * row['top1_hit_rate']:.0f} %"
            else:
                note = "global trigger (no region)" if condition == "triggered" else ""
            if "top1_share" in row and not pd.isna(row["top1_share"]):
                note += ("\n" if note else "") + f"top patch: {100 * row['top1_share']:.0f} % of image attention"
            head = f"{attack_label(attack)}, layer {layer}\n" if i == 0 else ""
            ax.set_title(head + note, fontsize=9.5, fontweight="normal")
            if j == 0:
                ax.set_ylabel(condition, fontsize=10.5)
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_visible(False)
    return axes, overlay


def plot_attention_stealing(summary, paper, tokens, thief, examples, layers: dict[str, int], *,
                            token_layer: int | None = None, title: str | None = None):
    """Fig. 2: (a) group-share bars per attack, (b) token-wise attention of one example, (c) thief-token maps.

    Args:
        summary: :func:`~cleansight_analysis.experiments.stealing.share_summary`.
        paper: :func:`~cleansight_analysis.experiments.stealing.paper_shares` (or None).
        tokens: :func:`~cleansight_analysis.experiments.stealing.token_attention_table` (one attack).
        thief, examples: :func:`~cleansight_analysis.experiments.stealing.thief_table` and
            :func:`~cleansight_analysis.experiments.stealing.example_table` rows of every attack.
        layers: the stealing layer of each attack (used in (c); (b) uses ``layers`` of its attack unless
            ``token_layer`` is given).

    Returns:
        the matplotlib Figure.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    set_style()
    attacks = list(dict.fromkeys(summary["attack"]))
    token_attack = tokens["attack"].iloc[0]
    token_layer = layers.get(token_attack) if token_layer is None else token_layer
    width = max(5.6 * len(attacks), 15.0)
    fig = plt.figure(figsize=(width, 12.8), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.0, 1.25], hspace=0.05)
    ax_a = np.atleast_1d(top.subplots(1, len(attacks), sharey=True))
    for j, attack in enumerate(attacks):
        plot_share_bars(summary, paper, attack=attack, ax=ax_a[j])
        if j:
            ax_a[j].set_ylabel("")
    handles = [Patch(facecolor=GROUP_COLORS[g], label=GROUP_LABELS.get(g, g)) for g in BAR_GROUPS]
    handles.append(Patch(facecolor="white", edgecolor="0.3", hatch="//", label="paper's bar (system = all non-image, "
                                                                               "non-prompt tokens)"))
    top.legend(handles=handles, loc="outside lower center", ncol=len(handles), frameon=False, fontsize=10)
    st = [c for c in dict.fromkeys(summary["condition"]) if c.startswith("triggered + ")]
    st_note = f"; trig.+ST: triggered input after the pixel transform {st[0][len('triggered + '):]}" if st else ""
    top.suptitle("(a) Where the answer query looks: share of its attention per token group (numbers in %"
                 f"{st_note})", x=0.01, ha="left", fontsize=12.5, fontweight="bold")
    left, right = bottom.subfigures(1, 2, width_ratios=[1.2, 1.0], wspace=0.03)
    ax_b = left.subplots(2, 1, sharex=True, sharey=True)
    plot_token_attention(tokens, token_layer, axes=ax_b)
    ax_b[0].legend(loc="upper left", frameon=False, fontsize=9, ncol=4)
    left.suptitle(f"(b) Token-wise attention of the answer query, {attack_label(token_attack)} model, "
                  f"one example", x=0.02, ha="left", fontsize=12.5, fontweight="bold")
    ax_c = right.subplots(2, len(attacks), squeeze=False)
    _, overlay = plot_thief_maps(thief, examples, layers, axes=ax_c)
    if overlay is not None:
        right.colorbar(overlay, ax=ax_c, location="bottom", shrink=0.6, aspect=30,
                       label="attention on the image patch (relative to the column's maximum)")
    right.suptitle("(c) Thief tokens on the image grid (image in grey, trigger in green)",
                   x=0.02, ha="left", fontsize=12.5, fontweight="bold")
    if title:
        fig.suptitle(title, fontweight="bold", fontsize=13.5)
    return fig


__all__ = ["BAR_GROUPS", "plot_attention_stealing", "plot_share_bars", "plot_thief_maps", "plot_token_attention"]
