"""Detection figures (the paper's Figs. 3, 4, 5), drawn from the tables of
:mod:`cleansight_analysis.experiments.detection`. Nothing here touches a model."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..experiments.detection import summarize_val_size
from .style import set_style

#: How attacks are named in titles and legends.
ATTACK_LABELS = {"badnet": "BadNet", "blended": "Blended", "sig": "SIG", "wanet": "WaNet", "issba": "ISSBA",
                 "trojvlm": "TrojVLM", "vlood": "VLOOD", "badnet-lora": "BadNet (LoRA)",
                 "blended-lora": "Blended (LoRA)"}
#: Line colours: head-specific vector vs head-averaged scalar (Fig. 3).
SCORE_COLORS = {"vector": "#1d3557", "mean": "#e76f51"}
#: Shading of the detection layers chosen by the fusion-onset scan.
DETECTION_SHADE = "#f4d58d"
#: Held-out TPR of the trigger-visibility probe (at its FPR) below which a trigger counts as hard for the projector
#: to see: the rate issue 13 asks of the weakest planted backdoor (WaNet: ASR >= 0.90 with <= 1 % false triggers).
VISIBLE_TPR = 0.9
#: The paper's Fig. 5 reading (BadNet, LLaVA-1.5-7B, |D_val| = 200, q = 0.99).
PAPER_FIG5 = {"quantile": 0.99, "n_val": 200, "tpr": 1.00, "fpr": 0.03, "fpr_at_10": 0.20}


def attack_label(attack: str) -> str:
    """Display name of an attack (``"badnet" -> "BadNet"``; unknown names unchanged)."""
    return ATTACK_LABELS.get(str(attack), str(attack))


def _attack_colors(attacks: Sequence[str]) -> dict[str, Any]:
    import seaborn as sns

    palette = sns.color_palette("colorblind", max(3, len(attacks)))
    return {a: palette[i] for i, a in enumerate(attacks)}


def _require(table: Any, columns: Sequence[str], owner: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(f"{owner}: the table lacks column(s) {missing}")
    if table.empty:
        raise ValueError(f"{owner}: the table is empty")


def _layer_span(layers: Sequence[int]) -> str:
    layers = sorted(int(x) for x in layers)
    if not layers:
        return "none"
    if layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 1:
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers))


def _shade_layers(ax: Any, layers: Sequence[int], label: str | None = None) -> None:
    for i, layer in enumerate(sorted(int(x) for x in layers)):
        ax.axvspan(layer - 0.5, layer + 0.5, color=DETECTION_SHADE, alpha=0.6, lw=0, zorder=0,
                   label=label if i == 0 else None)


# ---------------------------------------------------------------------------------------------
# Fig. 3
# ---------------------------------------------------------------------------------------------


def plot_layerwise_detection(table: Any, onset: Any = None, *, title: str | None = None):
    """Fig. 3: per-layer AUROC of the head-specific vector and of the head-averaged scalar, per attack.

    Args:
        table: ``attack, layer, auroc_head_vector, auroc_head_mean`` and optionally ``detection_layer``
            (bool; shaded) and ``n_clean_test, n_poisoned_test`` (shown in the title).
        onset: optional fusion-onset table (``attack, layer, relative_effect, detection_layer,
            onset_fraction``) drawn as a bar row under each panel.

    Returns:
        the Figure: one column per attack; top row AUROC (0-1, chance line at 0.5), bottom row (with
        ``onset``) the effect of blocking image attention in each layer, relative to the largest.
    """
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    owner = "plot_layerwise_detection"
    _require(table, ("attack", "layer", "auroc_head_vector", "auroc_head_mean"), owner)
    set_style()
    attacks = list(dict.fromkeys(table["attack"]))
    n_rows = 1 if onset is None else 2
    width = 4.0 if len(attacks) <= 3 else 3.1  # six attacks stay within a page-wide figure
    fig, axes = plt.subplots(n_rows, len(attacks), figsize=(1.0 + width * len(attacks), 4.0 if n_rows == 1 else 5.6),
                             sharex="col", squeeze=False,
                             gridspec_kw={"height_ratios": [3.0, 1.25][:n_rows], "hspace": 0.12})
    for j, attack in enumerate(attacks):
        sub = table[table["attack"] == attack].sort_values("layer")
        ax = axes[0, j]
        shaded = sub.loc[sub["detection_layer"].astype(bool), "layer"] if "detection_layer" in sub else []
        _shade_layers(ax, shaded, "detection layers (fusion onset)")
        ax.axhline(0.5, color="0.45", ls="--", lw=1.2, label="chance (0.5)")
        ax.plot(sub["layer"], sub["auroc_head_vector"], "-o", color=SCORE_COLORS["vector"], lw=2, ms=5,
                label="head-specific vector (whitened distance)")
        ax.plot(sub["layer"], sub["auroc_head_mean"], "-s", color=SCORE_COLORS["mean"], lw=1.8, ms=5,
                label="head-averaged scalar")
        ax.set_ylim(0, 1.03)
        ax.set_xlim(sub["layer"].min() - 0.5, sub["layer"].max() + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=min(len(sub), 12)))
        n_text = ""
        if {"n_clean_test", "n_poisoned_test"} <= set(sub.columns):
            n_text = f"\n({int(sub['n_clean_test'].iloc[0])} clean vs {int(sub['n_poisoned_test'].iloc[0])} triggered)"
        ax.set_title(f"{attack_label(attack)}{n_text}", fontsize=12)
        ax.set_ylabel("AUROC (triggered vs clean)" if j == 0 else "")
        if j:
            ax.tick_params(labelleft=False)
        if onset is None:
            ax.set_xlabel("LM layer (0-indexed)")
            continue
        bx = axes[1, j]
        on = onset[onset["attack"] == attack].sort_values("layer")
        colors = np.where(on["detection_layer"].astype(bool), "#b5838d", "0.7")
        bx.bar(on["layer"], on["relative_effect"], color=colors, width=0.7)
        if "onset_fraction" in on and len(on):
            bx.axhline(float(on["onset_fraction"].iloc[0]), color="0.3", ls=":", lw=1.2)
        bx.set_ylim(0, 1.08)
        bx.set_yticks([0, 0.5, 1])
        bx.set_xlabel("LM layer (0-indexed)")
        bx.set_ylabel("fusion effect\n(of max)" if j == 0 else "")
        if j:
            bx.tick_params(labelleft=False)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if onset is not None:
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch

        handles += [Patch(color="#b5838d"), Line2D([], [], color="0.3", ls=":")]
        labels += ["fusion effect of a chosen layer (bottom)", "onset threshold (bottom)"]
    fig.legend(handles, labels, loc="lower center", ncol=3, frameon=False, fontsize=10, bbox_to_anchor=(0.5, 0.0))
    fig.suptitle(title or "Per-layer detection AUROC: head-specific stealing vector vs head average",
                 fontweight="bold", y=1.0)
    fig.subplots_adjust(bottom=0.22 if onset is not None else 0.28, top=0.86, wspace=0.08)
    return fig


def plot_trigger_visibility(table: Any, *, title: str | None = None):
    """Can the projector see each trigger? The probe of ``trigger_visibility_table``, one bar per attack.

    Args:
        table: ``attack, auroc, tpr, fpr_target, feature_change`` and optionally ``n_train, n_test`` (in the title).

    Returns:
        the Figure: left, the probe's held-out AUROC (chance 0.5); right, the share of triggered images it flags
        at the table's FPR, with the line at :data:`VISIBLE_TPR`; bars below that line are drawn in the warning
        colour, and each bar carries its value and the trigger's relative feature change.
    """
    import matplotlib.pyplot as plt

    _require(table, ("attack", "auroc", "tpr", "fpr_target", "feature_change"), "plot_trigger_visibility")
    set_style()
    rows = table.reset_index(drop=True)
    labels = [attack_label(a) for a in rows["attack"]]
    y = np.arange(len(rows))[::-1]
    hidden = rows["tpr"].to_numpy() < VISIBLE_TPR
    colors = np.where(hidden, "#e76f51", SCORE_COLORS["vector"])
    fpr = 100 * float(rows["fpr_target"].iloc[0])
    fig, (ax_auc, ax_tpr) = plt.subplots(1, 2, figsize=(10.5, 1.2 + 0.55 * len(rows)), sharey=True)
    ax_auc.barh(y, rows["auroc"], color=colors, height=0.6)
    ax_auc.axvline(0.5, color="0.45", ls="--", lw=1.2)
    ax_auc.set_xlim(0.4, 1.05)
    ax_auc.set_xlabel("probe AUROC, triggered vs clean (held out)")
    ax_tpr.barh(y, rows["tpr"], color=colors, height=0.6)
    ax_tpr.axvline(VISIBLE_TPR, color="0.3", ls=":", lw=1.4)
    ax_tpr.text(VISIBLE_TPR, y.max() + 0.55, f"{100 * VISIBLE_TPR:.0f} % (a planted backdoor's rate)", va="bottom",
                ha="center", fontsize=9, color="0.3")
    ax_tpr.set_xlim(0, 1.18)
    ax_tpr.set_xlabel(f"triggered images flagged at FPR {fpr:.0f} %")
    for yi, (_, r) in zip(y, rows.iterrows()):
        ax_auc.text(float(r["auroc"]) + 0.005, yi, f"{r['auroc']:.2f}", va="center", fontsize=9)
        ax_tpr.text(float(r["tpr"]) + 0.01, yi, f"{100 * r['tpr']:.0f} %  (feature change {r['feature_change']:.2f})",
                    va="center", fontsize=9)
    ax_auc.set_yticks(y, labels)
    n_text = ""
    if {"n_train", "n_test"} <= set(rows.columns):
        n_text = f" ({int(rows['n_train'].iloc[0])} images to fit, {int(rows['n_test'].iloc[0])} held out)"
    fig.suptitle(title or f"Can the projector see the trigger? A linear probe on the frozen tower's features{n_text}",
                 fontweight="bold", fontsize=11)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# Fig. 4
# ---------------------------------------------------------------------------------------------


def plot_layer_window_sweep(table: Any, *, title: str | None = None, annotate: bool | None = None):
    """Fig. 4: AUROC of the detector vs start layer and window length, one heatmap per attack.

    Args:
        table: ``attack, start, length, auroc`` and optionally ``detector_choice`` / ``best`` (bool;
            outlined: solid black = the fusion-onset window, dashed green = the best window).
        annotate: write the AUROC in each cell (default: at most 12 start layers).

    Returns:
        the Figure; cells of windows that run past the last layer stay empty.
    """
    import matplotlib.pyplot as plt
    import seaborn as sns
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch, Rectangle

    owner = "plot_layer_window_sweep"
    _require(table, ("attack", "start", "length", "auroc"), owner)
    set_style()
    attacks = list(dict.fromkeys(table["attack"]))
    starts = sorted(table["start"].unique())
    lengths = sorted(table["length"].unique())
    if annotate is None:
        annotate = len(starts) <= 12 and len(lengths) <= 12
    height = 1.6 + 0.42 * len(starts)
    fig, axes = plt.subplots(1, len(attacks) + 1, figsize=(0.6 + (0.55 * len(lengths) + 0.9) * len(attacks), height),
                             squeeze=False, gridspec_kw={"width_ratios": [1.0] * len(attacks) + [0.05]})
    axes, cax = axes[0, :-1], axes[0, -1]
    for j, attack in enumerate(attacks):
        ax = axes[j]
        sub = table[table["attack"] == attack]
        grid = sub.pivot_table(index="start", columns="length", values="auroc", aggfunc="first")
        grid = grid.reindex(index=starts, columns=lengths)
        sns.heatmap(grid, ax=ax, vmin=0, vmax=1, center=0.5, cmap="vlag", annot=annotate, fmt=".2f",
                    annot_kws={"size": 9}, linewidths=0.5, linecolor="white", cbar=j == len(attacks) - 1,
                    cbar_ax=cax if j == len(attacks) - 1 else None,
                    cbar_kws={"label": "AUROC (triggered vs clean)"})
        for flag, style in (("detector_choice", dict(ec="black", lw=2.4, ls="-")),
                            ("best", dict(ec="#2a9d8f", lw=2.0, ls="--"))):
            if flag not in sub:
                continue
            pad = 0.06 if flag == "detector_choice" else 0.16
            for rec in sub[sub[flag].astype(bool)].itertuples():
                y, x = starts.index(rec.start), lengths.index(rec.length)
                ax.add_patch(Rectangle((x + pad, y + pad), 1 - 2 * pad, 1 - 2 * pad, fill=False, zorder=5, **style))
        ax.set_title(attack_label(attack), fontsize=12)
        ax.set_xlabel("window length (layers)")
        ax.set_ylabel("start layer (0-indexed)" if j == 0 else "")
        ax.tick_params(axis="y", rotation=0)
        if j:
            ax.set_yticklabels([])
            ax.tick_params(axis="y", left=False)
    handles = [Patch(fill=False, ec="black", lw=2.4, label="detector's window (fusion onset, clean only)"),
               Line2D([], [], color="#2a9d8f", lw=2.0, ls="--", label="best window (oracle)")]
    fig.legend(handles=handles, loc="lower center", ncol=2, frameon=False, fontsize=10, bbox_to_anchor=(0.5, -0.02))
    fig.suptitle(title or "Detection AUROC vs detection window (start layer x window length)",
                 fontweight="bold", y=0.99)
    fig.subplots_adjust(bottom=0.2, top=0.86, wspace=0.08)
    return fig


# ---------------------------------------------------------------------------------------------
# Fig. 5
# ---------------------------------------------------------------------------------------------


def plot_threshold_and_val_size(quantiles: Any, val_sizes: Any, *, paper: bool = True, title: str | None = None):
    """Fig. 5: TPR / FPR vs the threshold quantile ``q`` (left) and vs ``|D_val|`` (right).

    Args:
        quantiles: ``attack, quantile, tpr, fpr`` and optionally ``choice`` / ``layers`` (one row of
            panels per ``choice``, the layers named in the legend).
        val_sizes: ``attack, n_val, tpr, fpr`` (one row per random subset; mean line, min-max band)
            and optionally ``choice`` / ``layers``; or the output of ``summarize_val_size``.
        paper: mark the paper's reading (BadNet on LLaVA-1.5-7B: TPR 100 %, FPR 3 % at q = 0.99 with
            200 samples; FPR < 20 % with 10 samples) as black stars / a triangle.

    Returns:
        the Figure: rows = layer choices, columns = (vs q, vs |D_val|); TPR solid, FPR dashed,
        one colour per attack.
    """
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FixedLocator, NullLocator, PercentFormatter

    owner = "plot_threshold_and_val_size"
    _require(quantiles, ("attack", "quantile", "tpr", "fpr"), owner)
    _require(val_sizes, ("attack", "n_val"), owner)
    set_style()
    if "tpr_mean" not in val_sizes.columns:
        val_sizes = summarize_val_size(val_sizes)
    quantiles = quantiles.assign(choice=quantiles["choice"] if "choice" in quantiles else "")
    val_sizes = val_sizes.assign(choice=val_sizes["choice"] if "choice" in val_sizes else "")
    choices = list(dict.fromkeys(quantiles["choice"]))
    attacks = list(dict.fromkeys(quantiles["attack"]))
    colors = _attack_colors(attacks)
    fig, axes = plt.subplots(len(choices), 2, figsize=(12.5, 0.6 + 3.7 * len(choices)), squeeze=False,
                             sharey=True)
    for i, choice in enumerate(choices):
        ax_q, ax_n = axes[i]
        qs = quantiles[quantiles["choice"] == choice]
        ns = val_sizes[val_sizes["choice"] == choice]
        legend = []
        for attack in attacks:
            c = colors[attack]
            q = qs[qs["attack"] == attack].sort_values("quantile")
            n = ns[ns["attack"] == attack].sort_values("n_val")
            ax_q.plot(q["quantile"], q["tpr"], "-o", color=c, lw=2, ms=5)
            ax_q.plot(q["quantile"], q["fpr"], "--s", color=c, lw=1.6, ms=4.5)
            if len(n):
                ax_n.plot(n["n_val"], n["tpr_mean"], "-o", color=c, lw=2, ms=5)
                ax_n.plot(n["n_val"], n["fpr_mean"], "--s", color=c, lw=1.6, ms=4.5)
                for m in ("tpr", "fpr"):
                    ax_n.fill_between(n["n_val"], n[f"{m}_min"], n[f"{m}_max"], color=c, alpha=0.1, lw=0)
            layers = ""
            if "layers" in q and len(q):
                span = str(q["layers"].iloc[0]).split(",")
                layers = f" (layer{'s' if len(span) > 1 else ''} {_layer_span(span)})"
            legend.append(Line2D([], [], color=c, lw=6, alpha=0.8, label=f"{attack_label(attack)}{layers}"))
        qgrid = np.linspace(float(qs["quantile"].min()), 1.0, 50)
        ax_q.plot(qgrid, 1 - qgrid, ":", color="0.4", lw=1.3)
        if paper:
            for ax, x in ((ax_q, PAPER_FIG5["quantile"]), (ax_n, PAPER_FIG5["n_val"])):
                ax.plot([x, x], [PAPER_FIG5["tpr"], PAPER_FIG5["fpr"]], "*", color="black", ms=13, zorder=6)
            ax_n.plot([10], [PAPER_FIG5["fpr_at_10"]], "v", color="black", ms=9, zorder=6)
        ax_q.set_xlabel("threshold quantile q of the clean validation distances")
        ax_n.set_xlabel("clean validation samples |D_val| (log scale)")
        ax_n.set_xscale("log")
        ticks = sorted(int(x) for x in ns["n_val"].unique()) if len(ns) else [1]
        ax_n.xaxis.set_major_locator(FixedLocator(ticks))
        ax_n.xaxis.set_minor_locator(NullLocator())
        ax_n.set_xticklabels([str(t) for t in ticks])
        for ax in (ax_q, ax_n):
            ax.set_ylim(-0.03, 1.03)
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax_q.set_ylabel("rate on test inputs")
        row = f"detection layers: {choice}" if choice else ""
        ax_q.set_title(f"vs threshold quantile (|D_val| = {int(qs['n_val'].max())})" if "n_val" in qs
                       else "vs threshold quantile", fontsize=11)
        q_used = f" (q = {float(ns['quantile'].iloc[0]):g})" if "quantile" in ns and len(ns) else ""
        ax_n.set_title(f"vs validation-set size{q_used}", fontsize=11)
        if row:
            ax_q.annotate(row, xy=(0, 1.14), xycoords="axes fraction", fontsize=11.5, fontweight="bold")
        ax_n.legend(handles=legend, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, fontsize=10,
                    title="attack (TPR solid, FPR dashed)", title_fontsize=10)
    keys = [Line2D([], [], color="0.2", ls="-", marker="o", label="TPR (triggered flagged)"),
            Line2D([], [], color="0.2", ls="--", marker="s", label="FPR (clean flagged)"),
            Line2D([], [], color="0.4", ls=":", label="1 - q (FPR if test = validation)")]
    if paper:
        keys += [Line2D([], [], color="black", ls="", marker="*", ms=12, label="paper: TPR 100 %, FPR 3 %"),
                 Line2D([], [], color="black", ls="", marker="v", ms=8, label="paper: FPR < 20 % at 10 samples")]
    fig.legend(handles=keys, loc="lower center", ncol=3, frameon=False, fontsize=10, bbox_to_anchor=(0.45, -0.01))
    fig.suptitle(title or "Detection rates vs threshold quantile and validation-set size", fontweight="bold", y=1.0)
    fig.subplots_adjust(bottom=0.1 + 0.06 / len(choices) + 0.04, hspace=0.55, wspace=0.08, right=0.8)
    return fig


__all__ = ["ATTACK_LABELS", "PAPER_FIG5", "VISIBLE_TPR", "attack_label", "plot_layer_window_sweep",
           "plot_layerwise_detection", "plot_threshold_and_val_size", "plot_trigger_visibility"]
