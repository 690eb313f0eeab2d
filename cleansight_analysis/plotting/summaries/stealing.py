"""Notebook 02 (Fig. 2): attention stealing."""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from ...results import array_cell
from ..stealing import _image_patch_label
from ._format import _names, _pct, _points, _span, attack_label


def _window_layers(label: str) -> list[int]:
    """The layers of a :func:`share_summary` window label: ``"layers 2-5" -> [2, 3, 4, 5]``, ``"layer 7" -> [7]``."""
    out: list[int] = []
    for lo, hi in re.findall(r"(\d+)(?:-(\d+))?", str(label)):
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


def _bar(summary: Any, attack: str, window: str, condition: str) -> dict[str, float]:
    """``{group: share}`` of one stacked bar of :func:`share_summary`."""
    sub = summary[(summary["attack"] == attack) & (summary["window"] == window) & (summary["condition"] == condition)]
    return {str(g): float(s) for g, s in zip(sub["group"], sub["share"])}


def _rest(bar: dict[str, float]) -> float:
    """System + template tail: everything that is neither image nor instruction (the paper's "system")."""
    return bar.get("system", 0.0) + bar.get("template_tail", 0.0)


def _cmp(ours: list[float], paper: list[float], what: str) -> str:
    """Ours vs the paper's range, in words: smaller / larger than, or within / overlapping it."""
    if not ours or not paper:
        return ""
    if max(ours) < min(paper):
        word = "smaller than"
    elif min(ours) > max(paper):
        word = "larger than"
    else:
        word = "overlapping"
    return f"{what} {_pt_range(ours)} ({word} the paper's {_pt_range(paper)})"


def _pt_range(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    return _points(lo) if round(100 * lo) == round(100 * hi) else f"{_points(lo).split()[0]} to {_points(hi)}"


def _token_example(tokens: Any, layer: int, thief: Any | None) -> str:
    """Panel (b): image / prompt share and the top image token of the example, clean and triggered."""
    part = tokens[tokens["layer"] == layer]
    if part.empty:
        return ""
    attack = str(part["attack"].iloc[0]) if "attack" in part else ""
    said = []
    cells = None
    if thief is not None and "trigger_cells" in thief:
        ex = thief[(thief["attack"] == attack) & (thief["condition"] == "triggered") & (thief["layer"] == layer)]
        if len(ex) and ("example_id" not in ex or "sample_id" not in part
                        or str(ex["example_id"].iloc[0]) == str(part["sample_id"].iloc[0])):
            cells = array_cell(ex["trigger_cells"].iloc[0], bool)
    for condition in dict.fromkeys(part["condition"]):
        rows = part[part["condition"] == condition].sort_values("position")
        img = rows[rows["group"] == "image"]
        image, prompt = float(img["attention"].sum()), float(rows.loc[rows["group"] == "prompt", "attention"].sum())
        text = f"{condition}: {_pct(image)} on image tokens, {_pct(prompt)} on the prompt"
        if len(img):
            top = img.loc[img["attention"].idxmax()]
            positions = img["position"].to_numpy()
            label = _image_patch_label(int(top["position"]), positions)
            text += f", largest image token {label} ({float(top['attention']):.2f})"
            side = int(round(math.sqrt(len(positions))))
            if cells is not None and condition == "triggered" and side * side == len(positions) \
                    and cells.shape == (side, side):
                idx = int(np.searchsorted(positions, int(top["position"])))
                text += " on the trigger" if cells[idx // side, idx % side] else " off the trigger"
        said.append(text)
    return (f"* **(b) The example** (first test sample, {attack_label(attack)} model, layer {layer}): "
            + "; ".join(said) + ".")


def stealing_summary(summary: Any, thief: Any, examples: Any, tokens: Any, layers: dict[str, int],
                     paper: Any | None = None) -> str:
    """Markdown findings of Fig. 2 (notebook 02), written from its tables.

    Args:
        summary: :func:`~cleansight_analysis.experiments.stealing.share_summary` rows: ``attack, window``
            (``middle`` / ``stealing``), ``layers`` (label, e.g. ``"layers 2-5"``), ``condition`` (``clean``,
            ``triggered``, ``triggered + ST <rho>``), ``group`` (system / image / prompt / template_tail),
            ``share`` (fraction), ``n``.
        thief: thief-token rows (``tables["thief"]`` or :func:`thief_summary`): ``attack, condition, layer,
            top1_hit_rate`` (NaN for a global trigger), ``chance_share, top1_share``; optionally
            ``trigger_cells, example_id`` (marks whether the example's top token sits on the trigger).
        examples: ``attack, condition, answer`` (the example input under each condition).
        tokens: token-wise attention of the example: ``attack, condition, sample_id, layer, position, group,
            attention``.
        layers: the stealing layer of each attack (:func:`stealing_layers`).
        paper: the paper's bars (:func:`paper_shares`: ``attack, condition, group, share``), or None.

    Returns:
        Markdown bullets: middle layers vs the paper, the stealing layer of each attack, pixel ST in that
        layer and on the example's answer, panel (b) and panel (c).
    """
    attacks = list(dict.fromkeys(summary["attack"]))
    n = sorted({int(x) for x in summary["n"]}) if "n" in summary else []
    conditions = list(dict.fromkeys(summary["condition"]))
    st = [c for c in conditions if c not in ("clean", "triggered")]
    n_layers = int(tokens["layer"].max()) + 1 if tokens is not None and len(tokens) else None
    lines = [f"*Computed from this run's tables: n = {'/'.join(map(str, n)) or 'n/a'} test samples per condition; "
             "shares are means over heads and samples, in % of the answer query's attention.*", ""]

    # middle layers vs the paper
    mid = summary[summary["window"] == "middle"]
    paper_rises: list[float] = []
    if len(mid):
        label = str(mid["layers"].iloc[0])
        rises, image, prompt = [], [], []
        for a in attacks:
            c, t = _bar(summary, a, "middle", "clean"), _bar(summary, a, "middle", "triggered")
            if c and t:
                rises.append(t["image"] - c["image"])
                image.append(f"{attack_label(a)} {_pct(c['image'], 1)} -> {_pct(t['image'], 1)} "
                             f"({_points(rises[-1], 1)})")
                prompt.append(f"{attack_label(a)} {_pct(c['prompt'], 1)} -> {_pct(t['prompt'], 1)}")
        text = (f"* **Middle layers ({label}{f' of {n_layers}' if n_layers else ''})**: image share clean -> "
                f"triggered: {', '.join(image)}; prompt share: {', '.join(prompt)}.")
        if paper is not None and len(paper):
            said = []
            for a in dict.fromkeys(paper["attack"]):
                p = paper[paper["attack"] == a]
                get = {(str(c), str(g)): float(s) for c, g, s in zip(p["condition"], p["group"], p["share"])}
                if ("clean", "image") in get and ("triggered", "image") in get:
                    paper_rises.append(get[("triggered", "image")] - get[("clean", "image")])
                    said.append(f"{attack_label(a)} image {_pct(get[('clean', 'image')])} -> "
                                f"{_pct(get[('triggered', 'image')])}"
                                + (f", prompt {_pct(get[('clean', 'prompt')])} -> {_pct(get[('triggered', 'prompt')])}"
                                   if ("clean", "prompt") in get and ("triggered", "prompt") in get else ""))
            if said:
                text += f" The paper's middle-layer bars (its Fig. 2a): {'; '.join(said)}."
        if rises and paper_rises:
            text += f" Middle-layer {_cmp(rises, paper_rises, 'image-share rises here:')}."
        lines.append(text)

    # the stealing layer of each attack
    clauses, rises, clean_img = [], [], []
    for a in attacks:
        c, t = _bar(summary, a, "stealing", "clean"), _bar(summary, a, "stealing", "triggered")
        if not (c and t):
            continue
        layer = layers.get(a)
        rise = t["image"] - c["image"]
        where = ", the last" if n_layers is not None and layer == n_layers - 1 else ""
        if rise <= 0:
            clauses.append(f"{attack_label(a)}: no layer shows a rise (largest {_points(rise, 1)}, layer {layer})")
            continue
        rises.append(rise)
        clean_img.append(c["image"])
        clauses.append(f"{attack_label(a)} layer {layer}{where} (image {_pct(c['image'], 1)} -> {_pct(t['image'], 1)}, "
                       f"{_points(rise, 1)}; prompt {_pct(c['prompt'], 1)} -> {_pct(t['prompt'], 1)}; system + "
                       f"tail {_pct(_rest(c), 1)} -> {_pct(_rest(t), 1)})")
    if clauses:
        text = ("* **Stealing layer** (the layer with the largest clean -> triggered rise of the image share): "
                + "; ".join(clauses) + ".")
        if len(mid):
            middle = _window_layers(mid["layers"].iloc[0])
            spots = {a: ("after" if layers[a] > max(middle) else "before" if layers[a] < min(middle) else "inside")
                     for a in attacks if a in layers and middle}
            for spot in ("after", "inside", "before"):
                who = [a for a, s in spots.items() if s == spot]
                if who:
                    text += f" For {_names(who)} it lies {spot} the middle window."
        if rises and paper_rises:
            text += f" The {_cmp(rises, paper_rises, 'rises are')}."
        if clean_img and paper is not None and len(paper):
            pc = [float(s) for c_, g, s in zip(paper["condition"], paper["group"], paper["share"])
                  if c_ == "clean" and g == "image"]
            if pc:
                word = ("more" if min(clean_img) > max(pc) else "less" if max(clean_img) < min(pc) else
                        "about as much (overlapping ranges)")
                text += (f" On clean inputs this model already puts {_span(clean_img)} of the attention on the "
                         f"image there: {word} than the paper's {_span(pc)}.")
        lines.append(text)

    # pixel ST in the stealing layer, and the example's answers
    for cond in st:
        said = []
        for a in attacks:
            c, t, s = (_bar(summary, a, "stealing", x) for x in ("clean", "triggered", cond))
            if not (c and t and s):
                continue
            rise = t["image"] - c["image"]
            if rise <= 0:
                said.append(f"{attack_label(a)} {_pct(s['image'], 1)} (no rise to undo)")
                continue
            undone = (t["image"] - s["image"]) / rise
            word = "most" if undone >= 0.5 else "part" if undone > 0 else "none"
            said.append(f"{attack_label(a)} image {_pct(s['image'], 1)}: undoes {word} of the rise ({_pct(undone)})")
        if said:
            text = f"* **{cond}** in the stealing layer: " + "; ".join(said) + "."
            ans = {(str(a), str(c)): str(x) for a, c, x in zip(examples["attack"], examples["condition"],
                                                               examples["answer"])}
            changed = [a for a in attacks if ans.get((a, "triggered")) not in (None, ans.get((a, "clean")))]
            back = [a for a in changed if ans.get((a, cond)) == ans.get((a, "clean"))]
            if changed:
                text += (f" In the example the trigger changes the answer for {_names(changed)}; under {cond} "
                         f"it is the clean answer again for {len(back)} of them ({_names(back)}).")
            else:
                text += " In the example the trigger does not change the answer for any attack."
            lines.append(text)

    # (b) token-wise attention of the example
    if tokens is not None and len(tokens):
        first = str(tokens["attack"].iloc[0]) if "attack" in tokens else attacks[0]
        if first in layers:
            text = _token_example(tokens[tokens["attack"] == first] if "attack" in tokens else tokens,
                                  int(layers[first]), thief)
            if text:
                lines.append(text)

    # (c) thief tokens in each attack's stealing layer
    said = []
    for a in attacks:
        rows = thief[(thief["attack"] == a) & (thief["layer"] == layers.get(a))]
        trig, clean = rows[rows["condition"] == "triggered"], rows[rows["condition"] == "clean"]
        if trig.empty:
            continue
        t = trig.iloc[0]
        c = clean.iloc[0] if len(clean) else None
        top_clean = f" vs {_pct(c['top1_share'])} on clean inputs" if c is not None else ""
        if np.isfinite(float(t["top1_hit_rate"])):
            chance = float(t["chance_share"])
            word = "above" if float(t["top1_hit_rate"]) > chance else "not above"
            ctrl = f"; clean control {_pct(c['top1_hit_rate'], 1)}" if c is not None else ""
            said.append(f"{attack_label(a)} (layer {int(t['layer'])}): the most-attended image token sits on the "
                        f"trigger for {_pct(t['top1_hit_rate'], 1)} of the triggered inputs, {word} chance "
                        f"({_pct(chance, 1)}{ctrl}); it holds {_pct(t['top1_share'])} of the image attention"
                        f"{top_clean}")
        else:
            word = "concentrates" if c is not None and float(t["top1_share"]) > float(c["top1_share"]) else "spreads"
            said.append(f"{attack_label(a)} (layer {int(t['layer'])}, global trigger, no region to hit): the attention "
                        f"{word} (top patch {_pct(t['top1_share'])} of the image attention{top_clean})")
    if said:
        lines.append("* **(c) Thief tokens**: " + "; ".join(said) + ".")
    return "\n".join(lines)


__all__ = ["stealing_summary"]
