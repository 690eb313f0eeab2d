"""Fig. 1: ASR and clean accuracy against perturbation intensity, pixel vs attention perturbation.

Reads the tables of :mod:`cleansight_analysis.experiments.perturbation` (no model calls here).
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np

from .style import set_style

#: Colour, marker and line style of each variant of Fig. 1 (unknown variants get the next palette colour).
VARIANT_STYLES: dict[str, dict[str, Any]] = {
    "pixel ST": {"color": "#4d4d4d", "marker": "s", "linestyle": "-"},
    "pixel noise": {"color": "#8c8c8c", "marker": "D", "linestyle": ":"},
    "pixel JPEG": {"color": "#b08d57", "marker": "v", "linestyle": ":"},
    "attention, text queries (paper)": {"color": "#00798c", "marker": "o", "linestyle": "--"},
    "attention, detection layers": {"color": "#66a61e", "marker": "P", "linestyle": "-."},
    "attention, all queries (ours)": {"color": "#d1495b", "marker": "^", "linestyle": "-"},
}
#: Display names of attacks in titles.
ATTACK_LABELS: dict[str, str] = {"badnet": "BadNet", "blended": "Blended", "sig": "SIG", "wanet": "WaNet",
                                 "trojvlm": "TrojVLM", "vlood": "VLOOD", "issba": "ISSBA"}


def attack_label(name: str) -> str:
    """``"badnet" -> "BadNet"`` (unknown names unchanged)."""
    return ATTACK_LABELS.get(str(name).lower(), str(name))


def _variant_style(variant: str, index: int) -> dict[str, Any]:
    import matplotlib.pyplot as plt

    style = dict(VARIANT_STYLES.get(variant, {}))
    if not style:
        cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        style = {"color": cycle[index % len(cycle)], "marker": "o", "linestyle": "-"}
    return style


def _image(value: Any) -> np.ndarray:
    """An image cell (array, nested list, or JSON text from the cache) as uint8 ``[h, w, 3]``."""
    if isinstance(value, (str, bytes)):
        value = json.loads(value)
    return np.asarray(value, dtype=np.uint8)


def plot_metric_vs_intensity(sweep, metric: str = "asr", *, ax: Any = None, title: str | None = None,
                             ylabel: str | None = None, legend: bool = False, dodge: float = 0.012):
    """One line per ``variant``: ``metric`` (a share in [0, 1], drawn in percent) against ``intensity``.

    Args:
        sweep: rows of one attack from :func:`~cleansight_analysis.experiments.perturbation.perturbation_table`
            (columns ``variant, intensity`` and ``metric``).
        metric: ``"asr"``, ``"clean_acc"`` or ``"poisoned_acc"``.
        dodge: horizontal offset between variants (in intensity units) so that equal values stay visible.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(4.2, 3.2))
    variants = list(dict.fromkeys(sweep["variant"]))
    for i, variant in enumerate(variants):
        part = sweep[sweep["variant"] == variant].sort_values("intensity")
        shift = dodge * (i - (len(variants) - 1) / 2)
        ax.plot(part["intensity"] + shift, 100 * part[metric], label=variant, lw=2, ms=6, clip_on=False,
                **_variant_style(variant, i))
    ax.set_ylim(-4, 104)
    ax.set_xlim(-0.03, 1.03)
    ax.set_xticks(sorted(sweep["intensity"].unique()))
    ax.set_xlabel("perturbation intensity (ρ for pixels, η for attention)")
    ax.set_ylabel(ylabel or {"asr": "attack success rate (%)", "clean_acc": "clean accuracy (%)",
                             "poisoned_acc": "accuracy on triggered inputs (%)"}.get(metric, metric))
    ax.grid(axis="y", alpha=0.3)
    if title:
        ax.set_title(title)
    if legend:
        ax.legend(frameon=False, fontsize=9)
    return ax


def plot_thumbnails(thumbs, *, axes: Sequence[Any], attention_note: bool = True):
    """Draw each row of :func:`~cleansight_analysis.experiments.perturbation.st_thumbnail_table` on one axis.

    With ``attention_note`` an extra last axis (if given) shows the unperturbed image with the note that
    attention perturbation leaves the pixels unchanged.
    """
    rows = thumbs.sort_values("intensity").reset_index(drop=True)
    axes = list(axes)
    for ax, (_, row) in zip(axes, rows.iterrows()):
        ax.imshow(_image(row["image"]), interpolation="nearest")
        mirror = "mirror, " if bool(row.get("mirrored", False)) else ""
        detail = ("unperturbed" if row["intensity"] == 0 else
                  f"{mirror}scale {row['shrink_scale']:.2f}, {row['angle_deg']:+.0f}°")
        ax.set_title(f"ST ρ = {row['intensity']:g}\n{detail}", fontsize=10, fontweight="normal")
        ax.set_xticks([])
        ax.set_yticks([])
        for side in ax.spines.values():
            side.set_visible(False)
    if attention_note and len(axes) > len(rows):
        ax = axes[len(rows)]
        ax.imshow(_image(rows.iloc[0]["image"]), interpolation="nearest")
        ax.set_title("attention perturbation,\nany η: pixels unchanged", fontsize=10, fontweight="normal",
                     color=VARIANT_STYLES["attention, all queries (ours)"]["color"])
        ax.set_xticks([])
        ax.set_yticks([])
        for side in ax.spines.values():
            side.set_visible(True)
            side.set_linestyle("--")
            side.set_edgecolor(VARIANT_STYLES["attention, all queries (ours)"]["color"])
    for ax in axes[len(rows) + int(attention_note):]:
        ax.axis("off")
    return axes


def plot_pixel_vs_attention(sweep, thumbs=None, *, title: str | None = None):
    """Fig. 1: ASR (top row) and clean accuracy (middle row) vs intensity per attack; ST thumbnails below.

    Args:
        sweep: :func:`~cleansight_analysis.experiments.perturbation.perturbation_tables` (columns
            ``attack, variant, intensity, asr, clean_acc, n``).
        thumbs: optional :func:`~cleansight_analysis.experiments.perturbation.st_thumbnail_table`.
        title: figure title (default names the sample count).

    Returns:
        the matplotlib Figure (axes: ASR per attack, clean accuracy per attack, then the thumbnails).
    """
    import matplotlib.pyplot as plt

    set_style()
    attacks = list(dict.fromkeys(sweep["attack"]))
    n_thumbs = 0 if thumbs is None else len(thumbs) + 1
    width = max(4.4 * len(attacks), 1.75 * n_thumbs, 8.0)
    heights = [3.3, 2.6] + ([2.1] if n_thumbs else [])
    fig = plt.figure(figsize=(width, sum(heights) + 1.6), layout="constrained")
    sub_plots, sub_thumbs = (fig.subfigures(2, 1, height_ratios=[sum(heights[:2]), heights[2]], hspace=0.04)
                             if n_thumbs else (fig, None))
    axes = sub_plots.subplots(2, len(attacks), sharex=True, squeeze=False, gridspec_kw={"height_ratios": heights[:2]})
    for j, attack in enumerate(attacks):
        part = sweep[sweep["attack"] == attack]
        n = int(part["n"].iloc[0])
        plot_metric_vs_intensity(part, "asr", ax=axes[0, j], title=f"{attack_label(attack)} (n = {n})")
        plot_metric_vs_intensity(part, "clean_acc", ax=axes[1, j])
        axes[0, j].set_xlabel("")
        if j:
            axes[0, j].set_ylabel("")
            axes[1, j].set_ylabel("")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    sub_plots.legend(handles, labels, loc="outside upper center", ncol=min(len(labels), 3), frameon=False, fontsize=10)
    if n_thumbs:
        t_axes = sub_thumbs.subplots(1, n_thumbs)
        plot_thumbnails(thumbs, axes=np.atleast_1d(t_axes))
        first = thumbs.iloc[0]
        sub_thumbs.suptitle(f"Example triggered input ({attack_label(first['attack'])}) under the pixel "
                            f"perturbation ST", fontsize=11)
    fig.suptitle(title or "Pixel vs attention perturbation of a backdoored LVLM: attack success and clean "
                          "accuracy", fontweight="bold")
    return fig


__all__ = ["ATTACK_LABELS", "VARIANT_STYLES", "attack_label", "plot_metric_vs_intensity",
           "plot_pixel_vs_attention", "plot_thumbnails"]
