"""Notebook 01 (Fig. 1): pixel perturbation vs attention perturbation."""

from __future__ import annotations

from typing import Any

from ._format import _names, _pct, attack_label

#: The symbol of the intensity in the text, per perturbation domain (the paper's rho for ST, eta for attention).
SYMBOLS: dict[str, str] = {"pixel": "ρ", "attention": "η"}


def _domain(part: Any) -> str:
    """The perturbation domain of one variant's rows (``pixel`` / ``attention``), from its perturbed rows."""
    rows = part[part["intensity"] > part["intensity"].min()]
    if "domain" in part and len(rows):
        return str(rows["domain"].iloc[0])
    return "pixel" if "pixel" in str(part["variant"].iloc[0]).lower() else "attention"


def _curve(part: Any) -> dict[str, Any]:
    """ASR / clean accuracy of one attack x variant: unperturbed, at the strongest intensity, first halving."""
    part = part.sort_values("intensity")
    base, top = part.iloc[0], part.iloc[-1]
    asr0 = float(base["asr"])
    pert = part.iloc[1:]
    half = pert[pert["asr"] <= asr0 / 2] if asr0 > 0 else pert.iloc[:0]
    first = float(half["intensity"].iloc[0]) if len(half) else None
    stays_down = first is not None and bool((pert[pert["intensity"] >= first]["asr"] <= asr0 / 2).all())
    return {"asr0": asr0, "acc0": float(base["clean_acc"]), "asr_max": float(top["asr"]),
            "acc_max": float(top["clean_acc"]), "max": float(top["intensity"]), "first_half": first,
            "stays_down": stays_down, "removes": asr0 > 0 and float(top["asr"]) <= asr0 / 2,
            "flat": bool(len(pert)) and bool(((pert["asr"] - asr0).abs() < 1e-9).all()),
            "lowest": float(pert["asr"].min()) if len(pert) else asr0}


def _clause(attack: str, c: dict[str, Any], sym: str) -> str:
    name = attack_label(attack)
    acc = f"clean accuracy {_pct(c['acc0'])} -> {_pct(c['acc_max'])}"
    if c["asr0"] <= 0:
        return f"{name}: no backdoor to remove (unperturbed ASR {_pct(c['asr0'])})"
    if c["flat"]:
        return f"{name}: ASR stays at {_pct(c['asr0'])} for every {sym} up to {c['max']:g} ({acc})"
    if c["removes"]:
        if c["first_half"] == c["max"]:
            when = "only at the strongest intensity"
        elif c["stays_down"]:
            when = f"from {sym} = {c['first_half']:g} on"
        else:
            when = f"first at {sym} = {c['first_half']:g}"
        return (f"{name}: ASR falls from {_pct(c['asr0'])} to {_pct(c['asr_max'])} at {sym} = {c['max']:g} "
                f"(below half of its unperturbed value {when}; {acc})")
    dip = (f"; it dips below half at {sym} = {c['first_half']:g} but comes back"
           if c["first_half"] is not None else f"; never below half of its unperturbed value, lowest "
                                                 f"{_pct(c['lowest'])}")
    return f"{name}: ASR {_pct(c['asr0'])} -> {_pct(c['asr_max'])} at {sym} = {c['max']:g}{dip} ({acc})"


def _pixel_part(variant: str, kept: list[str], attacks: list[str]) -> str:
    """What one pixel perturbation does to the attacks whose backdoor attention perturbation removes."""
    if not kept:
        return f"*{variant}* removes every backdoor at its strongest"
    removed = [a for a in attacks if a not in kept]
    return f"*{variant}* keeps the backdoor of {_names(kept)}" + (
        f" but, at its strongest, removes that of {_names(removed)}" if removed else "")


def perturbation_summary(sweep: Any) -> str:
    """Markdown findings of Fig. 1 (notebook 01), written from the sweep table.

    Args:
        sweep: :func:`~cleansight_analysis.experiments.perturbation.perturbation_tables` rows, one per attack x
            variant x intensity: ``attack, variant, domain`` (``pixel`` / ``attention``; ``none`` on the shared
            unperturbed row), ``intensity`` (0 = unperturbed), ``asr, clean_acc`` (fractions), ``n``.

    Returns:
        Markdown: a header with the sample count, one bullet on whether the paper's contrast (pixel ST keeps
        the backdoor, attention perturbation removes it) holds per attack, one bullet per variant with each
        attack's ASR and clean accuracy, and one comparing the clean accuracy left at the strongest intensity.
        A perturbation "removes" a backdoor when the ASR at its strongest intensity is at most half of the
        unperturbed ASR.
    """
    attacks = list(dict.fromkeys(sweep["attack"]))
    variants = list(dict.fromkeys(sweep["variant"]))
    domains = {v: _domain(sweep[sweep["variant"] == v]) for v in variants}
    curves = {(a, v): _curve(sweep[(sweep["attack"] == a) & (sweep["variant"] == v)])
              for a in attacks for v in variants if ((sweep["attack"] == a) & (sweep["variant"] == v)).any()}
    pixel = [v for v in variants if domains[v] == "pixel"]
    attention = [v for v in variants if domains[v] == "attention"]
    intensities = sorted({float(x) for x in sweep["intensity"]})
    n = sorted({int(x) for x in sweep["n"]}) if "n" in sweep else []
    lines = [f"*Computed from this run's sweep: {len(attacks)} attack(s), n = {'/'.join(map(str, n)) or 'n/a'} test "
             f"samples per point, intensities {', '.join(f'{x:g}' for x in intensities)}. A perturbation "
             "*removes* a backdoor here when the ASR at its strongest intensity is at most half of the "
             "unperturbed ASR.*", ""]

    st_removes = [a for a in attacks if any(curves.get((a, v), {}).get("removes") for v in pixel)]
    attn_removes = [a for a in attacks if any(curves.get((a, v), {}).get("removes") for v in attention)]
    # per pixel perturbation: the attacks whose backdoor it keeps while an attention perturbation removes it
    kept = {v: [a for a in attacks if a in attn_removes and (a, v) in curves and not curves[(a, v)]["removes"]]
            for v in pixel}
    contrast = "(pixel perturbation keeps the backdoor, attention perturbation removes it)"
    unmoved = [a for a in attacks if a not in attn_removes]  # no attention perturbation removes these
    unmoved_reason = (f"no attention perturbation removes the backdoor of {_names(unmoved)}"
                      if attention and unmoved else None)
    if pixel and all(set(kept[v]) == set(attacks) for v in pixel):
        lines.append(f"* **The paper's contrast {contrast} reproduces for every attack** ({_names(attacks)}).")
    elif not any(kept.values()):
        reasons = [f"pixel perturbation removes the backdoor of {_names(st_removes)}"] if st_removes else []
        reasons += [unmoved_reason] if unmoved_reason else []
        lines.append(f"* **The paper's contrast {contrast} does not reproduce here**: {'; '.join(reasons)}.")
    else:
        parts = [_pixel_part(v, kept[v], attacks) for v in pixel]
        lines.append(f"* **The paper's contrast {contrast} holds in part**: {'; '.join(parts)}"
                     + (f"; {unmoved_reason}" if unmoved_reason else "") + ".")
    for v in variants:
        sym = SYMBOLS.get(domains[v], "intensity")
        clauses = [_clause(a, curves[(a, v)], sym) for a in attacks if (a, v) in curves]
        lines.append(f"* **{v}**: " + "; ".join(clauses) + ".")
    if pixel and attention:
        parts = []
        for a in attacks:
            st = [curves[(a, v)]["acc_max"] for v in pixel if (a, v) in curves]
            at = [curves[(a, v)]["acc_max"] for v in attention if (a, v) in curves]
            if not st or not at:
                continue
            word = ("more clean accuracy than" if max(at) > max(st) else "less clean accuracy than"
                    if max(at) < max(st) else "as much clean accuracy as")
            each = ", ".join(f"*{v}* {_pct(curves[(a, v)]['acc_max'])}" for v in variants if (a, v) in curves)
            base = curves[(a, variants[0])]["acc0"] if (a, variants[0]) in curves else None
            parts.append(f"{attack_label(a)}: the best attention perturbation keeps {word} pixel perturbation "
                         f"({each}; unperturbed {_pct(base)})")
        if parts:
            lines.append("* **Clean accuracy at the strongest intensity**: " + "; ".join(parts) + ".")
    return "\n".join(lines)


__all__ = ["perturbation_summary"]
