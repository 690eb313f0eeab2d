"""Render docs/detector.md from the ``detector_features`` table (every number in the document comes from it).

Used by ``benchmarks/detector_features.py`` (after measuring, or with ``--docs-only`` from the saved table).
"""

from __future__ import annotations

from typing import Any, Sequence

ATTACKS = ("badnet", "blended", "sig", "wanet", "trojvlm", "vlood")


def _fmt(v: Any, digits: int = 3) -> str:
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _md(frame, digits: int = 3) -> str:
    """A pandas frame as a GitHub markdown table (no tabulate needed)."""
    cols = [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(_fmt(v, digits) for v in row) + " |")
    return "\n".join(lines)


def _pct(v: float) -> str:
    return f"{100 * v:.1f} %"


def _pivot(table, window: str, value: str, fits: Sequence[str]):
    sub = table[(table["window"] == window) & table["threshold_fit"].isin(fits)]
    wide = sub.pivot_table(index=["feature", "whitening", "threshold_fit"], columns="attack", values=value,
                           sort=False)
    wide = wide[[a for a in ATTACKS if a in wide.columns]]
    wide["mean"] = wide.mean(axis=1)
    if value.startswith("fpr"):
        wide["max"] = wide[[a for a in ATTACKS if a in wide.columns]].max(axis=1)
    return wide.reset_index()


def render(table) -> str:
    from cleansight_analysis.detection import DetectorSettings

    d, p = DetectorSettings(), DetectorSettings.paper()
    q = float(table["quantile"].iloc[0])
    n_val, draws = int(table["n_val"].iloc[0]), int(table["draws"].iloc[0])
    n_clean, n_trig = int(table["n_clean"].iloc[0]), int(table["n_triggered"].iloc[0])

    def cell(attack: str, window: str, feature: str, whitening: str, fit: str, col: str) -> float:
        sub = table[(table["attack"] == attack) & (table["window"] == window) & (table["feature"] == feature)
                    & (table["whitening"] == whitening) & (table["threshold_fit"] == fit)]
        return float(sub[col].iloc[0])

    onset = {a: table[(table["attack"] == a) & (table["window"] == "onset")]["layers"].iloc[0]
             for a in ATTACKS if a in set(table["attack"])}
    dflt = (d.feature, d.whitening, d.threshold_fit)
    paper = (p.feature, p.whitening, p.threshold_fit)
    cause = []
    for attack, window in (("badnet", "onset"), ("badnet", "L7")):
        for feat, wh in ((p.feature, p.whitening), (d.feature, d.whitening)):
            cause.append({"attack": attack, "window": f"{window} ({onset[attack] if window == 'onset' else '7'})",
                          "feature": feat, "whitening": wh,
                          "in-sample q99": cell(attack, window, feat, wh, "in_sample", "in_sample_q"),
                          "out-of-fold q99": cell(attack, window, feat, wh, "cross_fit", "out_of_fold_q"),
                          "clean test q99": cell(attack, window, feat, wh, "cross_fit", "test_q"),
                          "FPR in-sample": _pct(cell(attack, window, feat, wh, "in_sample", "fpr")),
                          "FPR cross-fit": _pct(cell(attack, window, feat, wh, "cross_fit", "fpr"))})
    import pandas as pd

    cause_df = pd.DataFrame(cause)
    auroc_l7 = _pivot(table, "L7", "auroc", ["cross_fit"]).drop(columns="threshold_fit")
    auroc_on = _pivot(table, "onset", "auroc", ["cross_fit"]).drop(columns="threshold_fit")
    fpr_on = _pivot(table, "onset", "fpr", ["cross_fit", "in_sample"])
    fpr_l7 = _pivot(table, "L7", "fpr", ["cross_fit", "in_sample"])
    layers = table[(table["feature"] == d.feature) & (table["whitening"] == d.whitening)
                   & (table["threshold_fit"] == d.threshold_fit)]
    per_layer = layers.pivot_table(index="attack", columns="window", values="auroc", sort=False)
    per_layer = per_layer.loc[[a for a in ATTACKS if a in per_layer.index]].reset_index()
    per_layer_p = table[(table["feature"] == p.feature) & (table["whitening"] == p.whitening)
                        & (table["threshold_fit"] == "cross_fit")].pivot_table(index="attack", columns="window",
                                                                              values="auroc", sort=False)
    per_layer_p = per_layer_p.loc[[a for a in ATTACKS if a in per_layer_p.index]].reset_index()

    g = {  # the goals of the issue, read from the table
        "badnet_l7": cell("badnet", "L7", *dflt, "auroc"),
        "blended_l7": cell("blended", "L7", *dflt, "auroc"),
        "paper_badnet_l7": cell("badnet", "L7", p.feature, p.whitening, "cross_fit", "auroc"),
        "paper_blended_l7": cell("blended", "L7", p.feature, p.whitening, "cross_fit", "auroc"),
        "fpr_on_mean": float(fpr_on[(fpr_on.feature == d.feature) & (fpr_on.whitening == d.whitening)
                                    & (fpr_on.threshold_fit == d.threshold_fit)]["mean"].iloc[0]),
        "fpr_on_max": float(fpr_on[(fpr_on.feature == d.feature) & (fpr_on.whitening == d.whitening)
                                   & (fpr_on.threshold_fit == d.threshold_fit)]["max"].iloc[0]),
        "fpr_l7_mean": float(fpr_l7[(fpr_l7.feature == d.feature) & (fpr_l7.whitening == d.whitening)
                                    & (fpr_l7.threshold_fit == d.threshold_fit)]["mean"].iloc[0]),
        "paper_fpr_on_mean": float(fpr_on[(fpr_on.feature == p.feature) & (fpr_on.whitening == p.whitening)
                                          & (fpr_on.threshold_fit == p.threshold_fit)]["mean"].iloc[0]),
        "paper_fpr_on_max": float(fpr_on[(fpr_on.feature == p.feature) & (fpr_on.whitening == p.whitening)
                                         & (fpr_on.threshold_fit == p.threshold_fit)]["max"].iloc[0]),
    }
    goals = []
    for (feat, wh), _ in table.groupby(["feature", "whitening"], sort=False):
        row = {"feature": feat, "whitening": wh,
               "BadNet L7 AUROC": cell("badnet", "L7", feat, wh, "cross_fit", "auroc"),
               "Blended L7 AUROC": cell("blended", "L7", feat, wh, "cross_fit", "auroc"),
               "mean AUROC L7": float(auroc_l7[(auroc_l7.feature == feat) & (auroc_l7.whitening == wh)]["mean"].iloc[0]),
               "mean AUROC onset": float(auroc_on[(auroc_on.feature == feat) & (auroc_on.whitening == wh)]["mean"].iloc[0])}
        fmax = max(float(f[(f.feature == feat) & (f.whitening == wh) & (f.threshold_fit == "cross_fit")]["max"].iloc[0])
                   for f in (fpr_on, fpr_l7))
        row["max FPR (cross-fit)"] = fmax
        row["meets the goals"] = "yes" if (row["BadNet L7 AUROC"] >= 0.99 and row["Blended L7 AUROC"] >= 0.85
                                           and fmax <= 0.02) else "no"
        goals.append(row)
    goals_df = pd.DataFrame(goals)
    meeting = goals_df[goals_df["meets the goals"] == "yes"]
    meeting_text = ", ".join(f"`{r.feature}` + `{r.whitening}`" for r in meeting.itertuples()) or "none"
    best_mean = goals_df.sort_values("mean AUROC L7", ascending=False).iloc[0]
    wanet_l7 = cell("wanet", "L7", *dflt, "auroc")
    better = [a for a in onset if cell(a, "L7", best_mean["feature"], best_mean["whitening"], "cross_fit", "auroc")
              > cell(a, "L7", *dflt, "auroc")]
    better_text = ", ".join(better) if better else "no attack"
    onset_text = ", ".join(f"{a} [{w}]" for a, w in onset.items())
    return f"""# The detector: features, whitening, threshold

<!-- Generated by benchmarks/detector_features.py from data/results/detector_features.parquet; do not edit by
hand: rerun `python benchmarks/detector_features.py --docs-only` after changing the renderer
(benchmarks/detector_doc.py), or without `--docs-only` to measure again. -->

CleanSight's detector lives in one package, `cleansight_analysis.detection`; CleanSight, the layer
selector (`defenses.layers`), the separability analyses (`attention.separability`), the detection sweeps
(`evaluation.sweeps`), random pruning and the oracle pruning sweep all call it:

| piece | module | setting |
|---|---|---|
| answer-query rows -> group masses (float64) -> feature | `detection.features` | `feature`: `"ratio"` (the paper's `S = image / (text + eps)`, `eps = 1e-12`), `"log_ratio"` (`log(image + log_eps) - log(text + log_eps)`, `log_eps = 1e-6`), `"masses"` (image and text mass: 2 values per head) |
| whitened distance | `detection.whitening` | `whitening`: `"diagonal"` (the paper's per-dimension mu, sigma) or `"ledoit_wolf"` (Mahalanobis distance under `sklearn.covariance.LedoitWolf`'s shrunk covariance of the per-dimension standardised features) |
| threshold | `detection.detector` | `quantile` (0.99) of clean distances; `threshold_fit`: `"cross_fit"` (5-fold: whitening fitted on 4 folds, the 5th scored; gamma = quantile of the pooled out-of-fold distances; final whitening on all) or `"in_sample"` (the paper's) |
| pruning set Omega | `detection.pruning` | `tau` (Omega = image keys with `max_h alpha > tau` at `l_e`) |
| pre-softmax key mask | `detection.masking` | `mask_scope` |
| reading rows inside a forward / generate | `detection.passes` | |

Defaults (`CleanSightConfig()`): `feature="{d.feature}"`, `whitening="{d.whitening}"`,
`threshold_fit="{d.threshold_fit}"`. The paper's detector is the preset `CleanSightConfig.paper()`
(`feature="{p.feature}"`, `whitening="{p.whitening}"`, `threshold_fit="{p.threshold_fit}"`).

## Why the paper's threshold flags too many clean inputs

The paper sets `gamma` to the {q:g} quantile of the calibration samples' own distances, with `mu` and
`sigma` fitted on those same samples. Each sample pulls `mu` and `sigma` towards itself, so its in-sample
distance is smaller than a new input's (with a full covariance, which adapts in every direction, more so);
with `n` samples a standardised in-sample coordinate can never exceed `sqrt(n - 1)` (about 14 for n = {n_val}),
however heavy the tail. The raw ratio is extremely heavy-tailed on these models (heads that give the text
almost no attention divide by nearly 0), so its in-sample {q:g} quantile sits near that ceiling while new
clean inputs go far beyond it. Cross-fitting scores every
calibration sample with a whitening that did not see it, as a test input is scored.

Quantiles of the distances (mean over {draws} calibration sets of {n_val} clean scenes; clean test: {n_clean}
other clean scenes):

{_md(cause_df, 2)}

## Measurement

The tiny family shipped before the reading stage (issue 13): LoRA backdoors on the language model, stealing
in the last layers; the table's manifest holds those models' fingerprints. The projector-poisoned family
shipped now separates in the middle layers (notebook 03). One forward pass per scene: {draws} disjoint calibration sets of {n_val} clean scenes
(`synthetic_samples("calibration", ...)`), {n_clean} clean test scenes and the first {n_trig} of them with the
trigger (`triggered_copy`). Every number is the mean over the {draws} calibration sets; `max` is the worst
attack. AUROC: clean test vs triggered test distances (independent of `threshold_fit`). FPR / TPR at
q = {q:g}. Windows: `L7` = layer 7 alone; `onset` = the window `CleanSight(layers="auto")` picks
(fusion onset, 3 layers): {onset_text}.

### AUROC, layer 7

{_md(auroc_l7)}

### AUROC, fusion-onset window (the default `layers="auto"`)

{_md(auroc_on)}

### False-positive rate at q = {q:g}, fusion-onset window

{_md(fpr_on)}

### False-positive rate at q = {q:g}, layer 7

{_md(fpr_l7)}

### AUROC per layer, default detector (`{d.feature}` / `{d.whitening}`)

{_md(per_layer)}

### AUROC per layer, the paper's feature (`{p.feature}` / `{p.whitening}`)

{_md(per_layer_p)}

## The default and why

- **Threshold: `threshold_fit="{d.threshold_fit}"`.** With the paper's in-sample threshold the paper's
  detector flags {_pct(g["paper_fpr_on_mean"])} of new clean scenes on average (worst attack
  {_pct(g["paper_fpr_on_max"])}) at q = {q:g}; cross-fitting keeps the promise `FPR ~ 1 - q` for every
  feature and whitening (tables above).
- **Feature and whitening: `"{d.feature}"` + `"{d.whitening}"`.** The issue's goals were BadNet layer-7
  AUROC >= 0.99, Blended >= 0.85 and FPR <= 2 % at q = {q:g}; settings that meet all three (table below):
  {meeting_text}. The default reaches BadNet layer 7 {g["badnet_l7"]:.3f} (paper's ratio
  {g["paper_badnet_l7"]:.3f}) and Blended layer 7 {g["blended_l7"]:.3f} (ratio {g["paper_blended_l7"]:.3f}).
  The highest mean layer-7 AUROC over the six attacks is `{best_mean["feature"]}` + `{best_mean["whitening"]}`
  ({best_mean["mean AUROC L7"]:.3f}; fusion-onset window {best_mean["mean AUROC onset"]:.3f}), better at layer 7
  on {better_text} but below the goals on BadNet ({best_mean["BadNet L7 AUROC"]:.3f}) and Blended
  ({best_mean["Blended L7 AUROC"]:.3f}); it stays available as `feature="masses"`.
  The logarithm turns the ratio's heavy tail (text masses near 0) into a bounded, roughly symmetric feature,
  which (a) lets the out-of-fold quantile estimate the tail from {n_val} samples and (b) makes the
  covariance estimable, so Ledoit-Wolf can use the correlations between heads (on the raw ratio its shrinkage
  goes to 1, i.e. back to diagonal, and both whitenings score alike).
- **False positives of the default at q = {q:g}:** {_pct(g["fpr_on_mean"])} on average on the fusion-onset
  window (worst attack {_pct(g["fpr_on_max"])}), {_pct(g["fpr_l7_mean"])} on layer 7. With {n_val}
  calibration scenes the q = {q:g} threshold rests on the 2-3 largest clean distances, so a single
  calibration set's FPR scatters around 1 - q by about +-0.7 points (calibration-conditional spread
  `Beta(2-3, ~198)`); the means over {draws} sets show where it centres.
- **Where no setting helps:** an AUROC below 0.5 means triggered inputs sit *closer* to the clean mean than
  clean inputs do (the trigger makes the layer's attention more typical, e.g. WaNet at layer 7 under the
  default: {wanet_l7:.3f}); a distance-to-the-clean-mean detector cannot flag them, whatever the feature.

{_md(goals_df)}

Reproduce: `python benchmarks/detector_features.py` (table + this document, about 5 minutes on 2 CPU
cores); `--docs-only` rewrites this document from the saved table.
"""
