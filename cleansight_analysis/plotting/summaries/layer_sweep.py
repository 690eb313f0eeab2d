"""Notebook 04 (Fig. 4): how much the choice of detection layers matters."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._format import _detection_counts, _layers, _names, _num, _range, attack_label


def _has(layers: Any, layer: int) -> bool:
    return layer in {int(x) for x in str(layers).split(",") if x.strip()}


def layer_window_summary(windows: Any, rows: Any | None = None) -> str:
    """Markdown findings of Fig. 4 (notebook 04), written from the window sweep.

    Args:
        windows: :func:`~cleansight_analysis.experiments.detection.layer_window_table` rows, one per attack x
            start x length: ``attack, start, length, layers`` (``"5,6,7"``), ``auroc``, ``detector_choice``
            (bool: the fusion-onset window), ``best`` (bool: the highest AUROC, an oracle choice).
        rows: the detection rows (``DetectionInputs.rows``) for the sample counts in the header, or None.

    Returns:
        Markdown: a header, a bullet on the paper's finding (windows starting in the middle third detect
        stably) per attack, and one bullet per attack: the best single layer and the windows with and without
        it, the detector's window, the oracle's best window, and the AUROC range per third of start layers.
    """
    attacks = list(dict.fromkeys(windows["attack"]))
    head = f"{_detection_counts(rows)}; " if rows is not None else ""
    lines = [f"*Computed from this run's window sweep: {head}AUROC of triggered vs clean test inputs, chance = "
             "0.50; layers 0-indexed.*", ""]
    stable_mid, bullets = [], []
    for a in attacks:
        sub = windows[windows["attack"] == a]
        n_layers = int((sub["start"] + sub["length"]).max())
        singles = sub[sub["length"] == 1]
        top = singles.loc[singles["auroc"].idxmax()] if len(singles) else sub.loc[sub["auroc"].idxmax()]
        key = int(top["start"])
        inside = sub[[_has(x, key) for x in sub["layers"]]]
        outside = sub[[not _has(x, key) for x in sub["layers"]]]
        text = (f"* **{attack_label(a)}**: best single layer {key} ({_num(top['auroc'])}); windows that contain it "
                f"{_range(inside['auroc'])}, windows without it {_range(outside['auroc'])}")
        if len(outside) and float(inside["auroc"].min()) > float(outside["auroc"].max()):
            text += f": every window that contains layer {key} beats every window without it"
        text += "."
        for flag, what in (("detector_choice", "The detector's own window"), ("best", "The oracle's best window")):
            hit = sub[sub[flag].astype(bool)] if flag in sub else sub.iloc[:0]
            if len(hit):
                auc = float(hit["auroc"].iloc[0])
                side = "above" if auc > 0.5 else "below" if auc < 0.5 else "at"
                text += f" {what} ({_layers(hit['layers'].iloc[0], word=True)}) gives {_num(auc)} ({side} chance)."
        thirds = [t for t in np.array_split(np.arange(n_layers), 3) if len(t)]
        spans, worst = [], []
        for name, part in zip(("early", "middle", "late"), thirds):
            got = sub[sub["start"].isin(part)]["auroc"]
            spans.append(f"{name} (start {_layers(part)}) {_range(got)}")
            worst.append((float(got.min()) if len(got) else -1.0, name))
        most = max(worst)[1]
        if most == "middle":
            stable_mid.append(a)
        text += f" AUROC by start layer: {', '.join(spans)}; the highest worst case is in the {most} third."
        bullets.append(text)
    lines.append(f"* **The paper's finding** (windows starting in the middle layers detect stably: there the worst "
                 f"window is best) holds for {len(stable_mid)} of {len(attacks)} attacks ({_names(stable_mid)}).")
    lines += bullets
    return "\n".join(lines)


__all__ = ["layer_window_summary"]
