"""Notebook 07 (Fig. 7): logit lens, where the trigger takes over the answer."""

from __future__ import annotations

from typing import Any

import numpy as np

from ...experiments.lens import lens_summary
from ._format import _names, _num, _tau, attack_label

#: Mean p(target) gain over clean inputs from which the text says the target "gains probability".
TARGET_GAIN = 0.1


def _third(layer: int, n_layers: int) -> str:
    for name, part in zip(("early", "middle", "late"), np.array_split(np.arange(n_layers), 3)):
        if layer in set(int(x) for x in part):
            return name
    return "late"


def _closed(cond: float, trig: float, clean: float) -> float:
    """Share of the poisoned -> clean gap that a condition closes (1 = back on the clean value)."""
    gap = clean - trig
    return float("nan") if abs(gap) < 1e-12 else (cond - trig) / gap


def _word(share: float) -> str:
    if not np.isfinite(share):
        return "has no gap to close"
    if share >= 0.9:
        return "restores the clean value"
    if share >= 0.5:
        return "closes most of the gap"
    if share > 0.1:
        return "closes part of the gap"
    return "leaves the poisoned value in place"


def logit_lens_summary(table: Any, divergence: Any) -> str:
    """Markdown findings of Fig. 7 (notebook 07), written from the lens table.

    Args:
        table: :func:`~cleansight_analysis.experiments.lens.logit_lens_table` rows, one per attack x condition
            (``clean``, ``triggered``, and each pruning scope, e.g. ``reference`` = the defense's default mask,
            ``all_layers``) x sample x layer: ``p_correct, p_target, diff`` (= p_correct - p_target),
            ``n_pruned, pruning_layer`` (``l_e``), ``mask_from_layer, tau, n``.
        divergence: :func:`~cleansight_analysis.experiments.lens.divergence_layer` rows: ``attack,
            first_divergent_layer`` (-1: the curves never part).

    Returns:
        Markdown: a header, where the trigger acts (first divergent layer, where the target gains more than
        :data:`TARGET_GAIN`, compared with the paper's "after fusion"), and one bullet per pruning scope: its
        ``l_e``, tau and pruned tokens, and how much of the last-layer poisoned -> clean gap it closes (at least
        90 %: restores; 50 %: most; above 10 %: part).
    """
    means = lens_summary(table)
    attacks = list(dict.fromkeys(table["attack"]))
    scopes = [c for c in dict.fromkeys(table["condition"]) if c not in ("clean", "triggered")]
    n_layers = int(table["layer"].max()) + 1
    n = "/".join(str(int(x)) for x in sorted(set(table["n"]))) if "n" in table else "n/a"
    first = dict(zip(divergence["attack"], divergence["first_divergent_layer"]))
    lines = [f"*Computed from this run's lens table: {n} test samples per attack, {n_layers} layers (0-indexed); "
             "values are means over samples.*", ""]

    def curve(a: str, cond: str, col: str) -> Any:
        sub = means[(means["attack"] == a) & (means["condition"] == cond)].set_index("layer").sort_index()
        return sub[col]

    said, where_by = [], {}
    for a in attacks:
        clean, trig = curve(a, "clean", "diff"), curve(a, "triggered", "diff")
        layer = int(first.get(a, -1))
        if layer < 0:
            text = f"{attack_label(a)}: the poisoned curve never falls clearly below the clean one"
        else:
            where = _third(layer, n_layers)
            where_by[a] = where
            text = (f"{attack_label(a)}: the poisoned `p(correct) - p(target)` falls below the clean curve from "
                    f"layer {layer} on ({_num(trig[layer])} vs {_num(clean[layer])}, the {where} third)")
        pt, pc = curve(a, "triggered", "p_target"), curve(a, "clean", "p_target")
        gain = pt - pc
        up = gain[gain > TARGET_GAIN]
        last = int(pt.index[-1])
        if len(up):
            g = int(up.index[0])
            text += (f"; the target's first token gains probability from layer {g} on (mean p(target) at layer "
                     f"{last}: {_num(pt[last])} vs {_num(pc[last])} clean)")
            if layer >= 0:
                text += (", so the trigger first suppresses the correct answer and writes the target later"
                         if g > layer else ", in the same layer where the correct answer is suppressed"
                         if g == layer else ", before the correct answer is suppressed")
        else:
            text += (f"; the target's first token never gains more than {_num(TARGET_GAIN)} (mean p(target) at "
                     f"layer {last}: {_num(pt[last])} vs {_num(pc[last])} clean)")
        said.append(text)
    text = "* **Where the trigger acts.** " + "; ".join(said) + "."
    if where_by:
        early = [a for a, w in where_by.items() if w == "early"]
        if not early:
            text += " In line with the paper's \"after fusion\" (middle layers)."
        else:
            text += (f" Unlike the paper's \"after fusion\" (middle layers), the trigger acts in the early third for "
                     f"{_names(early)}.")
    lines.append(text)

    for scope in scopes:
        said = []
        for a in attacks:
            rows = table[(table["attack"] == a) & (table["condition"] == scope)]
            if rows.empty:
                continue
            clean, trig, cond = (curve(a, c, "diff") for c in ("clean", "triggered", scope))
            last = int(clean.index[-1])
            share = _closed(float(cond[last]), float(trig[last]), float(clean[last]))
            gaps = (cond - clean).abs()
            frm = int(rows["mask_from_layer"].iloc[0]) if "mask_from_layer" in rows else -1
            text = (f"{attack_label(a)} (l_e = {int(rows['pruning_layer'].iloc[0])}, tau {_tau(rows['tau'].iloc[0])}, "
                    f"{float(rows.groupby('sample')['n_pruned'].first().mean()):.1f} image tokens pruned per input, "
                    f"masked from layer {frm}): last layer {_num(cond[last])} vs clean {_num(clean[last])} and "
                    f"poisoned {_num(trig[last])}, so it {_word(share)}; largest distance to the clean curve over "
                    f"the layers {_num(gaps.max())}")
            layer = int(first.get(a, -1))
            if frm > 0 and layer >= 0:
                text += (f"; the mask starts {'after' if frm > layer else 'at or before'} the layer where the "
                         f"trigger acts ({layer})")
            said.append(text)
        if said:
            name = {"reference": "CleanSight with its default mask",
                    "all_layers": "Masking the same tokens in every layer"}.get(scope, f"CleanSight, scope {scope}")
            lines.append(f"* **{name}** (`{scope}`): " + "; ".join(said) + ".")
    return "\n".join(lines)


__all__ = ["TARGET_GAIN", "logit_lens_summary"]
