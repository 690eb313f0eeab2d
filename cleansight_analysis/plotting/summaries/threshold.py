"""Notebook 05 (Fig. 5): threshold quantile and validation-set size."""

from __future__ import annotations

from typing import Any

import numpy as np

from ...experiments.detection import CHOICE_AUTO, CHOICE_BEST, summarize_val_size
from ._format import _detection_counts, _layers, _pct, attack_label

#: Short names of the two layer choices in the text.
CHOICE_NAMES: dict[str, str] = {CHOICE_AUTO: "automatic", CHOICE_BEST: "oracle"}
#: The paper's reading of Fig. 5 (right): about 10 clean samples keep the FPR under 20 %.
PAPER_FPR_BOUND = 0.20


def _verdict(tpr: float, fpr: float, fpr_bound: float) -> str:
    """``detected`` (TPR >= 50 %), ``partly detected`` or ``not detected`` (TPR not above FPR); a FPR above
    ``fpr_bound`` is named."""
    if tpr <= fpr:
        return "not detected (TPR not above FPR)"
    word = "detected" if tpr >= 0.5 else "partly detected"
    return word + (f", but the FPR is above {_pct(fpr_bound)}" if fpr > fpr_bound else "")


def threshold_summary(quantiles: Any, sizes: Any, rows: Any | None = None, *,
                      paper_fpr: float = PAPER_FPR_BOUND) -> str:
    """Markdown findings of Fig. 5 (notebook 05), written from the two sweeps.

    Args:
        quantiles: :func:`~cleansight_analysis.experiments.detection.threshold_table` rows: ``attack, choice``
            (fusion onset / best window), ``layers`` (``"5,6,7"``), ``quantile, tpr, fpr, n_val``.
        sizes: :func:`~cleansight_analysis.experiments.detection.val_size_table` rows, one per random subset:
            ``attack, choice, layers, n_val, repeat, tpr, fpr, quantile``.
        rows: the detection rows (``DetectionInputs.rows``: ``sample_id, condition, layer, head``) for the
            sample counts and the head count, or None.
        paper_fpr: the paper's FPR bound for small validation sets (:data:`PAPER_FPR_BOUND`).

    Returns:
        Markdown: a header, TPR / FPR with every validation input at the validation-size sweep's quantile
        per attack and choice (with a detected / partly / not verdict; an FPR above ``paper_fpr`` is named),
        the FPR against the ``1 - q`` line,
        and the mean FPR against the validation-set size.
    """
    attacks = list(dict.fromkeys(quantiles["attack"]))
    q = float(sizes["quantile"].iloc[0]) if "quantile" in sizes and len(sizes) else 0.99
    n_val = int(quantiles["n_val"].max()) if "n_val" in quantiles else None
    summary = summarize_val_size(sizes)
    repeats = int(summary["repeats"].max()) if len(summary) else 0
    head = f"{_detection_counts(rows)}; " if rows is not None else ""
    lines = [f"*Computed from this run's sweeps: {head}the threshold is the q-quantile of the distances of "
             f"|D_val| = {n_val} clean validation inputs; the size sweep draws {repeats} random subsets per size "
             f"at q = {q:g}.*", ""]

    verdicts = []
    for a in attacks:
        said = []
        for choice in dict.fromkeys(quantiles[quantiles["attack"] == a]["choice"]):
            sub = quantiles[(quantiles["attack"] == a) & (quantiles["choice"] == choice)]
            at = sub[np.isclose(sub["quantile"], q)]
            if at.empty:
                continue
            tpr, fpr = float(at["tpr"].iloc[0]), float(at["fpr"].iloc[0])
            said.append(f"{CHOICE_NAMES.get(choice, choice)} ({_layers(at['layers'].iloc[0], word=True)}): "
                        f"TPR {_pct(tpr, 1)}, FPR {_pct(fpr, 1)}, {_verdict(tpr, fpr, paper_fpr)}")
        if said:
            verdicts.append(f"{attack_label(a)}: " + "; ".join(said))
    lines.append(f"* **At q = {q:g} with all {n_val} validation inputs**: " + ". ".join(verdicts) + ".")

    over = []
    for (a, choice), sub in quantiles.groupby(["attack", "choice"], sort=False):
        above = int((sub["fpr"] > 1 - sub["quantile"]).sum())
        at = sub[np.isclose(sub["quantile"], q)]
        at_q = (f" (at q = {q:g}: {_pct(at['fpr'].iloc[0], 1)} vs {_pct(1 - q, 1)})" if len(at) else "")
        over.append((above, len(sub), f"{attack_label(a)} {CHOICE_NAMES.get(choice, choice)}: {above} of "
                                      f"{len(sub)}{at_q}"))
    if over:
        every = all(k == m for k, m, _ in over)
        text = ("* **FPR against the `1 - q` line**: the measured FPR lies above `1 - q` at "
                + ("every swept quantile, for every attack and layer choice" if every else
                   "this many of the swept quantiles") + ": " + "; ".join(t for _, _, t in over) + ".")
        if any(k > m / 2 for k, m, _ in over):
            text += (" Above the line, clean test inputs land farther from the validation mean than the validation "
                     "inputs that set the threshold.")
        lines.append(text)

    auto = summary[summary["choice"] == CHOICE_AUTO] if "choice" in summary else summary
    said = []
    for a in attacks:
        sub = auto[auto["attack"] == a].sort_values("n_val")
        if sub.empty:
            continue
        pairs = ", ".join(f"{int(n)}: {_pct(f, 1)}" for n, f in zip(sub["n_val"], sub["fpr_mean"]))
        low = sub[sub["fpr_mean"] < paper_fpr]
        first = (f"first below {_pct(paper_fpr)} at {int(low['n_val'].iloc[0])} samples" if len(low)
                 else f"never below {_pct(paper_fpr)}")
        said.append(f"{attack_label(a)} ({pairs}; {first})")
    if said:
        text = ("* **Validation-set size** (automatic layers, mean FPR over the subsets by |D_val|): "
                + "; ".join(said) + f". The paper reads an FPR under {_pct(paper_fpr)} from about 10 samples on.")
        if 0 < q < 1:
            text += (f" Below 1 / (1 - q) = {1 / (1 - q):.0f} validation inputs the {q:g}-quantile is (close to) "
                     "the largest validation distance")
            if rows is not None:
                tables = list(rows.values()) if isinstance(rows, dict) else [rows]
                heads = max(int(t["head"].nunique()) for t in tables) if "head" in tables[0] else None
                k = {len(str(x).split(",")) for x in auto["layers"]} if "layers" in auto else set()
                if heads and k:
                    dims = "/".join(str(v * heads) for v in sorted(k))
                    text += (f", and the whitening of the {dims}-dimensional head vector (detection layers x "
                             f"{heads} heads) is estimated from those few inputs")
            text += "."
        lines.append(text)
    return "\n".join(lines)


__all__ = ["CHOICE_NAMES", "PAPER_FPR_BOUND", "threshold_summary"]
