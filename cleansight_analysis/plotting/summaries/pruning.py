"""Notebook 06 (Fig. 6): the pruning threshold tau with an oracle detector."""

from __future__ import annotations

from typing import Any

import numpy as np

from ...experiments.pruning import PAPER_TAUS
from ._format import _names, _num, _range, _span, _tau, attack_label

#: How the text names each mask scope of the table.
SCOPE_NAMES: dict[str, str] = {"reference": "the defense's default mask scope", "all_layers": "the mask in every layer"}
#: ASR below this counts as "~0" when the paper's claim (ASR ~0 by tau 1e-3) is checked.
NEAR_ZERO = 0.05


def pruning_threshold_summary(table: Any, *, paper_tau: float = PAPER_TAUS["paper's balance"],
                              default_scope: str = "reference") -> str:
    """Markdown findings of Fig. 6 (notebook 06), written from the tau sweep.

    Args:
        table: :func:`~cleansight_analysis.experiments.pruning.pruning_threshold_table` rows, one per attack x
            mask scope x tau: ``attack, mask_scope, tau, is_auto`` (the calibrated tau), ``asr,
            poisoned_utility, mean_pruned, pruned_share, layer`` (``l_e``), ``n, n_val``.
        paper_tau: the paper's tau by which ASR should be ~0 for every attack (1e-3).
        default_scope: the scope the defense uses by default (``reference``).

    Returns:
        Markdown: a header, whether the paper's claim holds with the default scope, ASR and masked share at
        ``paper_tau``, where ASR reaches 0, the calibrated tau, every other scope at the calibrated tau, and
        the attacks that barely respond to pruning. The undefended ASR is the ASR at the largest swept tau
        (1 masks nothing).
    """
    attacks = list(dict.fromkeys(table["attack"]))
    ref = table[table["mask_scope"] == default_scope]
    taus = sorted({float(t) for t in table["tau"][~table["is_auto"].astype(bool)]})

    def info(sub: Any) -> dict[str, Any]:
        sub = sub.sort_values("tau")
        auto = sub[sub["is_auto"].astype(bool)].iloc[0]
        at = sub[np.isclose(sub["tau"], paper_tau) & ~sub["is_auto"].astype(bool)]
        zero = sub[sub["asr"] == 0]
        pruned = sub[sub["tau"] < sub["tau"].max()]
        return {"undefended": float(sub["asr"].iloc[-1]), "auto": auto, "at": at.iloc[0] if len(at) else None,
                "zero": zero.loc[zero["tau"].idxmax()] if len(zero) else None,
                "lo": float(pruned["asr"].min()) if len(pruned) else float("nan"),
                "hi": float(pruned["asr"].max()) if len(pruned) else float("nan")}

    per = {a: info(ref[ref["attack"] == a]) for a in attacks if (ref["attack"] == a).any()}
    n = "/".join(str(int(x)) for x in sorted(set(table["n"]))) if "n" in table else "n/a"
    n_val = "/".join(str(int(x)) for x in sorted(set(table["n_val"]))) if "n_val" in table else "n/a"
    lines = [f"*Computed from this run's sweep: {len(attacks)} attack(s), {n} triggered test inputs each, every one "
             f"flagged (oracle detector); CleanSight fitted on {n_val} clean calibration samples per model; swept "
             f"taus {', '.join(_tau(t) for t in taus)} plus the calibrated one. ASR and poisoned utility are "
             "fractions of the triggered inputs.*", ""]

    near = [a for a, d in per.items() if d["at"] is not None and float(d["at"]["asr"]) < NEAR_ZERO]
    holds = "reproduces" if len(near) == len(per) else "does not reproduce"
    lines.append(f"* **The paper's picture** (ASR ~0 by tau = {_tau(paper_tau)} for every attack; ~0 here means "
                 f"below {_num(NEAR_ZERO)}) {holds} with {SCOPE_NAMES.get(default_scope, default_scope)}: it holds "
                 f"for {len(near)} of {len(per)} attacks ({_names(near)}).")
    at = [(a, d["at"]) for a, d in per.items() if d["at"] is not None]
    if at:
        masked = _span([r["pruned_share"] for _, r in at])
        lines.append(f"* **At tau = {_tau(paper_tau)}** ASR is " + ", ".join(
            f"{_num(r['asr'])} ({attack_label(a)})" for a, r in at) + f", with {masked} of the image tokens masked.")
    zero = [(a, d["zero"]) for a, d in per.items() if d["zero"] is not None]
    if zero:
        lines.append(f"* **ASR reaches 0** for {len(zero)} of {len(per)} attacks: " + "; ".join(
            f"{attack_label(a)} at tau <= {_tau(r['tau'])} ({_span([r['pruned_share']])} of the image masked, "
            f"poisoned utility {_num(r['poisoned_utility'])})" for a, r in zero) + ".")
    else:
        lines.append(f"* **ASR reaches 0 for no attack** at any swept tau with {SCOPE_NAMES.get(default_scope)}.")
    if per:
        autos = {a: d["auto"] for a, d in per.items()}
        cut = [a for a, d in per.items() if float(d["auto"]["asr"]) <= d["undefended"] / 2]
        keep = [a for a in per if a not in cut]
        text = (f"* **The calibrated tau** ({_range([r['tau'] for r in autos.values()])}, the stars) masks "
                f"{_span([r['pruned_share'] for r in autos.values()], ' %')} of the image tokens.")
        if keep:
            text += (f" With {SCOPE_NAMES.get(default_scope, default_scope)} it leaves ASR at "
                     f"{_range([autos[a]['asr'] for a in keep])} for {_names(keep)}")
            halved = ", ".join(f"{attack_label(a)} ({_num(autos[a]['asr'])})" for a in cut)
            text += f"; it at least halves the undefended ASR only for {halved}." if cut else " (every attack)."
        else:
            text += " It at least halves the undefended ASR for every attack."
        lines.append(text)
    for scope in dict.fromkeys(table["mask_scope"]):
        if scope == default_scope:
            continue
        for a in dict.fromkeys(table[table["mask_scope"] == scope]["attack"]):
            d = info(table[(table["mask_scope"] == scope) & (table["attack"] == a)])
            r = d["auto"]
            works = float(r["asr"]) <= d["undefended"] / 2
            base = (f" ({SCOPE_NAMES.get(default_scope, default_scope)}: {_num(per[a]['auto']['asr'])})"
                    if a in per else "")
            lines.append(f"* **{SCOPE_NAMES.get(scope, scope).capitalize()}** (`{scope}`, {attack_label(a)}) at the "
                         f"calibrated tau: ASR {_num(r['asr'])}{base}, poisoned utility {_num(r['poisoned_utility'])}, "
                         f"{float(r['mean_pruned']):.1f} image tokens masked per input; it "
                         f"{'removes most of' if works else 'does not remove'} the backdoor at that tau.")
    flat = [a for a, d in per.items() if d["undefended"] > 0 and d["lo"] >= d["undefended"] / 2]
    if flat:
        lines.append("* **Barely responding to pruning** (ASR never below half the undefended ASR at any swept tau): "
                     + "; ".join(f"{attack_label(a)} (ASR {_range([per[a]['lo'], per[a]['hi']])} at every tau; its "
                                 f"l_e is layer {int(per[a]['auto']['layer'])})" for a in flat)
                     + ". Its backdoor does not seem to run through a few strongly attended image tokens.")
    return "\n".join(lines)


__all__ = ["NEAR_ZERO", "SCOPE_NAMES", "pruning_threshold_summary"]
