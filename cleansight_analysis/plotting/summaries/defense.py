"""Notebook 08 (Tables 1-4): CleanSight against pixel purifiers and input detectors."""

from __future__ import annotations

from typing import Any

from ...experiments.tables import CLEANSIGHT_GOALS
from ._format import _pct, _points, _span


def defense_tables_summary(t1: Any, t3: Any, t4: Any, full: Any = None) -> str:
    """Markdown findings of Tables 1-4 (notebook 08).

    Args:
        t1: long table attack x defense (columns ``attack, defense, asr, clean_utility, poisoned_utility, tpr,
            fpr, auroc, n, n_val``).
        t3: module ablation (``attack, defense`` in ``none / full / no_detection / random_pruning``).
        t4: Table 4, family member x defense (``member, defense, asr, tpr, fpr, auroc``).
        full: optional, CleanSight at the paper's size
            (:func:`~cleansight_analysis.experiments.tables.cleansight_full_size`: ``none`` / ``cleansight`` /
            optionally ``cleansight_generated`` rows with ``clean_drop`` and ``goals_met``).
    Returns:
        Markdown bullets.
    """
    at = t1.set_index(["attack", "defense"])
    attacks = list(dict.fromkeys(t1["attack"]))
    none = t1[t1["defense"] == "none"].set_index("attack")
    one = t1[t1["defense"] == "cleansight"].set_index("attack")
    every = t1[t1["defense"] == "cleansight_all_layers"].set_index("attack")
    n = int(t1["n"].iloc[0]) if "n" in t1 else None
    n_val = int(t1["n_val"].iloc[0]) if "n_val" in t1 else None
    lines = [f"*Computed from this run's tables: {len(attacks)} attacks, n = {n} clean test inputs and their "
             f"triggered copies per model, {n_val} clean calibration inputs.*", ""]
    lines.append(f"* **Undefended**: ASR {_span(none['asr'])}; clean utility {_span(none['clean_utility'])}.")
    unchanged = [a for a in attacks if abs(float(one.loc[a, "asr"]) - float(none.loc[a, "asr"])) < 1e-9]
    lines.append(f"* **CleanSight, one pass (the authors' mask scope)**: ASR unchanged for {len(unchanged)} of "
                 f"{len(attacks)} attacks ({', '.join(unchanged) or 'none'}); detection per attack (TPR / FPR / "
                 "AUROC): " + "; ".join(f"{a} {_pct(one.loc[a, 'tpr'])} / {_pct(one.loc[a, 'fpr'])} / "
                                        f"{float(one.loc[a, 'auroc']):.2f}" for a in attacks) + ".")
    best = min(attacks, key=lambda a: float(every.loc[a, "asr"]))
    lines.append("* **CleanSight, mask in every layer**: ASR " + ", ".join(
        f"{a} {_pct(every.loc[a, 'asr'])}" for a in attacks) + f"; lowest on {best} (clean utility "
        f"{_pct(every.loc[best, 'clean_utility'])}, undefended {_pct(none.loc[best, 'clean_utility'])}). "
        "An attack the threshold does not flag keeps its ASR whatever the scope.")
    for name, label in (("shrinkpad", "ShrinkPad"), ("st", "ST"), ("blur", "Blur"), ("jpeg", "JPEG")):
        rows = t1[t1["defense"] == name]
        if len(rows):
            cost = [float(none.loc[a, "clean_utility"]) - float(at.loc[(a, name), "clean_utility"])
                    for a in rows["attack"]]
            lines.append(f"* **{label}**: ASR {_span(rows['asr'])} at a cost of {_span(cost, ' points')} of "
                         "clean utility.")
    detectors = [d for d in ("strip", "scale_up", "attention_entropy") if (t1["defense"] == d).any()]
    if detectors:
        lines.append("* **Input detectors** (answers unchanged, so ASR stays undefended): TPR " + "; ".join(
            f"{d} {_span(t1[t1['defense'] == d]['tpr'])}" for d in detectors) + ".")
    t3i = t3.set_index(["attack", "defense"])
    if "random_pruning" in set(t3["defense"]):
        rp = t3[t3["defense"] == "random_pruning"]
        drop = [float(t3i.loc[(a, "none"), "clean_utility"]) - float(t3i.loc[(a, "random_pruning"), "clean_utility"])
                for a in rp["attack"]]
        lines.append(f"* **Table 3**: random pruning of 90 % of the image tokens: ASR {_span(rp['asr'])} at a "
                     f"cost of {_span(drop, ' points')} of clean utility; pruning every input without detection: ASR "
                     f"{_span(t3[t3['defense'] == 'no_detection']['asr'])}.")
    reps = t4[t4["defense"] == "cleansight"]
    if len(reps):
        lines.append("* **Table 4** (projector-only members and their `-lora` replicates, CleanSight one pass): " + "; ".join(
            f"{r.member} ASR {_pct(r.asr)} (TPR {_pct(r.tpr)}, FPR {_pct(r.fpr)}, AUROC {float(r.auroc):.2f})"
            for r in reps.itertuples()) + ".")
    if full is not None and len(full):
        lines.append(_full_size_line(full))
    return "\n".join(lines)


def _full_size_line(full: Any) -> str:
    """One bullet: CleanSight's defaults at the paper's size against the goals the table was scored on, and the
    same with every decoding query read (``cleansight_generated``) where the table has those rows."""
    none = full[full["defense"] == "none"].set_index("attack")
    one = full[full["defense"] == "cleansight"].set_index("attack")
    g = CLEANSIGHT_GOALS
    line = (f"* **At the paper's size** ({int(one['n'].iloc[0])} test inputs, {int(one['n_val'].iloc[0])} clean "
            f"calibration inputs, every CleanSight default): ASR <= {_pct(g['asr_max'])}, clean utility within "
            f"{100 * g['clean_drop_max']:.0f} points and FPR <= {_pct(g['fpr_max'])} hold for {_goals(one, none)}.")
    gen = full[full["defense"] == "cleansight_generated"].set_index("attack")
    if len(gen):
        line += (" Reading every decoding query as well (`query=\"generated\"`, the paper's \"current decoding "
                 f"query\"): {_goals(gen, none)}.")
    return line


def _goals(rows: Any, none: Any) -> str:
    """``k of n attacks (met, ...). Per attack: ...`` for one CleanSight variant's rows (indexed by attack)."""
    met = [a for a in rows.index if bool(rows.loc[a, "goals_met"])]
    per = "; ".join(f"{a} ASR {_pct(none.loc[a, 'asr'])} -> {_pct(rows.loc[a, 'asr'], 1)}, clean utility "
                    f"{_points(0.0 - float(rows.loc[a, 'clean_drop']), 1)}, FPR {_pct(rows.loc[a, 'fpr'], 1)}"
                    for a in rows.index)
    return f"{len(met)} of {len(rows)} attacks ({', '.join(met) or 'none'}). Per attack: {per}"


__all__ = ["defense_tables_summary"]
