"""Fig. 6: ASR, poisoned utility and pruned share of the image vs the pruning threshold tau (oracle detector)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from ..errors import InputError
from ..experiments.pruning import PAPER_TAUS
from .style import set_style

#: Line styles of CleanSight's mask scopes (``CleanSightConfig.mask_scope``).
SCOPE_STYLES = {"reference": "-", "from_detection": "-.", "prefill_only": ":", "all_layers": "--"}
#: Legend wording of the mask scopes.
SCOPE_LABELS = {"reference": "mask from l_e (default)", "from_detection": "mask from l_e (decode too)",
                "prefill_only": "mask from l_e, prefill only", "all_layers": "mask every layer"}


def attack_colors(attacks: Sequence[str]) -> dict[str, Any]:
    """One colour per attack (seaborn ``colorblind``; BadNet and Blended keep the first two everywhere)."""
    import seaborn as sns

    order = ["badnet", "blended", "sig", "wanet", "trojvlm", "vlood"]
    names = list(dict.fromkeys([a for a in order if a in attacks] + list(attacks)))
    palette = sns.color_palette("colorblind", max(len(order), len(names)) + 1)
    fixed = {a: palette[i] for i, a in enumerate(order)}
    extra = iter(palette[len(order):] + sns.color_palette("dark", len(names)))
    return {a: fixed[a] if a in fixed else next(extra) for a in names}


def _check(table: Any, columns: Sequence[str], owner: str) -> None:
    missing = [c for c in columns if c not in getattr(table, "columns", [])]
    if missing:
        raise InputError(f"{owner}: the table lacks column(s) {missing}")
    if len(table) == 0:
        raise InputError(f"{owner}: the table is empty")


def plot_pruning_threshold(table: Any, *, paper_taus: Mapping[str, float] | None = None,
                           title: str | None = None):
    """Three panels over a log tau axis: ASR, poisoned utility and share of image tokens pruned.

    Args:
        table: :func:`~cleansight_analysis.experiments.pruning.pruning_threshold_table` rows (columns
            ``attack, mask_scope, tau, is_auto, asr, poisoned_utility, pruned_share``). One line per
            attack (colour) and mask scope (line style); the calibrated tau (``is_auto``) is a star.
        paper_taus: ``{label: tau}`` drawn as grey vertical lines (default: the paper's values).
        title: figure title.

    Returns:
        the matplotlib Figure (axes titled "Attack success rate", "Poisoned utility", "Image tokens pruned").
    """
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    _check(table, ("attack", "mask_scope", "tau", "is_auto", "asr", "poisoned_utility", "pruned_share"),
           "plot_pruning_threshold")
    if (table["tau"] <= 0).any():
        raise InputError("plot_pruning_threshold: tau must be > 0 on a log axis")
    paper_taus = PAPER_TAUS if paper_taus is None else paper_taus
    set_style()
    attacks = list(dict.fromkeys(table["attack"]))
    scopes = list(dict.fromkeys(table["mask_scope"]))
    colors = attack_colors(attacks)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), sharex=True)
    panels = [("asr", "Attack success rate", "ASR (share of triggered inputs)"),
              ("poisoned_utility", "Poisoned utility", "accuracy on triggered inputs"),
              ("pruned_share", "Image tokens pruned", "share of image tokens masked")]
    n_lines = len(table.groupby(["attack", "mask_scope"]))
    jitter = {key: 1.0 + 0.035 * (i - (n_lines - 1) / 2) for i, key in
              enumerate(table.groupby(["attack", "mask_scope"], sort=False).groups)}
    for ax, (col, name, ylabel) in zip(axes, panels):
        for (attack, scope), sub in table.groupby(["attack", "mask_scope"], sort=False):
            sub = sub.sort_values("tau")
            x = sub["tau"] * (jitter[(attack, scope)] if col != "pruned_share" else 1.0)
            style = SCOPE_STYLES.get(scope, "-")
            ax.plot(x, sub[col], style, marker="o", ms=4, lw=1.8, color=colors[attack], alpha=0.9)
            auto = sub["is_auto"].astype(bool).to_numpy()
            ax.plot(x[auto], sub[col][auto], "*", ms=14, color=colors[attack], mec="black", mew=0.7, zorder=5)
        for label, tau in paper_taus.items():
            ax.axvline(tau, color="0.55", ls=":", lw=1.1, zorder=0)
        ax.set_xscale("log")
        ax.set_ylim(-0.04, 1.04)
        ax.set_title(name)
        ax.set_ylabel(ylabel)
        ax.set_xlabel("pruning threshold tau (log scale; smaller = more pruned)")
        ax.grid(axis="y", color="0.9", lw=0.8)
    handles = [Line2D([], [], color=colors[a], lw=2.2, marker="o", ms=4, label=a) for a in attacks]
    if len(scopes) > 1 or scopes != ["reference"]:
        for s in scopes:
            shown = list(dict.fromkeys(table.loc[table["mask_scope"] == s, "attack"]))
            label = SCOPE_LABELS.get(s, s) + (f" ({', '.join(shown)})" if len(shown) < len(attacks) else "")
            handles.append(Line2D([], [], color="0.3", ls=SCOPE_STYLES.get(s, "-"), lw=1.8, label=label))
    handles.append(Line2D([], [], ls="", marker="*", ms=13, color="0.5", mec="black", label="calibrated tau (auto)"))
    if paper_taus:
        named = ", ".join(f"{tau:g} ({label})" for label, tau in paper_taus.items())
        handles.append(Line2D([], [], ls=":", color="0.55", label=f"paper's tau: {named}"))
    ncol = min(len(handles), 4 if len(handles) > 6 else 6)
    fig.legend(handles=handles, loc="upper center", ncol=ncol, frameon=False, bbox_to_anchor=(0.5, 0.0),
               fontsize=10)
    fig.suptitle(title or "Fig. 6: pruning threshold tau with an oracle detector (every triggered input pruned)",
                 y=1.02)
    fig.tight_layout()
    return fig


__all__ = ["SCOPE_LABELS", "SCOPE_STYLES", "attack_colors", "plot_pruning_threshold"]
