"""Measuring detector settings against each other (the table behind the defaults, docs/detector.md).

:func:`compare_detectors` takes the group masses of one model's clean calibration inputs, clean test inputs
and triggered test inputs (:func:`~.passes.sample_masses`; one forward pass each serves every setting) and
scores every combination of ``feature`` x ``whitening`` x ``threshold_fit`` on every layer window. The
calibration pool is cut into ``draws`` disjoint calibration sets of ``n_val`` inputs; each calibrates one
detector, and every number is the mean over the draws (a false-positive rate depends on which ``n_val``
clean inputs calibrated the threshold, so one draw says little about a 1 % tail):

- ``auroc``: clean test (negatives) vs triggered test (positives), distances to the whitening fitted on the
  calibration inputs (independent of ``threshold_fit``);
- ``fpr`` / ``tpr``: share of clean / triggered test inputs above ``gamma`` (the ``quantile`` of the clean
  calibration distances, out-of-fold or in-sample); ``fpr_max`` the largest over the draws; ``fpr_lo`` /
  ``fpr_hi`` the 95 % Clopper-Pearson interval of the pooled count (test inputs x draws);
- ``in_sample_q`` / ``out_of_fold_q`` / ``test_q``: the ``quantile`` of the calibration inputs' in-sample and
  out-of-fold distances and of the clean test inputs' distances (the cause of the in-sample threshold's excess
  false positives, shown in numbers).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from ..errors import InputError
from .detector import THRESHOLD_FITS, DetectorSettings, fit_detector
from .features import FEATURES
from .whitening import WHITENINGS

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

#: Columns of :func:`compare_detectors`.
COMPARE_COLUMNS: tuple[str, ...] = (
    "window", "layers", "feature", "whitening", "threshold_fit", "quantile", "auroc", "tpr", "fpr", "fpr_max", "fpr_lo",
    "fpr_hi", "gamma", "in_sample_q", "out_of_fold_q", "test_q", "n_val", "draws", "n_clean", "n_triggered")
#: Conditions :func:`compare_detectors` needs.
CONDITIONS: tuple[str, ...] = ("calibration", "clean", "triggered")


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Two-sided exact (Clopper-Pearson) interval of a binomial proportion ``k / n``."""
    from scipy.stats import beta

    a = (1.0 - level) / 2.0
    lo = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1.0 - a, k + 1, n - k))
    return lo, hi


def compare_detectors(masses: Mapping[str, np.ndarray], windows: Mapping[str, Sequence[int]], *,
                      features: Sequence[str] = FEATURES, whitenings: Sequence[str] = WHITENINGS,
                      threshold_fits: Sequence[str] = THRESHOLD_FITS, quantile: float = 0.99,
                      n_val: int | None = None, base: DetectorSettings | None = None) -> "pd.DataFrame":
    """Every setting on every window (see the module docstring).

    Args:
        masses: ``{"calibration", "clean", "triggered"}`` -> group masses ``[N, L, H, G]`` over the model's
            layers ``0..L-1`` (:func:`~.passes.sample_masses` with every layer).
        n_val: calibration inputs per draw (default: the whole pool, one draw); ``N_calibration // n_val``
            disjoint draws.
        windows: ``{label: layers}``, e.g. ``{"L7": [7], "onset": [5, 6, 7]}``.
        base: other settings (``text_keys``, ``eps``, ``folds``, ...); default :class:`DetectorSettings`.

    Returns:
        tidy table with :data:`COMPARE_COLUMNS` (``layers`` as ``"5,6,7"``).
    """
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    missing = [c for c in CONDITIONS if c not in masses]
    if missing:
        raise InputError(f"compare_detectors: masses lack {missing}")
    base = base or DetectorSettings()
    pool = np.asarray(masses["calibration"])
    n_val = len(pool) if n_val is None else int(n_val)
    draws = len(pool) // n_val
    if draws < 1:
        raise InputError(f"compare_detectors: n_val={n_val} exceeds the {len(pool)} calibration inputs")
    rows = []
    for label, layers in windows.items():
        sl = list(layers)
        clean, trig = (np.asarray(masses[c])[:, sl] for c in CONDITIONS[1:])
        for feature in features:
            for whitening in whitenings:
                for fit in threshold_fits:
                    s = replace(base, feature=feature, whitening=whitening, threshold_fit=fit, quantile=quantile)
                    xt, xp = s.features(clean), s.features(trig)
                    per = []
                    for d in range(draws):
                        xc = s.features(pool[d * n_val:(d + 1) * n_val][:, sl])
                        det = fit_detector(xc, s, owner="compare_detectors")
                        dt, dp = det.distance(xt), det.distance(xp)
                        oof = det.distances if fit == "cross_fit" else fit_detector(
                            xc, replace(s, threshold_fit="cross_fit"), owner="compare_detectors").distances
                        per.append({
                            "auroc": float(roc_auc_score(np.r_[np.zeros(len(dt)), np.ones(len(dp))], np.r_[dt, dp])),
                            "tpr": float((dp > det.gamma).mean()), "k": int((dt > det.gamma).sum()),
                            "gamma": det.gamma, "in_sample_q": float(np.quantile(det.in_sample, quantile)),
                            "out_of_fold_q": float(np.quantile(oof, quantile)),
                            "test_q": float(np.quantile(dt, quantile))})
                    k = sum(r["k"] for r in per)
                    lo, hi = clopper_pearson(k, len(xt) * draws)
                    mean = {c: float(np.mean([r[c] for r in per]))
                            for c in ("auroc", "tpr", "gamma", "in_sample_q", "out_of_fold_q", "test_q")}
                    rows.append({
                        "window": label, "layers": ",".join(map(str, sl)), "feature": feature, "whitening": whitening,
                        "threshold_fit": fit, "quantile": quantile, **mean, "fpr": k / (len(xt) * draws),
                        "fpr_max": max(r["k"] for r in per) / len(xt), "fpr_lo": lo, "fpr_hi": hi,
                        "n_val": n_val, "draws": draws, "n_clean": len(xt), "n_triggered": len(xp)})
    return pd.DataFrame(rows, columns=list(COMPARE_COLUMNS))


def summarize(table: "pd.DataFrame", *, window: str = "onset") -> "pd.DataFrame":
    """One row per setting on ``window``: mean / min AUROC and mean / max FPR over the attacks (``attack`` column)."""
    sub = table[table["window"] == window]
    keys = ["feature", "whitening", "threshold_fit"]
    return (sub.groupby(keys, sort=False)
            .agg(auroc_mean=("auroc", "mean"), auroc_min=("auroc", "min"), fpr_mean=("fpr", "mean"),
                 fpr_max=("fpr", "max"), tpr_mean=("tpr", "mean"))
            .reset_index())


__all__ = ["COMPARE_COLUMNS", "CONDITIONS", "clopper_pearson", "compare_detectors", "summarize"]
