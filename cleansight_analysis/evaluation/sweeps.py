"""Detection and pruning sweeps (Figs. 4-6).

The detection sweeps (:func:`layer_window_sweep`, :func:`quantile_sweep`, :func:`val_size_sweep`) work on
a table of group masses (:func:`detection_table`) without any generation, through the detector core
(:mod:`cleansight_analysis.detection`): features, whitening and threshold follow a
:class:`~cleansight_analysis.detection.DetectorSettings` (default: CleanSight's defaults), so a sweep scores
an input exactly as ``CleanSight.score`` does on the same batches; :func:`tau_sweep` runs the pruning
rule with an oracle detector (every triggered input flagged) and scores the answers with the one scorer
(:mod:`~cleansight_analysis.evaluation.scoring`).
"""

from __future__ import annotations

import numbers
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..attacks import triggered_copy
from ..attention.stealing import StealingSettings
from ..data.base import Sample
from ..defenses.ablations import with_calibration
from ..defenses.base import Defense
from ..detection.detector import Detector, DetectorSettings, fit_detector, least_samples
from ..detection.masking import key_mask_hooks
from ..detection.pruning import attention_pruning_positions
from ..detection.tables import mass_table, table_features
from ..errors import InputError
from .runner import check_int as _pos_int
from .runner import image_of as _image_of
from .runner import sample_list as _samples
from .runner import synthetic_samples
from .scoring import attack_success_rate, mean_utility, target_of

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

#: |D_val| values of Fig. 5 (right).
VAL_SIZES: tuple[int, ...] = (1, 5, 10, 25, 50, 100, 200)
#: Quantiles of Fig. 5 (left).
QUANTILES: tuple[float, ...] = (0.8, 0.85, 0.9, 0.95, 0.97, 0.99, 1.0)
#: tau values of Fig. 6.
TAUS: tuple[float, ...] = (0.0, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


# ---------------------------------------------------------------------------------------------
# Detection sweeps from stealing features (no generation)
# ---------------------------------------------------------------------------------------------

#: ``condition`` labels of :func:`detection_table`.
DETECTION_CONDITIONS = ("calibration", "clean", "triggered")


def detection_table(model: Any, attack: Any, *, n_val: int = 200, n_test: int = 256, seed: int = 0,
                    samples: Sequence[Sample] | None = None, val_samples: Sequence[Sample] | None = None,
                    settings: Any = None, batch_size: int | None = None, progress: bool = True) -> "pd.DataFrame":
    """Group masses and ratios (``sample_id, condition, layer, head, mass_*, ratio``) of the clean validation
    set (condition ``"calibration"``), the clean test set (``"clean"``) and its triggered copies
    (``"triggered"``): the input of every detection sweep.

    Computed by :func:`cleansight_analysis.detection.mass_table`, i.e. by the forward passes CleanSight runs
    (left padding, consecutive batches of ``batch_size``; default ``settings.batch_size`` or 16, CleanSight's).

    Args:
        settings: a :class:`~cleansight_analysis.attention.stealing.StealingSettings` (``text_keys``, ``eps``
            of the ``ratio`` column, ``layers``; ``batch_size`` unless given) or None.
    """
    import pandas as pd

    if settings is not None and not isinstance(settings, StealingSettings):
        raise InputError(f"detection_table: settings must be a StealingSettings, got {type(settings).__name__}")
    st = settings or StealingSettings(batch_size=16)
    size = _pos_int(batch_size if batch_size is not None else st.batch_size, "batch_size", "detection_table")
    test = list(samples) if samples is not None else synthetic_samples("test", n_test, seed)
    val = list(val_samples) if val_samples is not None else synthetic_samples("calibration", n_val, seed)
    kw = dict(layers=st.layers, batch_size=size, text_keys=st.text_keys, eps=st.eps, progress=progress)
    parts = [mass_table(model, val, condition="calibration", **kw),
             mass_table(model, test, condition="clean", **kw),
             mass_table(model, triggered_copy(test, attack, seed=seed), condition="triggered", **kw)]
    frame = pd.concat(parts, ignore_index=True)
    frame.attrs["stealing"] = {**parts[0].attrs.get("stealing", {}), "attack": attack.to_dict(), "seed": seed}
    return frame


def _settings(settings: Any, owner: str) -> DetectorSettings:
    if settings is None:
        return DetectorSettings()
    if not isinstance(settings, DetectorSettings):
        raise InputError(f"{owner}: settings must be a DetectorSettings, got {type(settings).__name__}")
    return settings


def _matrices(table: "pd.DataFrame", layers: Sequence[int] | None, settings: DetectorSettings,
              owner: str) -> list[np.ndarray]:
    """Features of the calibration, clean and triggered rows."""
    return [table_features(table, c, layers, settings, owner=owner)[1] for c in DETECTION_CONDITIONS]


def detection_scores(table: "pd.DataFrame", *, layers: Sequence[int] | None = None,
                     settings: DetectorSettings | None = None) -> tuple[Detector, dict[str, np.ndarray]]:
    """The detector fitted on the ``"calibration"`` rows and the distances of every condition's samples
    (first-seen order): ``(detector, {condition: [n] distances})``. What every sweep scores with."""
    owner = "detection_scores"
    settings = _settings(settings, owner)
    cal, clean, trig = _matrices(table, layers, settings, owner)
    det = fit_detector(cal, settings, owner=owner)
    return det, {"calibration": det.distance(cal), "clean": det.distance(clean), "triggered": det.distance(trig)}


def _check_quantile(q: Any, owner: str) -> float:
    if isinstance(q, bool) or not isinstance(q, numbers.Real) or not 0.0 <= float(q) <= 1.0:
        raise InputError(f"{owner}: quantile {q!r} must be a number in [0, 1]")
    return float(q)


def _rates(det: Detector, clean: np.ndarray, trig: np.ndarray, quantile: float) -> dict[str, float]:
    gamma = det.threshold(quantile)
    return {"threshold": gamma, "tpr": float((det.distance(trig) > gamma).mean()),
            "fpr": float((det.distance(clean) > gamma).mean())}


def layer_window_sweep(table: "pd.DataFrame", *, starts: Sequence[int] | None = None,
                       lengths: Sequence[int] = (1, 2, 3, 4, 5),
                       settings: DetectorSettings | None = None) -> "pd.DataFrame":
    """Fig. 4: AUROC of the detector (``settings``: feature and whitening) vs start layer and window length.

    Fitted on the ``"calibration"`` rows, scored on ``"clean"`` (negatives) and ``"triggered"``
    (positives). Windows running past the last layer of the table are skipped.

    Returns:
        ``start, length, layers, auroc`` (one row per valid window).
    """
    import pandas as pd

    from sklearn.metrics import roc_auc_score

    owner = "layer_window_sweep"
    settings = _settings(settings, owner)
    all_layers = sorted(int(x) for x in table["layer"].unique())
    starts = all_layers if starts is None else [int(s) for s in starts]
    rows = []
    for s in starts:
        for n in lengths:
            n = _pos_int(n, "window length", owner)
            window = list(range(s, s + n))
            if not set(window) <= set(all_layers):
                continue
            cal, clean, trig = _matrices(table, window, settings, owner)
            w = fit_detector(cal, replace(settings, threshold_fit="in_sample"), owner=owner).whitener  # AUROC: no gamma
            scores = np.r_[w.distance(clean), w.distance(trig)]
            rows.append({"start": s, "length": n, "layers": ",".join(map(str, window)),
                         "auroc": float(roc_auc_score(np.r_[np.zeros(len(clean)), np.ones(len(trig))], scores))})
    return pd.DataFrame(rows, columns=["start", "length", "layers", "auroc"])


def quantile_sweep(table: "pd.DataFrame", *, layers: Sequence[int] | None = None,
                   quantiles: Sequence[float] = QUANTILES, settings: DetectorSettings | None = None) -> "pd.DataFrame":
    """Fig. 5 (left): TPR / FPR vs the threshold quantile ``q`` over the clean calibration distances
    (out-of-fold or in-sample per ``settings.threshold_fit``).

    Scores are computed once; only the threshold moves, so FPR and TPR are non-increasing in ``q``.

    Returns:
        ``quantile, threshold, tpr, fpr, n_val``.
    """
    import pandas as pd

    owner = "quantile_sweep"
    settings = _settings(settings, owner)
    qs = [_check_quantile(q, owner) for q in quantiles]
    cal, clean, trig = _matrices(table, layers, settings, owner)
    det = fit_detector(cal, settings, owner=owner)
    rows = [{"quantile": q, **_rates(det, clean, trig, q), "n_val": len(cal)} for q in qs]
    return pd.DataFrame(rows)


def val_size_sweep(table: "pd.DataFrame", *, layers: Sequence[int] | None = None, sizes: Sequence[int] = VAL_SIZES,
                   quantile: float = 0.99, repeats: int = 5, seed: int = 0,
                   settings: DetectorSettings | None = None) -> "pd.DataFrame":
    """Fig. 5 (right): TPR / FPR vs |D_val|: ``repeats`` random subsets of each size of the calibration rows
    (sizes above the available calibration samples, and below what ``settings`` can fit, e.g. 3 for
    ``threshold_fit="cross_fit"``, are skipped).

    Returns:
        ``n_val, repeat, threshold, tpr, fpr`` (aggregate with ``groupby("n_val").mean()``).
    """
    import pandas as pd

    owner = "val_size_sweep"
    quantile = _check_quantile(quantile, owner)
    repeats = _pos_int(repeats, "repeats", owner)
    settings = _settings(settings, owner)
    cal, clean, trig = _matrices(table, layers, settings, owner)
    rng = np.random.default_rng(seed)
    rows = []
    for size in sizes:
        size = _pos_int(size, "size", owner)
        if size > len(cal) or size < least_samples(settings):
            continue
        for r in range(repeats if size < len(cal) else 1):
            idx = rng.choice(len(cal), size=size, replace=False)
            det = fit_detector(cal[idx], settings, owner=owner)
            rows.append({"n_val": size, "repeat": r, **_rates(det, clean, trig, quantile)})
    return pd.DataFrame(rows, columns=["n_val", "repeat", "threshold", "tpr", "fpr"])


# ---------------------------------------------------------------------------------------------
# Oracle tau sweep (Fig. 6)
# ---------------------------------------------------------------------------------------------


def tau_sweep(model: Any, attack: Any, *, layer: int | None = None, taus: Sequence[float] = TAUS, n_test: int = 64, seed: int = 0,
              samples: Sequence[Sample] | None = None, batch_size: int = 32, max_new_tokens: int = 12,
              pruning: Callable[[Any, Any, int, float], list[torch.Tensor]] | None = None,
              defense: Defense | None = None, progress: bool = True) -> "pd.DataFrame":
    """Fig. 6: ASR and poisoned utility vs ``tau`` with an oracle detector (every triggered input flagged).

    Each triggered input is pruned with ``pruning(model, batch, layer, tau)`` (default
    :func:`attention_pruning_positions`, ``docs/method.md#pruning``, at the last detection layer ``layer``) and the
    keys are masked from ``layer`` on (:func:`key_mask_hooks`). With a fitted CleanSight ``defense``
    its own pruning runs instead (a copy with ``gamma = -inf`` and each ``tau``; ``layer`` is then
    its last detection layer, whatever is passed) so its ``mask_scope`` applies.

    Returns:
        ``tau, asr, poisoned_utility, mean_pruned, layer, n``.
    """
    import pandas as pd

    owner = "tau_sweep"
    if defense is not None:
        layer = list(getattr(defense.calibration, "layers", [layer]))[-1]
    if layer is None:
        raise InputError(f"{owner}: give the pruning layer (the last detection layer) or a fitted CleanSight")
    layer = model.check_layers([layer])[0]
    pruning = pruning or attention_pruning_positions
    test = _samples(samples if samples is not None else synthetic_samples("test", _pos_int(n_test, "n_test", owner),
                                                                          seed), "samples", owner)
    trig = triggered_copy(test, attack, seed=seed)
    target = target_of(attack)
    texts: dict[float, list[str]] = {float(t): [] for t in taus}
    counts: dict[float, list[int]] = {float(t): [] for t in taus}
    for s in tqdm(range(0, len(trig), batch_size), desc="tau sweep", disable=not progress, mininterval=2.0):
        chunk = trig[s:s + batch_size]
        batch = model.prepare([_image_of(x) for x in chunk], [x.prompt for x in chunk])
        for tau in texts:
            if defense is not None:
                out = with_calibration(defense, gamma=float("-inf"), tau=tau).generate(
                    model, batch, max_new_tokens=max_new_tokens)
                texts[tau] += list(out.texts)
                counts[tau] += [int(torch.as_tensor(p).numel()) for p in (out.pruned or [])]
                continue
            pos = pruning(model, batch, layer, tau)
            hooks = key_mask_hooks(model, pos, layer)
            texts[tau] += model.generate(batch, max_new_tokens=max_new_tokens, hooks=hooks).texts
            counts[tau] += [len(p) for p in pos]
    rows = [{"tau": tau, "asr": attack_success_rate(texts[tau], target),
             "poisoned_utility": mean_utility(texts[tau], test),
             "mean_pruned": float(np.mean(counts[tau])), "layer": layer, "n": len(test)} for tau in texts]
    return pd.DataFrame(rows)


__all__ = ["DETECTION_CONDITIONS", "QUANTILES", "TAUS", "VAL_SIZES", "detection_scores", "detection_table",
           "layer_window_sweep",
           "quantile_sweep", "tau_sweep", "val_size_sweep"]
