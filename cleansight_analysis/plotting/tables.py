"""Figures and styled tables for the paper's Tables 1-4 (defense evaluation).

Every function reads the tidy tables of :mod:`cleansight_analysis.experiments.tables` (columns
``attack``, ``defense``, ``asr``, ``clean_utility``, ``poisoned_utility``, ``tpr``, ``fpr``, ``n``, ...;
shares in [0, 1]) and returns a matplotlib Figure (or a pandas Styler); none touches a model.

- :func:`plot_attack_defense` (Tables 1/2): annotated heatmaps, defenses x attacks, of ASR, clean
  utility, poisoned utility and detection (TPR with FPR).
- :func:`plot_module_ablation` (Table 3): ASR and clean utility of the CleanSight ablations per attack.
- :func:`plot_adapter_lora` (Table 4): ASR and clean utility of each family member, no defense vs CleanSight.
- :func:`styled_table`: the paper layout (rows attacks, columns defense x metric) as percentages.
"""

from __future__ import annotations

import math
import textwrap
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from ..errors import InputError
from .style import set_style

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

#: Display names of the attacks.
ATTACK_LABELS: dict[str, str] = {"badnet": "BadNet", "blended": "Blended", "sig": "SIG", "wanet": "WaNet",
                                 "trojvlm": "TrojVLM", "vlood": "VLOOD"}
#: Words for each defense label (see :data:`cleansight_analysis.experiments.tables.DEFENSE_LABELS`).
DEFENSE_LABELS: dict[str, str] = {
    "none": "No defense", "blur": "Blur", "st": "ST", "shrinkpad": "ShrinkPad", "jpeg": "JPEG",
    "strip": "STRIP", "attention_entropy": "Attention entropy", "scale_up": "SCALE-UP",
    "cleansight": "CleanSight", "cleansight_all_layers": "CleanSight (mask all layers)",
    "cleansight_generated": "CleanSight (every decoding query)", "full": "Full CleanSight",
    "no_detection": "No detection (prune every input)", "random_pruning": "Random pruning (90 % of image tokens)",
}
#: One colour per defense (grey: none; blues: purifiers; ochres: detectors; reds: CleanSight).
DEFENSE_COLORS: dict[str, str] = {
    "none": "#8c8c8c", "blur": "#9ecae1", "st": "#4292c6", "shrinkpad": "#2171b5", "jpeg": "#08519c",
    "strip": "#fdd49e", "attention_entropy": "#fdae6b", "scale_up": "#e6550d",
    "cleansight": "#d1495b", "cleansight_all_layers": "#7a1f2b", "cleansight_generated": "#a4303f",
    "full": "#7a1f2b", "no_detection": "#edae49", "random_pruning": "#00798c",
}
#: Panel titles of each metric.
METRIC_LABELS: dict[str, str] = {"asr": "Attack success rate (ASR)", "clean_utility": "Clean utility (CU)",
                                 "poisoned_utility": "Poisoned utility (PU)", "tpr": "Detection: TPR / FPR",
                                 "fpr": "False-positive rate (FPR)", "auroc": "Detection AUROC"}
#: y-axis labels of the bar panels.
AXIS_LABELS: dict[str, str] = {"asr": "share of triggered inputs (%)", "clean_utility": "share of clean inputs (%)",
                               "poisoned_utility": "share of triggered inputs (%)"}
#: Short x labels of the Table 3 ablations.
ABLATION_LABELS: dict[str, str] = {"none": "No\ndefense", "full": "Full\nCleanSight\n(all layers)",
                                   "no_detection": "No detection\n(prune all\ninputs)",
                                   "random_pruning": "Random 90 %\npruning"}
#: Two-line titles of the heatmap panels (narrow columns).
HEATMAP_TITLES: dict[str, str] = {"asr": "Attack success rate\n(ASR, %)", "clean_utility": "Clean utility\n(CU, %)",
                                  "poisoned_utility": "Poisoned utility\n(PU, %)", "tpr": "Detection\n(TPR / FPR, %)",
                                  "fpr": "False-positive rate\n(FPR, %)", "auroc": "Detection AUROC\n(%)"}
#: Colour maps of the heatmap panels (ASR: red = the backdoor works; utilities: green = answers right).
METRIC_CMAPS: dict[str, str] = {"asr": "Reds", "clean_utility": "Greens", "poisoned_utility": "Greens",
                                "tpr": "Purples"}
_REQUIRED = ("attack", "defense", "asr", "clean_utility")


def _check(table: "pd.DataFrame", columns: Sequence[str], owner: str) -> None:
    import pandas as pd

    if not isinstance(table, pd.DataFrame) or table.empty:
        raise InputError(f"{owner}: expected a non-empty tidy DataFrame")
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise InputError(f"{owner}: the table lacks column(s) {missing}")


def attack_label(name: str) -> str:
    return ATTACK_LABELS.get(str(name), str(name))


def defense_label(name: str, labels: Mapping[str, str] | None = None) -> str:
    return {**DEFENSE_LABELS, **(labels or {})}.get(str(name), str(name))


def _pct(v: float, digits: int = 0) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * float(v):.{digits}f}"


def _wrap(text: str, fig: Any) -> str:
    """``text`` wrapped to the figure's width (9 pt footnotes: ~13 characters per inch), lines kept."""
    width = max(40, int(fig.get_figwidth() * 13))
    return "\n".join(textwrap.fill(line, width) for line in text.split("\n"))


def _n_text(table: "pd.DataFrame") -> str:
    parts = []
    if "n" in table.columns and table["n"].notna().any():
        parts.append(f"n = {int(table['n'].max())} test inputs per condition")
    if "n_val" in table.columns and table["n_val"].notna().any() and table["n_val"].max() > 0:
        parts.append(f"{int(table['n_val'].max())} clean calibration inputs")
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------
# Tables 1/2
# ---------------------------------------------------------------------------------------------


def plot_attack_defense(table: "pd.DataFrame", *, metrics: Sequence[str] = ("asr", "clean_utility", "poisoned_utility",
                                                                           "tpr"),
                        labels: Mapping[str, str] | None = None, title: str | None = None,
                        note: str | None = None) -> Any:
    """Tables 1/2 as annotated heatmaps: one panel per metric, rows defenses, columns attacks (values in %).

    Args:
        table: tidy rows (``attack``, ``defense`` and the metric columns; ``kind`` optional).
        metrics: panels; ``"tpr"`` draws the detection panel, annotated ``TPR / FPR`` (``-`` for
            defenses that do not detect).
        labels: extra display names of defenses.
        title, note: figure title and a footnote (e.g. the paper's numbers).

    Returns:
        the Figure (one Axes per metric; row labels on the first).
    """
    import matplotlib.pyplot as plt

    _check(table, [*_REQUIRED, *metrics, *(["fpr"] if "tpr" in metrics else [])], "plot_attack_defense")
    set_style()
    defenses = list(dict.fromkeys(table["defense"]))
    attacks = list(dict.fromkeys(table["attack"]))
    width = max(1.3, 0.62 * len(attacks) + 0.5)
    fig, axes = plt.subplots(1, len(metrics), figsize=(2.6 + width * len(metrics), 0.42 * len(defenses) + 2.0),
                             sharey=True, squeeze=False)
    axes = axes[0]
    cells = table.set_index(["defense", "attack"])
    for ax, metric in zip(axes, metrics):
        values = np.array([[cells[metric].get((d, a), np.nan) for a in attacks] for d in defenses], dtype=float)
        cmap = plt.get_cmap(METRIC_CMAPS.get(metric, "Greys")).with_extremes(bad="#f2f2f2")
        ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
        for i, d in enumerate(defenses):
            for j, a in enumerate(attacks):
                v = values[i, j]
                if metric == "tpr":
                    text = "-" if math.isnan(v) else f"{_pct(v)} / {_pct(cells['fpr'].get((d, a), np.nan))}"
                else:
                    text = _pct(v)
                dark = not math.isnan(v) and v > 0.6
                ax.text(j, i, text, ha="center", va="center", fontsize=9.5 if metric != "tpr" else 8.5,
                        color="white" if dark else "#222222")
        ax.set_xticks(range(len(attacks)), [attack_label(a) for a in attacks], rotation=30 if len(attacks) > 3 else 0,
                      ha="right" if len(attacks) > 3 else "center")
        ax.set_yticks(range(len(defenses)), [defense_label(d, labels) for d in defenses])
        ax.set_title(HEATMAP_TITLES.get(metric, metric), fontsize=10.5)
        ax.tick_params(length=0, labelsize=10)
        for spine in ax.spines.values():
            spine.set_visible(False)
        if "kind" in table.columns:
            kinds = table.drop_duplicates("defense").set_index("defense")["kind"]
            seq = [kinds.get(d) for d in defenses]
            for i in range(1, len(seq)):
                if seq[i] != seq[i - 1]:
                    ax.axhline(i - 0.5, color="white", lw=3)
    n_text = _n_text(table)
    fig.suptitle(title or "Tables 1/2: attacks x defenses" + (f" ({n_text})" if n_text else ""), fontsize=12,
                 fontweight="bold")
    if note:
        fig.text(0.01, -0.01, _wrap(note, fig), fontsize=9, ha="left", va="top", color="#444444")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# Tables 3 and 4: grouped bars
# ---------------------------------------------------------------------------------------------


def _bars(ax: Any, table: "pd.DataFrame", metric: str, groups: Sequence[str], group_col: str,
          hues: Sequence[str], hue_col: str, colors: Mapping[str, str], hue_names: Mapping[str, str],
          group_names: Mapping[str, str]) -> None:
    n_h = len(hues)
    width = 0.8 / max(n_h, 1)
    cells = table.set_index([group_col, hue_col])[metric]
    for k, h in enumerate(hues):
        xs = np.arange(len(groups)) + (k - (n_h - 1) / 2) * width
        ys = [cells.get((g, h), np.nan) for g in groups]
        bars = ax.bar(xs, [0 if math.isnan(y) else 100 * y for y in ys], width * 0.92, color=colors.get(h, "#888888"),
                      label=hue_names.get(h, h), edgecolor="white", linewidth=0.6)
        for b, y in zip(bars, ys):
            ax.text(b.get_x() + b.get_width() / 2, b.get_height() + 1.5, _pct(y), ha="center", va="bottom",
                    fontsize=8.5, color="#222222")
    ax.set_xticks(range(len(groups)), [group_names.get(g, g) for g in groups], fontsize=9.5)
    ax.set_ylim(0, 112)
    ax.set_yticks([0, 25, 50, 75, 100])
    ax.set_ylabel(AXIS_LABELS.get(metric, metric))
    ax.set_title(METRIC_LABELS.get(metric, metric), fontsize=10.5)
    ax.grid(axis="y", color="#e6e6e6", lw=0.8)
    ax.set_axisbelow(True)


def plot_module_ablation(table: "pd.DataFrame", *, metrics: Sequence[str] = ("asr", "clean_utility"),
                         labels: Mapping[str, str] | None = None, title: str | None = None,
                         note: str | None = None) -> Any:
    """Table 3 as grouped bars: one panel per metric, x = ablation (table order), one bar per attack.

    Returns:
        the Figure (one Axes per metric, a shared legend of attacks).
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    _check(table, [*_REQUIRED, *metrics], "plot_module_ablation")
    set_style()
    variants = list(dict.fromkeys(table["defense"]))
    attacks = list(dict.fromkeys(table["attack"]))
    palette = dict(zip(attacks, sns.color_palette("deep", len(attacks)).as_hex()))
    names = {v: (labels or {}).get(v) or ABLATION_LABELS.get(v) or "\n".join(textwrap.wrap(defense_label(v), 16))
             for v in variants}
    fig, axes = plt.subplots(1, len(metrics), figsize=(max(5.0, 0.9 * len(variants) + 0.25 * len(attacks) * len(variants))
                                                       * len(metrics), 4.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        _bars(ax, table, metric, variants, "defense", attacks, "attack", palette,
              {a: attack_label(a) for a in attacks}, names)
    handles, texts = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, texts, title="attack", loc="upper right", bbox_to_anchor=(1.0, 0.93), fontsize=9.5,
               frameon=False)
    n_text = _n_text(table)
    fig.suptitle(title or "Table 3: CleanSight module ablation" + (f" ({n_text})" if n_text else ""), fontsize=12,
                 fontweight="bold")
    if note:
        fig.text(0.01, -0.01, _wrap(note, fig), fontsize=9, ha="left", va="top", color="#444444")
    fig.tight_layout(rect=(0, 0, 0.9 if len(attacks) > 1 else 0.92, 1))
    return fig


def member_label(member: str, attack: str, mode: Any = None, seed: Any = None) -> str:
    """``"BadNet\\nbadnet-lora\\nLoRA, seed 1"`` for Table 4's x axis."""
    bits = [str(mode).replace("lora", "LoRA")] if mode not in (None, "") and not _isnan(mode) else []
    if seed is not None and not _isnan(seed):
        bits.append(f"seed {int(seed)}")
    return "\n".join([attack_label(attack), member] + ([", ".join(bits)] if bits else []))


def _isnan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


def plot_adapter_lora(table: "pd.DataFrame", attempts: "pd.DataFrame | None" = None, *,
                      metrics: Sequence[str] = ("asr", "clean_utility"), labels: Mapping[str, str] | None = None,
                      title: str | None = None, note: str | None = None) -> Any:
    """Table 4 as grouped bars: x = family member (attack, member, training mode, seed), one bar per defense.

    Args:
        table: tidy rows with ``member`` (and optionally ``mode``, ``replicate_seed``).
        attempts: the training-attempts table (``member, mode, steps, asr, clean_acc, kept``); attempts
            whose mode was not kept are listed under the figure (why their rows are absent).

    Returns:
        the Figure (one Axes per metric, a shared legend of defenses).
    """
    import matplotlib.pyplot as plt

    _check(table, [*_REQUIRED, "member", *metrics], "plot_adapter_lora")
    set_style()
    attack_order = {a: i for i, a in enumerate(dict.fromkeys(table["attack"]))}
    first = table.drop_duplicates("member").set_index("member")
    members = sorted(dict.fromkeys(table["member"]), key=lambda m: (attack_order[first.loc[m, "attack"]], m))
    names = {m: member_label(m, first.loc[m, "attack"], first["mode"].get(m) if "mode" in first else None,
                             first["replicate_seed"].get(m) if "replicate_seed" in first else None) for m in members}
    defenses = list(dict.fromkeys(table["defense"]))
    fig, axes = plt.subplots(1, len(metrics), figsize=(max(4.6, 1.15 * len(members) + 1.2) * len(metrics), 4.6),
                             squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        _bars(ax, table, metric, members, "member", defenses, "defense", DEFENSE_COLORS,
              {d: defense_label(d, labels) for d in defenses}, names)
    handles, texts = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, texts, loc="upper center", bbox_to_anchor=(0.5, 0.94), ncol=len(defenses), fontsize=9.5,
               frameon=False)
    lines = []
    if attempts is not None and len(attempts) and "kept" in attempts.columns:
        for _, a in attempts[~attempts["kept"].astype(bool)].iterrows():
            lines.append(f"{a['member']}: {a['mode']}-only training ({a.get('steps')} steps) planted no backdoor "
                         f"(ASR {_pct(a.get('asr'), 1)} %, clean accuracy {_pct(a.get('clean_acc'), 1)} %): no "
                         f"{a['mode']} model was kept, so its rows are absent.")
    text = "\n".join(filter(None, [note, *lines]))
    n_text = _n_text(table)
    fig.suptitle(title or "Table 4: backdoor training modes (projector-only vs LoRA)" + (f" ({n_text})" if n_text else ""),
                 fontsize=12, fontweight="bold", y=1.0)
    if text:
        fig.text(0.01, -0.01, _wrap(text, fig), fontsize=9, ha="left",
                 va="top", color="#444444")
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    return fig


# ---------------------------------------------------------------------------------------------
# Styled tables
# ---------------------------------------------------------------------------------------------


def styled_table(table: "pd.DataFrame", *, index: str = "attack", metrics: Sequence[str] = ("asr", "clean_utility"),
                 labels: Mapping[str, str] | None = None, caption: str | None = None) -> Any:
    """The paper's layout as a pandas Styler: rows ``index``, columns (defense, metric), values in %.

    ASR cells are shaded red (high = backdoor works), utility cells green, detection cells purple.
    """
    import pandas as pd

    _check(table, [index, "defense", *metrics], "styled_table")
    defenses = list(dict.fromkeys(table["defense"]))
    rows = list(dict.fromkeys(table[index]))
    short = {"asr": "ASR", "clean_utility": "CU", "poisoned_utility": "PU", "tpr": "TPR", "fpr": "FPR",
             "auroc": "AUROC"}
    cells = table.set_index(["defense", index])
    data = {(defense_label(d, labels), short.get(m, m)): [cells[m].get((d, r), float("nan")) for r in rows]
            for d in defenses for m in metrics}
    row_names = [attack_label(r) if index == "attack" else str(r) for r in rows]
    frame = pd.DataFrame(data, index=pd.Index(row_names, name=index))
    frame.columns = pd.MultiIndex.from_tuples(frame.columns, names=["defense", "metric"])
    styler = frame.style.format(lambda v: "n/a" if pd.isna(v) else f"{100 * v:.1f} %")
    cmaps = {"ASR": "Reds", "CU": "Greens", "PU": "Greens", "TPR": "Purples", "FPR": "Oranges", "AUROC": "Purples"}
    for m in metrics:
        cols = [c for c in frame.columns if c[1] == short.get(m, m)]
        styler = styler.background_gradient(cmap=cmaps.get(short.get(m, m), "Greys"), subset=cols, vmin=0, vmax=1)
    if caption:
        styler = styler.set_caption(caption)
    return styler


__all__ = ["ATTACK_LABELS", "DEFENSE_COLORS", "DEFENSE_LABELS", "METRIC_LABELS", "attack_label", "defense_label",
           "member_label", "plot_adapter_lora", "plot_attack_defense", "plot_module_ablation", "styled_table"]
