"""Detection analyses behind the paper's Figs. 3, 4 and 5 (``docs/method.md#score``, ``#detection``, ``#figures``).

Every analysis starts from the same two model-dependent tables per attack, both cached:

- :func:`detection_rows`: the stealing ratio ``S^{l,h}`` of the answer query for ``n_val`` clean
  validation inputs (condition ``"calibration"``, the detector's ``D_val``), the clean test inputs
  (``"clean"``) and their triggered copies (``"triggered"``), one row per sample x layer x head
  (:func:`~cleansight_analysis.evaluation.sweeps.detection_table`);
- :func:`fusion_onset_table`: the clean-only fusion-onset scan of
  :func:`~cleansight_analysis.defenses.layers.select_detection_layers` (the detector's automatic
  choice of ``L_det``, ``window`` layers) on the first ``n_onset`` validation inputs.

:func:`detection_inputs` computes both for every attack of the notebook (one model load per attack)
and returns a :class:`DetectionInputs`. The figure tables are then pure table arithmetic:

- Fig. 3 :func:`layerwise_detection_table`: AUROC per layer of the head-specific whitened vector and of
  the head-averaged scalar (:func:`~cleansight_analysis.attention.separability.layer_separability`);
- Fig. 4 :func:`layer_window_table`: AUROC per detection window (start layer x window length,
  :func:`~cleansight_analysis.evaluation.sweeps.layer_window_sweep`);
- Fig. 5 :func:`detection_layer_choices`, :func:`threshold_table`, :func:`val_size_table`: TPR / FPR vs
  the threshold quantile and vs ``|D_val|`` (:func:`~cleansight_analysis.evaluation.sweeps.quantile_sweep`,
  :func:`~cleansight_analysis.evaluation.sweeps.val_size_sweep`) for two choices of ``L_det``.

The detector is always calibrated on the ``"calibration"`` rows only; AUROC, TPR and FPR are measured on
the clean test inputs (negatives) and their triggered copies (positives). Layers are 0-indexed.

The three detection notebooks use the same rows: ``detection_rows_<attack>`` and
``fusion_onset_<attack>`` are cached once in the shared results folder
(:attr:`FigureContext.shared_dir`), so a full ``make figures`` loads each model once, whichever of the
three notebooks runs first. The Fig. 4 window sweep (needed by Fig. 5 for the best window) is shared the
same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from ..attention.separability import layer_separability
from ..defenses.layers import select_detection_layers
from ..detection import DetectorSettings
from ..errors import InputError
from ..evaluation.visibility import MIN_PROBE_IMAGES, trigger_visibility
from ..evaluation.sweeps import (QUANTILES, VAL_SIZES, detection_table, layer_window_sweep, quantile_sweep,
                                 val_size_sweep)
from .context import fmt_pct

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from .context import FigureContext

#: Clean validation inputs the detector calibrates on (the paper's default |D_val|).
N_VAL = 200
#: Layers in the detection window chosen by the fusion-onset scan (the paper: 3 layers).
WINDOW = 3
#: Validation inputs used by the fusion-onset scan (``n_layers + 1`` forward passes each).
N_ONSET = 16
#: Columns kept from :func:`~cleansight_analysis.evaluation.sweeps.detection_table` (``mass_image``: the
#: answer query's attention on the image tokens, for :func:`mechanism_table`).
ROW_COLUMNS = ("sample_id", "condition", "layer", "head", "ratio", "mass_image")
#: What counts as the paper's mechanism in one layer (:func:`mechanism_table`, issue 13): the answer query's
#: image share (mean over heads and inputs) rises under the trigger by at least ``min_rise``, the
#: head-specific AUROC is at least ``min_auroc``, and the layer lies before the last quarter of the LM.
MECHANISM: dict[str, float] = {"min_rise": 0.05, "min_auroc": 0.95}

#: ``choice`` labels of :func:`detection_layer_choices`.
CHOICE_AUTO = "fusion onset (automatic, clean only)"
CHOICE_BEST = "best window of Fig. 4 (oracle)"


def figure_detector() -> Any:
    """The detector of the figure replications: the paper's (ratio, diagonal whitening, in-sample threshold),
    so Figs. 4-5 show what the paper's detector does (CleanSight's own defaults: docs/detector.md)."""
    return DetectorSettings.paper()


# ---------------------------------------------------------------------------------------------
# Sharing cached tables between the detection notebooks
# ---------------------------------------------------------------------------------------------


def _shared_cached(ctx: "FigureContext", name: str, compute: Callable[[], Any], *, model: Any = None,
                   attack: Any = None, **params: Any) -> "pd.DataFrame":
    """``ctx.cached(..., shared=True)``: one copy for the three detection notebooks."""
    return ctx.cached(name, compute, model=model, attack=attack, shared=True, **params)


# ---------------------------------------------------------------------------------------------
# Model-dependent tables
# ---------------------------------------------------------------------------------------------


def _check_count(value: Any, what: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InputError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def detection_rows(ctx: "FigureContext", attack: str, *, n_val: int = N_VAL) -> "pd.DataFrame":
    """Stealing ratios of ``D_val``, the clean test inputs and their triggered copies for one attack (cached).

    ``ctx.count(n_val)`` clean inputs of the ``"calibration"`` split, ``ctx.count()`` of the ``"test"``
    split and the test inputs with ``attack``'s trigger go through the model backdoored with ``attack``.

    Returns:
        ``attack, sample_id, condition, layer, head, ratio``: one row per input x layer x head, with
        ``condition`` in ``"calibration"`` (``n_val`` inputs), ``"clean"`` and ``"triggered"``
        (``n_samples`` each); ``ratio`` is ``S^{l,h}`` of the last prompt token (image mass / text mass).
    """
    n_val = _check_count(n_val, "n_val", 2)

    def compute() -> "pd.DataFrame":
        lvlm, attack_obj, _ = ctx.load(attack)
        table = detection_table(lvlm, attack_obj, samples=ctx.samples("test"), seed=ctx.seed,
                                val_samples=ctx.samples("calibration", n_val), progress=not ctx.smoke)
        table = table[list(ROW_COLUMNS)].copy()
        table.insert(0, "attack", attack)
        return table

    return _shared_cached(ctx, f"detection_rows_{attack}", compute, model=ctx.model_spec(attack), attack=attack,
                          n_val=n_val, table="detection_rows")


def fusion_onset_table(ctx: "FigureContext", attack: str, *, window: int = WINDOW, n_onset: int = N_ONSET,
                       onset_fraction: float = 0.5) -> "pd.DataFrame":
    """The detector's automatic choice of detection layers for one attack's model (cached).

    :func:`~cleansight_analysis.defenses.layers.select_detection_layers` with ``method="fusion_onset"``
    on the first ``ctx.count(n_onset)`` clean validation inputs: for each layer alone, the answer
    query's attention to the image is blocked and the change of the next-token distribution
    (mean KL divergence) is the layer's effect; the window of ``window`` layers starts at the first
    layer whose effect reaches ``onset_fraction`` of the largest one.

    Returns:
        ``attack, layer, effect, relative_effect`` (effect / largest effect), ``detection_layer``
        (bool: in the chosen window), ``window, onset_fraction, n_samples``; one row per layer.
    """
    import pandas as pd

    window = _check_count(window, "window")
    n_onset = _check_count(n_onset, "n_onset")

    def compute() -> "pd.DataFrame":
        lvlm, _, _ = ctx.load(attack)
        samples = ctx.samples("calibration", n_onset)
        details: dict = {}
        chosen = select_detection_layers(lvlm, samples, method="fusion_onset", window=window,
                                         onset_fraction=onset_fraction, details=details)
        effect = np.asarray(details["effect"], dtype=np.float64)
        peak = float(effect.max())
        return pd.DataFrame({
            "attack": attack, "layer": np.arange(len(effect)), "effect": effect,
            "relative_effect": effect / peak if peak > 0 else np.zeros_like(effect),
            "detection_layer": np.isin(np.arange(len(effect)), chosen),
            "window": window, "onset_fraction": float(onset_fraction), "n_samples": len(samples)})

    return _shared_cached(ctx, f"fusion_onset_{attack}", compute, model=ctx.model_spec(attack), attack=attack,
                          window=window, n_onset=n_onset, onset_fraction=onset_fraction, table="fusion_onset")


@dataclass
class DetectionInputs:
    """The inputs of every detection figure, for the notebook's attacks.

    Attributes:
        rows: ``{attack: detection_rows(...)}``.
        onset: the :func:`fusion_onset_table` of every attack, concatenated.
        settings: ``n_val, window, n_onset`` (part of the cache key of every table derived from these).
    """

    rows: dict[str, "pd.DataFrame"]
    onset: "pd.DataFrame"
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def attacks(self) -> list[str]:
        return list(self.rows)

    def detector_layers(self, attack: str) -> list[int]:
        """The layers the fusion-onset scan chose for ``attack``'s model (ascending, 0-indexed)."""
        sub = self.onset[(self.onset["attack"] == attack) & self.onset["detection_layer"]]
        if sub.empty:
            raise InputError(f"no fusion-onset layers for attack {attack!r}; attacks: {self.attacks}")
        return sorted(int(x) for x in sub["layer"])


def detection_inputs(ctx: "FigureContext", *, n_val: int = N_VAL, window: int = WINDOW,
                     n_onset: int = N_ONSET) -> DetectionInputs:
    """:func:`detection_rows` and :func:`fusion_onset_table` for every attack of ``ctx`` (one model load each)."""
    import pandas as pd

    rows, onset = {}, []
    for attack in ctx.attacks:
        rows[attack] = detection_rows(ctx, attack, n_val=n_val)
        onset.append(fusion_onset_table(ctx, attack, window=window, n_onset=n_onset))
    return DetectionInputs(rows, pd.concat(onset, ignore_index=True),
                           {"n_val": int(n_val), "window": int(window), "n_onset": int(n_onset)})


# ---------------------------------------------------------------------------------------------
# Fig. 3: per-layer AUROC
# ---------------------------------------------------------------------------------------------


def layerwise_auroc(rows: "pd.DataFrame", *, seed: int = 0) -> "pd.DataFrame":
    """Per-layer AUROC of one attack's rows, calibrated on the ``"calibration"`` rows.

    Wraps :func:`~cleansight_analysis.attention.separability.layer_separability` (whose calibration set
    is a subset of its ``"clean"`` rows): the calibration rows are relabelled ``"clean"`` and named
    as the calibration ids, so only the clean test and triggered inputs are scored.

    Returns:
        ``layer, auroc_head_vector, auroc_head_mean, n_calibration, n_clean_test, n_poisoned_test``.
    """
    if "condition" not in rows.columns or not (rows["condition"] == "calibration").any():
        raise InputError("layerwise_auroc: the rows have no 'calibration' condition; build them with detection_rows")
    table = rows.copy()
    cal = table["condition"] == "calibration"
    cal_ids = table.loc[cal, "sample_id"].astype(str).unique()
    if np.isin(cal_ids, table.loc[~cal, "sample_id"].astype(str).unique()).any():
        raise InputError("layerwise_auroc: calibration and test inputs share sample ids")
    table.loc[cal, "condition"] = "clean"
    return layer_separability(table, calibration_ids=cal_ids, seed=seed)


def layerwise_detection_table(ctx: "FigureContext", inputs: DetectionInputs) -> "pd.DataFrame":
    """Fig. 3: AUROC per layer, head-specific whitened vector vs head-averaged scalar, per attack (cached).

    Returns:
        ``attack, layer, auroc_head_vector, auroc_head_mean, detection_layer`` (the fusion-onset
        window of that attack's model), ``n_calibration, n_clean_test, n_poisoned_test``.
    """
    import pandas as pd

    def compute() -> "pd.DataFrame":
        parts = []
        for attack, rows in inputs.rows.items():
            part = layerwise_auroc(rows, seed=ctx.seed)
            part.insert(0, "attack", attack)
            part.insert(4, "detection_layer", part["layer"].isin(inputs.detector_layers(attack)))
            parts.append(part)
        return pd.concat(parts, ignore_index=True)

    return ctx.cached("layerwise_detection", compute, **inputs.settings)


def mechanism_table(ctx: "FigureContext", inputs: DetectionInputs, layerwise: "pd.DataFrame", *,
                    min_rise: float = MECHANISM["min_rise"], min_auroc: float = MECHANISM["min_auroc"]) -> "pd.DataFrame":
    """Where the paper's mechanism shows, per attack and layer (cached as ``mechanism``).

    The paper's attention stealing is a rise of the answer query's image share under the trigger in the fusion
    layers, where a head-specific detector separates triggered from clean inputs; a rise only in the last
    layers is the LM's own trigger circuit (the LoRA members' pattern).

    Args:
        inputs: :func:`detection_inputs` (its rows carry ``mass_image`` per input, layer and head).
        layerwise: :func:`layerwise_detection_table` of the same inputs (``auroc_head_vector``).
        min_rise, min_auroc: the thresholds of :data:`MECHANISM`.

    Returns:
        ``attack, layer, image_share_clean, image_share_triggered, rise, auroc_head_vector, early`` (the layer
        lies before the last quarter: ``layer < n_layers - n_layers // 4``) and ``steals`` (early, rise >=
        ``min_rise``, AUROC >= ``min_auroc``).
    """
    import pandas as pd

    for name, value in (("min_rise", min_rise), ("min_auroc", min_auroc)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise InputError(f"mechanism_table: {name} must be a number in [0, 1], got {value!r}")

    def compute() -> "pd.DataFrame":
        parts = []
        for attack, rows in inputs.rows.items():
            if "mass_image" not in rows:
                raise InputError(f"mechanism_table: the detection rows of {attack!r} lack 'mass_image' (recompute them)")
            test = rows[rows["condition"].isin(["clean", "triggered"])]
            share = test.pivot_table(index="layer", columns="condition", values="mass_image", aggfunc="mean")
            n_layers = int(rows["layer"].max()) + 1
            auc = layerwise[layerwise["attack"] == attack].set_index("layer")["auroc_head_vector"]
            part = pd.DataFrame({"attack": attack, "layer": share.index.astype(int),
                                 "image_share_clean": share["clean"].to_numpy(),
                                 "image_share_triggered": share["triggered"].to_numpy()})
            part["rise"] = part["image_share_triggered"] - part["image_share_clean"]
            part["auroc_head_vector"] = part["layer"].map(auc).to_numpy()
            part["early"] = part["layer"] < n_layers - n_layers // 4
            part["steals"] = part["early"] & (part["rise"] >= min_rise) & (part["auroc_head_vector"] >= min_auroc)
            parts.append(part)
        return pd.concat(parts, ignore_index=True)

    return ctx.cached("mechanism", compute, min_rise=float(min_rise), min_auroc=float(min_auroc), **inputs.settings)


#: Images per attack of :func:`trigger_visibility_table` (half of them triggered, a quarter held out).
N_VISIBILITY = 2000


def trigger_visibility_table(ctx: "FigureContext", *, n: int = N_VISIBILITY, fpr: float = 0.01) -> "pd.DataFrame":
    """Can each attack's projector see its trigger? A probe on the frozen vision tower's features (cached).

    :func:`~cleansight_analysis.evaluation.visibility.trigger_visibility` on ``n`` test images per attack (at
    least :data:`~cleansight_analysis.evaluation.visibility.MIN_PROBE_IMAGES`, also in smoke runs), with each
    attack's own model and trigger. It explains a backdoor that neither implants nor steals attention: a
    trigger whose features overlap the clean ones gives the projector nothing to act on.

    Returns:
        ``attack, n_train, n_test, auroc, tpr, fpr, fpr_target, feature_change``, one row per attack.
    """
    import pandas as pd

    if isinstance(n, bool) or not isinstance(n, int) or n < MIN_PROBE_IMAGES:
        raise InputError(f"trigger_visibility_table: n must be an integer >= {MIN_PROBE_IMAGES}, got {n!r}")
    count = max(ctx.count(n), MIN_PROBE_IMAGES)

    def compute() -> "pd.DataFrame":
        images = [s.image for s in ctx.samples("test", count, at_least=MIN_PROBE_IMAGES)]
        rows = []
        for attack in ctx.attacks:
            model, attack_obj, _ = ctx.load(attack)
            rows.append({"attack": attack, **trigger_visibility(model, images, attack_obj, seed=ctx.seed, fpr=fpr)})
        return pd.DataFrame(rows)

    return ctx.cached("trigger_visibility", compute, n=count, fpr=float(fpr))


# ---------------------------------------------------------------------------------------------
# Fig. 4: detection windows
# ---------------------------------------------------------------------------------------------


def window_lengths(n_layers: int, longest: int = 8) -> list[int]:
    """Window lengths of the Fig. 4 sweep: ``1 .. min(n_layers, longest)``."""
    return list(range(1, min(int(n_layers), int(longest)) + 1))


def layer_window_table(ctx: "FigureContext", inputs: DetectionInputs, *, lengths: Sequence[int] | None = None,
                       starts: Sequence[int] | None = None) -> "pd.DataFrame":
    """Fig. 4: AUROC of the whitened head vector over every window ``[start, start + length)`` (cached).

    Args:
        lengths: window lengths (default :func:`window_lengths` of the model's layer count); the
            detector's own window length is always added.
        starts: start layers (default every layer); windows past the last layer are skipped.

    Returns:
        ``attack, start, length, layers`` (e.g. ``"5,6,7"``), ``auroc``, ``detector_choice`` (the
        fusion-onset window of that model), ``best`` (the highest AUROC of that attack; ties: the
        earliest start, then the shortest window).
    """
    import pandas as pd

    n_layers = max(int(r["layer"].max()) + 1 for r in inputs.rows.values())
    lengths = window_lengths(n_layers) if lengths is None else [int(x) for x in lengths]
    window = int(inputs.settings.get("window", WINDOW))
    if window <= n_layers and window not in lengths:  # the detector's own window is always in the sweep
        lengths = sorted(set(lengths) | {window})
    starts_arg = None if starts is None else [int(s) for s in starts]

    def compute() -> "pd.DataFrame":
        parts = []
        for attack, rows in inputs.rows.items():
            part = layer_window_sweep(rows, starts=starts_arg, lengths=lengths, settings=figure_detector())
            part.insert(0, "attack", attack)
            auto = inputs.detector_layers(attack)
            part["detector_choice"] = (part["start"] == auto[0]) & (part["length"] == len(auto))
            order = part.sort_values(["auroc", "start", "length"], ascending=[False, True, True], kind="stable")
            part["best"] = part.index == order.index[0]
            parts.append(part)
        return pd.concat(parts, ignore_index=True)

    return _shared_cached(ctx, "layer_window_sweep", compute, lengths=lengths, starts=starts_arg, **inputs.settings)


# ---------------------------------------------------------------------------------------------
# Fig. 5: threshold quantile and validation-set size
# ---------------------------------------------------------------------------------------------


def detection_layer_choices(ctx: "FigureContext", inputs: DetectionInputs, windows: "pd.DataFrame") -> "pd.DataFrame":
    """The detection layers used in Fig. 5, and how they were chosen (cached).

    Two choices per attack: the detector's own fusion-onset window (clean inputs only, what a defender
    can do) and the best window of the Fig. 4 sweep (chosen with the triggered test inputs: an
    oracle upper bound, not available to a defender).

    Args:
        windows: :func:`layer_window_table`.

    Returns:
        ``attack, choice, layers`` (e.g. ``"5,6,7"``), ``auroc`` (of that window in the Fig. 4 sweep).
    """
    import pandas as pd

    def compute() -> "pd.DataFrame":
        out = []
        for attack in inputs.attacks:
            sub = windows[windows["attack"] == attack]
            for choice, flag in ((CHOICE_AUTO, "detector_choice"), (CHOICE_BEST, "best")):
                hit = sub[sub[flag]]
                if hit.empty:
                    raise InputError(f"detection_layer_choices: the window sweep has no {flag!r} row for {attack!r}")
                out.append({"attack": attack, "choice": choice, "layers": str(hit["layers"].iloc[0]),
                            "auroc": float(hit["auroc"].iloc[0])})
        return pd.DataFrame(out)

    picked = windows[windows["detector_choice"] | windows["best"]]
    return ctx.cached("detection_layer_choices", compute, **inputs.settings,
                      picked=picked[["attack", "layers", "auroc", "detector_choice", "best"]].to_dict("list"))


def _layer_list(text: str) -> list[int]:
    return [int(x) for x in str(text).split(",")]


def threshold_table(ctx: "FigureContext", inputs: DetectionInputs, choices: "pd.DataFrame", *,
                    quantiles: Sequence[float] | None = None) -> "pd.DataFrame":
    """Fig. 5 (left): TPR / FPR vs the threshold quantile ``q``, per attack and layer choice (cached).

    Returns:
        ``attack, choice, layers, quantile, threshold, tpr, fpr, n_val``.
    """
    import pandas as pd

    quantiles = list(QUANTILES if quantiles is None else quantiles)

    def compute() -> "pd.DataFrame":
        parts = []
        for rec in choices.itertuples(index=False):
            part = quantile_sweep(inputs.rows[rec.attack], layers=_layer_list(rec.layers), quantiles=quantiles,
                                  settings=figure_detector())
            for i, (col, val) in enumerate((("attack", rec.attack), ("choice", rec.choice), ("layers", rec.layers))):
                part.insert(i, col, val)
            parts.append(part)
        return pd.concat(parts, ignore_index=True)

    return ctx.cached("threshold_sweep", compute, quantiles=quantiles, choices=choices.to_dict("list"),
                      **inputs.settings)


def val_size_table(ctx: "FigureContext", inputs: DetectionInputs, choices: "pd.DataFrame", *,
                   sizes: Sequence[int] | None = None, quantile: float = 0.99, repeats: int = 20) -> "pd.DataFrame":
    """Fig. 5 (right): TPR / FPR vs ``|D_val|`` at quantile ``quantile`` (cached).

    For each size, ``repeats`` random subsets of the calibration inputs (one when the size is all of
    them; sizes above ``n_val`` are skipped) calibrate the detector.

    Returns:
        ``attack, choice, layers, n_val, repeat, threshold, tpr, fpr, quantile`` (one row per subset).
    """
    import pandas as pd

    sizes = list(VAL_SIZES if sizes is None else [int(s) for s in sizes])

    def compute() -> "pd.DataFrame":
        parts = []
        for rec in choices.itertuples(index=False):
            part = val_size_sweep(inputs.rows[rec.attack], layers=_layer_list(rec.layers), sizes=sizes,
                                  quantile=quantile, repeats=repeats, seed=ctx.seed, settings=figure_detector())
            for i, (col, val) in enumerate((("attack", rec.attack), ("choice", rec.choice), ("layers", rec.layers))):
                part.insert(i, col, val)
            part["quantile"] = float(quantile)
            parts.append(part)
        return pd.concat(parts, ignore_index=True)

    return ctx.cached("val_size_sweep", compute, sizes=sizes, quantile=quantile, repeats=repeats,
                      choices=choices.to_dict("list"), **inputs.settings)


def summarize_val_size(table: "pd.DataFrame") -> "pd.DataFrame":
    """Mean, standard deviation, min and max of TPR / FPR over the repeats of :func:`val_size_table`.

    Returns:
        ``attack, choice, layers, quantile, n_val`` (those present), ``repeats, tpr_mean, tpr_std, tpr_min,
        tpr_max, fpr_mean, fpr_std, fpr_min, fpr_max``.
    """
    keys = [c for c in ("attack", "choice", "layers", "quantile", "n_val") if c in table.columns]
    agg = table.groupby(keys, sort=False).agg(
        repeats=("tpr", "size"),
        **{f"{m}_{f}": (m, f) for m in ("tpr", "fpr") for f in ("mean", "std", "min", "max")})
    agg = agg.reset_index()
    for m in ("tpr", "fpr"):
        agg[f"{m}_std"] = agg[f"{m}_std"].fillna(0.0)
    return agg


# ---------------------------------------------------------------------------------------------
# The paper's numbers next to ours
# ---------------------------------------------------------------------------------------------


def _comparison(rows: list[tuple[str, str, str, str]]) -> "pd.DataFrame":
    import pandas as pd

    return pd.DataFrame(rows, columns=["attack", "measure", "paper (LLaVA-1.5-7B)", "ours"])


def fig3_comparison(table: "pd.DataFrame") -> "pd.DataFrame":
    """The paper's Fig. 3 reading next to ours, from :func:`layerwise_detection_table`.

    Returns:
        ``attack, measure, paper (LLaVA-1.5-7B), ours`` (text cells).
    """
    rows = []
    for attack, sub in table.groupby("attack", sort=False):
        det = sub[sub["detection_layer"].astype(bool)] if "detection_layer" in sub else sub.iloc[:0]
        best = sub.loc[sub["auroc_head_vector"].idxmax()]
        half = sub[sub["layer"] >= sub["layer"].min() + (sub["layer"].max() - sub["layer"].min() + 1) / 2]
        span = ",".join(str(int(x)) for x in det["layer"])
        rows += [
            (attack, f"head-specific AUROC in the detection layers ({span or 'none'})", "~1.0",
             " / ".join(f"{v:.2f}" for v in det["auroc_head_vector"]) or "n/a"),
            (attack, "best layer, head-specific AUROC", "~1.0 (fusion layers)",
             f"layer {int(best['layer'])}: {best['auroc_head_vector']:.2f}"),
            (attack, "head-averaged AUROC, min-max over the later half of the layers", "unstable",
             f"{half['auroc_head_mean'].min():.2f}-{half['auroc_head_mean'].max():.2f}"),
        ]
    return _comparison(rows)


def fig4_comparison(windows: "pd.DataFrame") -> "pd.DataFrame":
    """The paper's Fig. 4 reading next to ours, from :func:`layer_window_table`.

    The layers are cut into thirds (early / middle / late start layers, as the paper's starts 1, 11,
    21 of 32); each third reports the range of AUROC over its windows.

    Returns:
        ``attack, measure, paper (LLaVA-1.5-7B), ours`` (text cells).
    """
    rows = []
    for attack, sub in windows.groupby("attack", sort=False):
        n_layers = int((sub["start"] + sub["length"]).max())
        thirds = np.array_split(np.arange(n_layers), 3)
        for name, part, paper in zip(("early", "middle", "late"), thirds,
                                     ("start 1 of 32: -", "start 11 of 32: stable", "start 21 of 32: -")):
            if not len(part):
                continue
            got = sub[sub["start"].isin(part)]
            rows.append((attack, f"AUROC range, {name} start layers {part[0]}-{part[-1]}", paper,
                         f"{got['auroc'].min():.2f}-{got['auroc'].max():.2f}" if len(got) else "n/a"))
        for flag, what in (("detector_choice", "detector's window (fusion onset)"), ("best", "best window (oracle)")):
            hit = sub[sub[flag].astype(bool)] if flag in sub else sub.iloc[:0]
            if len(hit):
                rows.append((attack, f"{what}: layers {hit['layers'].iloc[0]}",
                             "layers 9-11 (0-idx.)" if flag == "detector_choice" else "n/a",
                             f"AUROC {hit['auroc'].iloc[0]:.2f}"))
    return _comparison(rows)


def fig5_comparison(quantiles: "pd.DataFrame", val_sizes: "pd.DataFrame", *, quantile: float = 0.99) -> "pd.DataFrame":
    """The paper's Fig. 5 reading next to ours, from :func:`threshold_table` and :func:`val_size_table`.

    Returns:
        ``attack, measure, paper (LLaVA-1.5-7B), ours`` (text cells; TPR / FPR at ``quantile`` with
        every calibration sample, and the mean FPR over subsets of 10 validation samples).
    """
    summary = summarize_val_size(val_sizes)
    rows = []
    for (attack, choice), sub in quantiles.groupby(["attack", "choice"], sort=False):
        at = sub[np.isclose(sub["quantile"], quantile)]
        layers = sub["layers"].iloc[0]
        tag = f"{choice}, layers {layers}"
        if len(at):
            n_val = int(at["n_val"].iloc[0])
            rows.append((attack, f"TPR / FPR at q={quantile:g}, |D_val|={n_val} [{tag}]", "~100 % / ~3 %",
                         f"{fmt_pct(at['tpr'].iloc[0])} / {fmt_pct(at['fpr'].iloc[0])}"))
        ten = summary[(summary["attack"] == attack) & (summary["choice"] == choice) & (summary["n_val"] == 10)]
        if len(ten):
            rows.append((attack, f"FPR with |D_val|=10, mean over {int(ten['repeats'].iloc[0])} subsets [{tag}]",
                         "< 20 %", fmt_pct(ten["fpr_mean"].iloc[0])))
    return _comparison(rows)


__all__ = ["CHOICE_AUTO", "CHOICE_BEST", "DetectionInputs", "MECHANISM", "N_ONSET", "N_VAL", "N_VISIBILITY", "WINDOW",
           "detection_inputs", "detection_layer_choices", "detection_rows", "fig3_comparison", "fig4_comparison",
           "fig5_comparison", "fusion_onset_table",
           "layer_window_table", "layerwise_auroc", "layerwise_detection_table", "mechanism_table", "summarize_val_size",
           "threshold_table", "trigger_visibility_table", "val_size_table", "window_lengths"]
