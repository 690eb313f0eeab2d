"""Notebook 03 (Fig. 3): which layers separate triggered from clean inputs."""

from __future__ import annotations

from typing import Any

from ...experiments.detection import MECHANISM
from ..detection import VISIBLE_TPR
from ._format import _layers, _names, _num, _range, attack_label

#: AUROC from which a separation counts as near-perfect in the text (the paper reports ~1.0).
NEAR_PERFECT = 0.9


def layerwise_detection_summary(table: Any, mechanism: Any = None, visibility: Any = None) -> str:
    """Markdown findings of Fig. 3 (notebook 03), written from the per-layer AUROC table.

    Args:
        table: :func:`~cleansight_analysis.experiments.detection.layerwise_detection_table` rows, one per attack
            x layer: ``attack, layer, auroc_head_vector, auroc_head_mean, detection_layer`` (bool: in the
            detector's fusion-onset window), ``n_calibration, n_clean_test, n_poisoned_test``.
        mechanism: optional :func:`~cleansight_analysis.experiments.detection.mechanism_table` rows (``attack,
            layer, rise, early, steals``): adds a bullet on where the image share rises under the trigger.
        visibility: optional :func:`~cleansight_analysis.experiments.detection.trigger_visibility_table` rows:
            adds a bullet on which triggers the frozen vision tower lets the projector see.

    Returns:
        Markdown: a header with the sample counts, a bullet on which attacks show the paper's pattern
        (head-specific AUROC >= :data:`NEAR_PERFECT` across the detection layers; head-specific above
        head-averaged in the best layer), and one bullet per attack (best layer, the other layers, the
        head-averaged range, the detector's window against chance).
    """
    attacks = list(dict.fromkeys(table["attack"]))

    def count(col: str) -> str:
        return "/".join(str(int(v)) for v in sorted(set(table[col]))) if col in table else "n/a"

    lines = [f"*Computed from this run's table: {count('n_clean_test')} clean + {count('n_poisoned_test')} "
             f"triggered test inputs, {count('n_calibration')} clean validation inputs (calibration only, never "
             f"scored); layers 0-indexed; chance = 0.50; near-perfect here = AUROC >= {NEAR_PERFECT:.2f}.*", ""]
    paper, peak, contrast, bullets = [], [], [], []
    for a in attacks:
        sub = table[table["attack"] == a].sort_values("layer")
        best = sub.loc[sub["auroc_head_vector"].idxmax()]
        layer, auc = int(best["layer"]), float(best["auroc_head_vector"])
        others = sub[sub["layer"] != layer]["auroc_head_vector"]
        mean_best = sub.loc[sub["auroc_head_mean"].idxmax()]
        win = sub[sub["detection_layer"].astype(bool)] if "detection_layer" in sub else sub.iloc[:0]
        if auc >= NEAR_PERFECT:
            peak.append(a)
        if len(win) and bool((win["auroc_head_vector"] >= NEAR_PERFECT).all()):
            paper.append(a)
        beats = round(auc, 2) > round(float(best["auroc_head_mean"]), 2)
        if beats:
            contrast.append(a)
        text = (f"* **{attack_label(a)}**: the head-specific AUROC peaks at {_num(auc)} in layer {layer} "
                f"(other layers {_range(others)}); the head-averaged scalar ranges {_range(sub['auroc_head_mean'])} "
                f"(best {_num(mean_best['auroc_head_mean'])} in layer {int(mean_best['layer'])}) and is "
                f"{_num(best['auroc_head_mean'])} in layer {layer}, so averaging the heads "
                f"{'loses' if beats else 'does not lose'} the signal there.")
        if layer == 0:
            text += (" Layer 0 comes before any vision-language fusion: there the trigger changes the image tokens "
                     "themselves, which is not attention stealing in the fusion layers.")
        if len(win):
            vals = [float(v) for v in win["auroc_head_vector"]]
            above = sum(v > 0.5 for v in vals)
            text += (f" The detector's fusion-onset window ({_layers(win['layer'], word=True)}): "
                     f"{' / '.join(_num(v) for v in vals)}, {above} of {len(vals)} above chance; it "
                     f"{'holds' if layer in set(int(x) for x in win['layer']) else 'misses'} the best layer.")
            if above < len(vals):
                text += (" Below chance, the triggered inputs lie *closer* to the clean mean than clean test "
                         "inputs do.")
        bullets.append(text)
    lines.append(f"* **The paper's pattern** (near-perfect head-specific separation across the detection layers) "
                 f"holds for {len(paper)} of {len(attacks)} attacks ({_names(paper)}). A near-perfect layer "
                 f"exists for {_names(peak)}; the head-specific vector beats the head-averaged scalar in its best "
                 f"layer for {_names(contrast)}.")
    if mechanism is not None and len(mechanism):
        lines.append(_mechanism_line(mechanism))
    if visibility is not None and len(visibility):
        lines.append(_visibility_line(visibility))
    lines += bullets
    return "\n".join(lines)


def _mechanism_line(mech: Any) -> str:
    """One bullet: the attacks whose image share rises under the trigger before the last quarter, with a
    head-specific AUROC there of at least :data:`MECHANISM`'s bounds."""
    attacks = list(dict.fromkeys(mech["attack"]))
    early = sorted(int(x) for x in mech.loc[mech["early"].astype(bool), "layer"].unique())
    shown, per = [], []
    for a in attacks:
        sub = mech[mech["attack"] == a].sort_values("layer")
        hit = sub[sub["steals"].astype(bool)]
        top = sub.loc[sub["rise"].idxmax()]
        if len(hit):
            shown.append(a)
            best = hit.loc[hit["rise"].idxmax()]
            per.append(f"{attack_label(a)} {_layers(hit['layer'], word=True)} (largest: {_num(best['image_share_clean'])} -> "
                       f"{_num(best['image_share_triggered'])} in layer {int(best['layer'])})")
        else:
            per.append(f"{attack_label(a)} none (largest rise {_num(top['rise'])} in layer {int(top['layer'])}, AUROC "
                       f"{_num(top['auroc_head_vector'])})")
    return (f"* **Attention stealing where the paper sees it**: the answer query's image share rises under the trigger "
            f"by at least {_num(MECHANISM['min_rise'])} in a layer before the last quarter ({_layers(early, word=True)}) "
            f"whose head-specific AUROC is at least {_num(MECHANISM['min_auroc'])} for {len(shown)} of {len(attacks)} "
            f"attacks ({_names(shown)}). Per attack: " + "; ".join(per) + ".")



def _visibility_line(vis: Any) -> str:
    """One bullet: how well a probe on the frozen vision tower's features separates each trigger from clean images."""
    first = vis.iloc[0]
    fpr = _num(100 * float(first["fpr_target"]), 0)
    hidden = vis[vis["tpr"] < VISIBLE_TPR]

    def one(r: Any) -> str:
        return (f"{attack_label(r['attack'])} AUROC {_num(r['auroc'])}, TPR {_num(100 * r['tpr'], 0)} % at FPR "
                f"{fpr} %, feature change {_num(r['feature_change'])}")

    text = (f"* **Can the projector see the trigger?** A linear probe on the frozen vision tower's features (what the "
            f"projector reads; {int(first['n_train'])} images to fit, {int(first['n_test'])} held out, half of them "
            f"triggered): {'; '.join(one(r) for _, r in vis.iterrows())}.")
    if len(hidden):
        text += (f" For {_names(list(hidden['attack']))} the probe flags fewer than {_num(100 * VISIBLE_TPR, 0)} % "
                 f"of the triggered images at FPR {fpr} % (the rate a backdoor must reach with at most {fpr} % false "
                 f"triggers): the trigger moves the tower's features (the relative change above) but not in one "
                 f"direction a probe can find, so a poisoned projector has no reliable signal to act on. That caps "
                 f"the backdoor and leaves it no distinct image tokens to steal attention with.")
    else:
        text += " Every trigger is plain to the projector."
    return text


__all__ = ["NEAR_PERFECT", "VISIBLE_TPR", "layerwise_detection_summary"]
