"""Fig. 7: logit lens of the answer query per layer, clean vs poisoned vs poisoned + CleanSight."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import InputError
from ..experiments.lens import CONDITIONS
from .style import set_style

#: Colours and line styles of the lens conditions (``condition`` values of ``logit_lens_table``).
CONDITION_STYLES: dict[str, dict[str, Any]] = {
    "clean": {"color": "#00798c", "ls": "-", "marker": "o"},
    "triggered": {"color": "#d1495b", "ls": "-", "marker": "s"},
    "reference": {"color": "#edae49", "ls": "--", "marker": "^"},
    "all_layers": {"color": "#5a4a9c", "ls": "-.", "marker": "D"},
}


def plot_logit_lens(table: Any, *, title: str | None = None):
    """Per attack (columns): top, mean ``p_correct - p_target`` per layer (band: +-1 standard error);
    bottom, ``p_correct`` (solid) and ``p_target`` (dotted) per layer. One colour per condition.

    Args:
        table: :func:`~cleansight_analysis.experiments.lens.logit_lens_table` rows (columns ``attack,
            condition, layer, p_correct, p_target, diff``; optional ``pruning_layer``, marked as a grey
            vertical line: where CleanSight builds Omega).
        title: figure title.

    Returns:
        the matplotlib Figure (``2 x n_attacks`` axes).
    """
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    need = ("attack", "condition", "layer", "p_correct", "p_target", "diff")
    missing = [c for c in need if c not in getattr(table, "columns", [])]
    if missing:
        raise InputError(f"plot_logit_lens: the table lacks column(s) {missing}")
    if len(table) == 0:
        raise InputError("plot_logit_lens: the table is empty")
    set_style()
    attacks = list(dict.fromkeys(table["attack"]))
    order = [c for c in CONDITIONS if c in set(table["condition"])]
    order += [c for c in dict.fromkeys(table["condition"]) if c not in order]
    fig, axes = plt.subplots(2, len(attacks), figsize=(5.6 * len(attacks) + 0.6, 7.6), squeeze=False,
                             sharex="col", gridspec_kw={"height_ratios": [1.15, 1]})
    fallback = iter(["#66a182", "#8c8c8c", "#2e4057"])
    styles = {c: CONDITION_STYLES.get(c) or {"color": next(fallback), "ls": "-", "marker": "o"} for c in order}
    for j, attack in enumerate(attacks):
        sub = table[table["attack"] == attack]
        top, bottom = axes[0, j], axes[1, j]
        lows, highs = [0.0], [0.0]
        for cond in order:
            rows = sub[sub["condition"] == cond]
            if rows.empty:
                continue
            st = styles[cond]
            # reference conditions are drawn wide and underneath, so pruned curves that coincide stay visible
            wide = cond in ("clean", "triggered")
            lw, ms, alpha = (4.0, 7, 0.7) if wide else (1.8, 5, 1.0)
            g = rows.groupby("layer")
            mean, sem = g["diff"].mean(), g["diff"].sem().fillna(0.0)
            lows.append(float((mean - sem).min()))
            highs.append(float((mean + sem).max()))
            top.plot(mean.index, mean, color=st["color"], ls=st["ls"], marker=st["marker"], ms=ms, lw=lw, alpha=alpha,
                     zorder=2 if wide else 3)
            top.fill_between(mean.index, mean - sem, mean + sem, color=st["color"], alpha=0.12, lw=0)
            pc, pt = g["p_correct"].mean(), g["p_target"].mean()
            bottom.plot(pc.index, pc, color=st["color"], ls="-", marker=st["marker"], ms=ms - 1, lw=lw, alpha=alpha,
                        zorder=2 if wide else 3)
            bottom.plot(pt.index, pt, color=st["color"], ls=":", marker=st["marker"], ms=ms - 1, lw=lw, alpha=alpha,
                        mfc="white", zorder=2 if wide else 3)
        layers = sorted(sub["layer"].unique())
        if "pruning_layer" in sub.columns and len(sub["pruning_layer"].unique()) == 1:
            le = int(sub["pruning_layer"].iloc[0])
            for ax in (top, bottom):
                ax.axvline(le, color="0.6", ls=(0, (4, 3)), lw=1, zorder=0)
            top.text(le, 1.0, f" l_e = {le}", transform=top.get_xaxis_transform(), fontsize=9, color="0.4",
                     ha="right" if le == max(layers) else "left", va="top")
        top.axhline(0, color="0.3", lw=0.8)
        top.set_ylim(max(-1.05, min(lows) - 0.1), min(1.05, max(highs) + 0.1))
        bottom.set_ylim(-0.03, 1.03)
        top.set_title(f"{attack}: correct vs target first token")
        bottom.set_title(f"{attack}: both probabilities")
        top.set_ylabel("p(correct) - p(target)" if j == 0 else "")
        bottom.set_ylabel("probability at the answer query" if j == 0 else "")
        bottom.set_xlabel("LM layer (residual stream after the layer)")
        step = max(1, int(np.ceil(len(layers) / 16)))
        bottom.set_xticks(layers[::step])
        for ax in (top, bottom):
            ax.grid(axis="y", color="0.9", lw=0.8)
    handles = [Line2D([], [], color=styles[c]["color"], ls=styles[c]["ls"], marker=styles[c]["marker"],
                      lw=4.0 if c in ("clean", "triggered") else 1.8, alpha=0.7 if c in ("clean", "triggered") else 1,
                      label=CONDITIONS.get(c, c)) for c in order]
    handles += [Line2D([], [], color="0.3", ls="-", label="p(correct first token)"),
                Line2D([], [], color="0.3", ls=":", marker="o", mfc="white", label="p(target first token)")]
    fig.legend(handles=handles, loc="lower center", ncol=3, frameon=False, bbox_to_anchor=(0.5, -0.1),
               fontsize=10)
    fig.suptitle(title or "Fig. 7: logit lens of the answer query (mean over samples, band +-1 s.e.)", y=1.0)
    fig.tight_layout()
    return fig


__all__ = ["CONDITION_STYLES", "plot_logit_lens"]
