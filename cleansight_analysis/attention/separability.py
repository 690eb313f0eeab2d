"""How well the attention-stealing ratio separates triggered from clean inputs (the paper's Fig. 3).

The detector of CleanSight (``docs/method.md#detection``) calibrates on clean inputs only and flags an
input whose ratio vector lies far from the clean ones. Per layer ``l`` each sample has the
head-specific vector ``r^l = (S^{l,1}, ..., S^{l,H})``; the score is its whitened distance to the
clean calibration set:

- ``covariance="diagonal"`` (default, the paper and the authors' code): ``d = || (r - mu) / sigma ||_2``
  with ``mu`` and the population ``sigma`` per head (``sigma + eps``, ``eps = 1e-8``);
- ``covariance="full"``: the Mahalanobis distance under the covariance of the standardised features,
  shrunk towards a scaled identity (``shrinkage="ledoit-wolf"`` by default, or a fixed weight in [0, 1]),
  eigenvalues floored at ``eps**2``, so that singular covariances (fewer calibration samples than heads,
  constant heads) still whiten.

Both are :class:`cleansight_analysis.detection.Whitener` (``"diagonal"`` / ``"ledoit_wolf"``), the
distance CleanSight uses; the features come from the same core (:mod:`cleansight_analysis.detection.features`):
``feature="ratio"`` reads the table's ``ratio`` column (computed by that core), ``"log_ratio"`` and
``"masses"`` are computed from the ``mass_*`` columns. AUROC is :func:`sklearn.metrics.roc_auc_score`.

Larger distances are "poisoned" (the detector flags ``d > gamma``); triggered inputs are the
positive class of every AUROC here. The head-averaged scalar ``m^l = mean_h S^{l,h}`` is scored
the same way in one dimension (``head_mean_score="distance"``: ``|m - mu| / (sigma + eps)``) or
by its raw value (``"signed"``: a larger image share is more poisoned, the attention-stealing
direction). AUROCs are computed on held-out samples only: calibration samples are never scored.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Annotated, Any, Iterable, Literal, Sequence

import numpy as np
from pydantic import BeforeValidator

from ..detection.detector import FeatureSetting
from ..detection.features import LOG_EPS, MASS_COLUMNS, RATIO_EPS, stealing_features
from ..detection.whitening import Whitener
from ..errors import InputError
from ..settings import Field, Real, settings

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

COVARIANCES: tuple[str, ...] = ("diagonal", "full")
HEAD_MEAN_SCORES: tuple[str, ...] = ("distance", "signed")
HEAD_SCORES: tuple[str, ...] = ("ratio", "distance")


# ---------------------------------------------------------------------------------------------
# AUROC
# ---------------------------------------------------------------------------------------------


def auroc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve of ``scores`` ``[n]`` for binary ``labels`` ``[n]`` (1/True = positive).

    :func:`sklearn.metrics.roc_auc_score` (the probability that a random positive scores above a random
    negative, ties counting one half) after checking the inputs.

    Raises:
        InputError: shapes differ, non-finite scores, labels other than 0/1, or a class is missing.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1) if np.ndim(scores) <= 1 else None
    y_raw = np.asarray(labels)
    if s is None or y_raw.ndim > 1:
        raise InputError(f"auroc: scores and labels must be 1-D, got shapes {np.shape(scores)} and {y_raw.shape}")
    y_raw = y_raw.reshape(-1)
    if len(s) != len(y_raw):
        raise InputError(f"auroc: {len(s)} scores but {len(y_raw)} labels")
    if not np.isfinite(s).all():
        raise InputError(f"auroc: scores contain {int((~np.isfinite(s)).sum())} NaN or infinite value(s)")
    if y_raw.dtype == bool:
        y = y_raw
    else:
        try:
            yf = y_raw.astype(np.float64)
        except (TypeError, ValueError):
            raise InputError(f"auroc: labels must be 0/1 or bool, got dtype {y_raw.dtype}") from None
        if not np.isin(yf, (0.0, 1.0)).all():
            raise InputError(f"auroc: labels must be 0/1 or bool, got values {np.unique(y_raw)[:5].tolist()}")
        y = yf == 1.0
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise InputError(f"auroc: needs both classes, got {n_pos} positive and {n_neg} negative labels")
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, s))


# ---------------------------------------------------------------------------------------------
# Whitened distance
# ---------------------------------------------------------------------------------------------


def _check_eps(eps: Any, owner: str) -> float:
    if not isinstance(eps, numbers.Real) or isinstance(eps, bool) or not math.isfinite(float(eps)) or eps <= 0:
        raise InputError(f"{owner}: eps={eps!r} must be a finite number > 0")
    return float(eps)


def _check_shrinkage(shrinkage: Any, owner: str) -> float | str:
    if isinstance(shrinkage, str):
        if shrinkage != "ledoit-wolf":
            raise InputError(f"{owner}: shrinkage={shrinkage!r} must be 'ledoit-wolf' or a number in [0, 1]")
        return shrinkage
    if (not isinstance(shrinkage, numbers.Real) or isinstance(shrinkage, bool)
            or not math.isfinite(float(shrinkage)) or not 0.0 <= float(shrinkage) <= 1.0):
        raise InputError(f"{owner}: shrinkage={shrinkage!r} must be 'ledoit-wolf' or a number in [0, 1]")
    return float(shrinkage)


class WhitenedDistance(Whitener):
    """:class:`~cleansight_analysis.detection.Whitener` under this module's setting names.

    Args:
        covariance: ``"diagonal"`` (per-dimension population std, the paper's detector) or ``"full"``
            (``Whitener("ledoit_wolf")``: Mahalanobis with a shrunk covariance of the standardised features).
        shrinkage: for ``"full"``: ``"ledoit-wolf"`` or a fixed weight in [0, 1] of the scaled identity.
        eps: added to each std (and ``eps**2`` floors the shrunk eigenvalues).

    Use ``WhitenedDistance().fit(x_clean).score(x)`` with ``x`` ``[n, d]``.
    """

    def __init__(self, covariance: str = "diagonal", shrinkage: float | str = "ledoit-wolf", eps: float = 1e-8):
        if covariance not in COVARIANCES:
            raise InputError(f"WhitenedDistance: covariance={covariance!r} must be one of {COVARIANCES}")
        shrinkage = _check_shrinkage(shrinkage, "WhitenedDistance")
        super().__init__("diagonal" if covariance == "diagonal" else "ledoit_wolf",
                         sigma_eps=_check_eps(eps, "WhitenedDistance"),
                         shrinkage=None if shrinkage == "ledoit-wolf" else float(shrinkage))
        self.covariance = covariance

    def score(self, x: Any) -> np.ndarray:
        """Whitened distance ``[n]`` of each row of ``x`` ``[n, d]`` to the calibration mean."""
        return self.distance(x)


# ---------------------------------------------------------------------------------------------
# Settings and table access
# ---------------------------------------------------------------------------------------------


@settings
class SeparabilitySettings:
    """The detector statistic and the labels used by :func:`layer_separability` and friends.

    Attributes:
        covariance: ``"diagonal"`` (default; the paper's per-head std) or ``"full"`` (Mahalanobis).
        shrinkage: ``"full"`` only: ``"ledoit-wolf"`` (default) or a fixed weight in [0, 1].
        eps: std offset (``"diagonal"``) / ``eps**2`` ridge (``"full"``); default ``1e-8`` as in the paper.
        feature: ``"ratio"`` (default, the paper's S), ``"log_ratio"`` or ``"masses"``
            (:mod:`cleansight_analysis.detection.features`; the last two need the table's ``mass_*`` columns,
            and ``"masses"`` gives two values per head, so head means and single-head AUROCs are refused).
        head_mean_score: the head-averaged scalar's score: ``"distance"`` (default,
            ``|m - mu| / (sigma + eps)`` against the clean calibration) or ``"signed"`` (``m`` itself).
        clean_condition / poisoned_condition: ``condition`` values of the negative / positive class.
        exclude_calibration_pairs: also leave out the triggered copies (same ``sample_id``) of the
            calibration images, so no scored input shares an image with the calibration set.
    """

    covariance: Annotated[Literal[COVARIANCES], Field(description=f"must be one of {COVARIANCES}")] = "diagonal"
    shrinkage: Annotated[Any, BeforeValidator(lambda v: _check_shrinkage(v, "SeparabilitySettings"))] = "ledoit-wolf"
    eps: Annotated[Real, Field(gt=0.0, description="must be a finite number > 0")] = 1e-8
    feature: FeatureSetting = "ratio"
    head_mean_score: Annotated[Literal[HEAD_MEAN_SCORES],
                               Field(description=f"must be one of {HEAD_MEAN_SCORES}")] = "distance"
    clean_condition: Annotated[str, Field(min_length=1, description="must be a non-empty string")] = "clean"
    poisoned_condition: Annotated[str, Field(min_length=1, description="must be a non-empty string")] = "triggered"
    exclude_calibration_pairs: bool = True

    def __post_init__(self) -> None:
        owner = "SeparabilitySettings"
        if self.feature == "masses" and self.head_mean_score == "signed":
            raise InputError(f"{owner}: head_mean_score='signed' needs one value per head; feature='masses' has two")
        if self.clean_condition == self.poisoned_condition:
            raise InputError(f"{owner}: clean_condition and poisoned_condition are both {self.clean_condition!r}")

    @property
    def width(self) -> int:
        return 2 if self.feature == "masses" else 1

    def distance(self) -> WhitenedDistance:
        return WhitenedDistance(self.covariance, self.shrinkage, self.eps)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Features:
    """Ratios of one condition as ``values [N, L, H]`` (samples sorted by id)."""

    ids: np.ndarray
    layers: np.ndarray
    heads: np.ndarray
    values: np.ndarray


def _check_table(table: Any, owner: str) -> "pd.DataFrame":
    import pandas as pd

    if not isinstance(table, pd.DataFrame):
        raise InputError(f"{owner}: table must be a pandas DataFrame from stealing_table(s), "
                         f"got {type(table).__name__}")
    missing = [c for c in ("sample_id", "condition", "layer", "head", "ratio") if c not in table.columns]
    if missing:
        raise InputError(f"{owner}: table lacks column(s) {missing}; build it with stealing_table(s)")
    return table


def _features(table: "pd.DataFrame", condition: str, settings: SeparabilitySettings, owner: str) -> _Features:
    sub = table[table["condition"] == condition]
    if sub.empty:
        raise InputError(f"{owner}: no rows with condition {condition!r}; conditions in the table: "
                         f"{sorted(map(str, table['condition'].unique()))}")
    sub = sub.sort_values(["sample_id", "layer", "head"], kind="stable")
    sid = sub["sample_id"].to_numpy().astype(str)
    layer = sub["layer"].to_numpy()
    head = sub["head"].to_numpy()
    ids = np.unique(sid)
    layers = np.unique(layer)
    heads = np.unique(head)
    n, n_l, n_h = len(ids), len(layers), len(heads)
    complete = (
        len(sub) == n * n_l * n_h
        and np.array_equal(sid, np.repeat(ids, n_l * n_h))
        and np.array_equal(layer, np.tile(np.repeat(layers, n_h), n))
        and np.array_equal(head, np.tile(heads, n * n_l))
    )
    if not complete:
        raise InputError(f"{owner}: the {condition!r} rows are not one row per sample x layer x head "
                         f"({len(sub)} rows for {n} samples, {n_l} layers, {n_h} heads): missing or duplicate rows")
    if settings.feature == "ratio":
        values = sub["ratio"].to_numpy(dtype=np.float64).reshape(n, n_l, n_h)
    else:
        missing = [c for c in MASS_COLUMNS if c not in sub.columns]
        if missing:
            raise InputError(f"{owner}: feature={settings.feature!r} needs the mass columns {missing}; build the "
                             "table with stealing_table(s)")
        meta = table.attrs.get("stealing", {})
        mass = sub[list(MASS_COLUMNS)].to_numpy(dtype=np.float64).reshape(n, n_l, n_h, len(MASS_COLUMNS))
        values = stealing_features(mass, settings.feature, meta.get("text_keys", "post_image"),
                                   eps=meta.get("eps", RATIO_EPS), log_eps=LOG_EPS,
                                   groups=[c[len("mass_"):] for c in MASS_COLUMNS]).reshape(n, n_l, n_h * settings.width)
    if not np.isfinite(values).all():
        raise InputError(f"{owner}: the {condition!r} features contain NaN or infinite values")
    return _Features(ids, layers, heads, values)


def _both(table: Any, settings: SeparabilitySettings, owner: str) -> tuple[_Features, _Features]:
    table = _check_table(table, owner)
    clean = _features(table, settings.clean_condition, settings, owner)
    poisoned = _features(table, settings.poisoned_condition, settings, owner)
    if not (np.array_equal(clean.layers, poisoned.layers) and np.array_equal(clean.heads, poisoned.heads)):
        raise InputError(f"{owner}: clean and poisoned rows cover different layers/heads "
                         f"({clean.layers.tolist()} x {len(clean.heads)} vs "
                         f"{poisoned.layers.tolist()} x {len(poisoned.heads)})")
    return clean, poisoned


def _split(clean_ids: np.ndarray, calibration_ids: Iterable[Any] | None, calibration_fraction: float | None,
           seed: int, owner: str) -> np.ndarray:
    """Boolean ``[N_clean]``: which clean samples calibrate the detector."""
    n = len(clean_ids)
    if calibration_ids is not None and calibration_fraction is not None:
        raise InputError(f"{owner}: give calibration_ids or calibration_fraction, not both")
    if calibration_ids is not None:
        if isinstance(calibration_ids, (str, bytes)):
            raise InputError(f"{owner}: calibration_ids must be a collection of sample ids, not one string")
        wanted = {str(x) for x in calibration_ids}
        unknown = sorted(wanted - set(clean_ids.tolist()))
        if unknown:
            raise InputError(f"{owner}: calibration id(s) {unknown[:5]} are not clean samples of the table")
        calib = np.isin(clean_ids, list(wanted))
    else:
        frac = 0.5 if calibration_fraction is None else calibration_fraction
        if (not isinstance(frac, numbers.Real) or isinstance(frac, bool) or not math.isfinite(float(frac))
                or not 0.0 < float(frac) < 1.0):
            raise InputError(f"{owner}: calibration_fraction={frac!r} must be a number in (0, 1)")
        if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or seed < 0:
            raise InputError(f"{owner}: seed={seed!r} must be an int >= 0")
        k = int(math.floor(float(frac) * n + 0.5))
        calib = np.zeros(n, dtype=bool)
        calib[np.random.default_rng(int(seed)).choice(n, size=min(max(k, 0), n), replace=False)] = True
    n_cal = int(calib.sum())
    if n_cal < 2:
        raise InputError(f"{owner}: {n_cal} calibration sample(s) of {n} clean ones; the detector needs at least 2")
    if n_cal == n:
        raise InputError(f"{owner}: every one of the {n} clean samples is used for calibration; none is left to "
                         "score (calibration samples are never scored)")
    return calib


@dataclass
class _Split:
    calib: np.ndarray          # [n_clean] bool
    clean_test: np.ndarray     # [n_clean] bool
    poisoned_test: np.ndarray  # [n_poisoned] bool


def _make_split(clean: _Features, poisoned: _Features, settings: SeparabilitySettings,
                calibration_ids: Any, calibration_fraction: Any, seed: int, owner: str) -> _Split:
    calib = _split(clean.ids, calibration_ids, calibration_fraction, seed, owner)
    poisoned_test = np.ones(len(poisoned.ids), dtype=bool)
    if settings.exclude_calibration_pairs:
        poisoned_test = ~np.isin(poisoned.ids, clean.ids[calib])
    if not poisoned_test.any():
        raise InputError(f"{owner}: no poisoned sample is left to score (every triggered sample pairs with a "
                         "calibration image; use exclude_calibration_pairs=False or calibrate on fewer samples)")
    return _Split(calib, ~calib, poisoned_test)


def _layer_index(feats: _Features, layers: Any, owner: str) -> np.ndarray:
    if layers is None:
        return np.arange(len(feats.layers))
    wanted = [layers] if isinstance(layers, numbers.Integral) else list(layers)
    idx = []
    for layer in wanted:
        hit = np.flatnonzero(feats.layers == layer)
        if len(hit) == 0:
            raise InputError(f"{owner}: layer {layer!r} is not in the table (layers: {feats.layers.tolist()})")
        idx.append(int(hit[0]))
    if not idx:
        raise InputError(f"{owner}: layers is empty; pass None for every layer")
    return np.asarray(idx)


def _head_mean(x: np.ndarray, width: int) -> np.ndarray:
    """Head average of one layer's features ``[n, H * width]`` -> ``[n, width]``."""
    return x.reshape(len(x), -1, width).mean(1)


def _head_mean_scores(cal: np.ndarray, xs: Sequence[np.ndarray], settings: SeparabilitySettings) -> list[np.ndarray]:
    """Scores of the head average: ``cal`` ``[n_cal, F]`` fits, each ``x`` ``[n, F]`` is scored (``"distance"``:
    the diagonal whitened distance, ``|m - mu| / (sigma + eps)`` for one value per head)."""
    if settings.head_mean_score == "signed":
        return [np.asarray(x, dtype=np.float64)[:, 0] for x in xs]
    w = Whitener("diagonal", sigma_eps=settings.eps).fit(cal)
    return [w.distance(x) for x in xs]


# ---------------------------------------------------------------------------------------------
# Public analyses
# ---------------------------------------------------------------------------------------------


def detector_scores(table: "pd.DataFrame", *, layers: int | Sequence[int] | None = None,
                    calibration_ids: Iterable[Any] | None = None, calibration_fraction: float | None = None,
                    seed: int = 0, settings: SeparabilitySettings | None = None) -> "pd.DataFrame":
    """Whitened-distance scores of the concatenated head vectors over ``layers`` (the paper's detector).

    The feature of a sample is ``s = (S^{l,h})`` over ``l in layers`` (default every layer in the
    table) and every head, ``[|layers| * H]``; mean and covariance are fitted on the calibration
    clean samples and every sample gets its distance.

    Args:
        table: from :func:`~cleansight_analysis.attention.stealing.stealing_tables` (clean and
            triggered conditions, one row per sample x layer x head).
        calibration_ids: clean ``sample_id`` values to calibrate on; or
        calibration_fraction: share of the clean samples drawn at random (``seed``) to calibrate on
            (default 0.5 when neither is given).
        settings: :class:`SeparabilitySettings`.

    Returns:
        ``DataFrame`` with ``sample_id, condition, label`` (1 = poisoned), ``role`` (``"calibration"``,
        ``"test"`` or ``"excluded"``: a triggered copy of a calibration image) and ``score``.
    """
    import pandas as pd

    owner = "detector_scores"
    settings = _settings(settings, owner)
    clean, poisoned = _both(table, settings, owner)
    split = _make_split(clean, poisoned, settings, calibration_ids, calibration_fraction, seed, owner)
    li = _layer_index(clean, layers, owner)
    xc = clean.values[:, li].reshape(len(clean.ids), -1)
    xp = poisoned.values[:, li].reshape(len(poisoned.ids), -1)
    det = settings.distance().fit(xc[split.calib])
    frame = pd.DataFrame({
        "sample_id": np.concatenate([clean.ids, poisoned.ids]).astype(object),
        "condition": [settings.clean_condition] * len(clean.ids) + [settings.poisoned_condition] * len(poisoned.ids),
        "label": np.r_[np.zeros(len(clean.ids), dtype=np.int64), np.ones(len(poisoned.ids), dtype=np.int64)],
        "role": np.r_[np.where(split.calib, "calibration", "test"),
                      np.where(split.poisoned_test, "test", "excluded")].astype(object),
        "score": np.r_[det.score(xc), det.score(xp)],
    })
    frame.attrs["separability"] = {**settings.to_dict(), "layers": clean.layers[li].tolist(),
                                   "shrinkage_used": det.shrinkage_}
    return frame


def _settings(settings: Any, owner: str) -> SeparabilitySettings:
    if settings is None:
        return SeparabilitySettings()
    if not isinstance(settings, SeparabilitySettings):
        raise InputError(f"{owner}: settings must be a SeparabilitySettings, got {type(settings).__name__}")
    return settings


def layer_separability(table: "pd.DataFrame", *, calibration_ids: Iterable[Any] | None = None,
                       calibration_fraction: float | None = None, seed: int = 0,
                       settings: SeparabilitySettings | None = None) -> "pd.DataFrame":
    """Per-layer AUROC of the head-specific vector and of the head-averaged scalar (Fig. 3).

    For each layer, the head vector ``r^l`` ``[H]`` is scored by its whitened distance
    (:class:`WhitenedDistance`) to the clean calibration samples; the head mean ``m^l`` by
    ``settings.head_mean_score``. AUROCs use the held-out clean samples (label 0) and the
    triggered samples (label 1; without the triggered copies of calibration images when
    ``settings.exclude_calibration_pairs``). Calibration samples are never scored.

    Args:
        table: from ``stealing_tables`` (or any table with ``sample_id, condition, layer, head, ratio``).
        calibration_ids / calibration_fraction / seed: the calibration set (see :func:`detector_scores`).
        settings: :class:`SeparabilitySettings`.

    Returns:
        ``DataFrame`` with ``layer, auroc_head_vector, auroc_head_mean, n_calibration, n_clean_test,
        n_poisoned_test``, one row per layer (ascending). ``attrs["separability"]`` records the
        settings and the calibration ids.
    """
    import pandas as pd

    owner = "layer_separability"
    settings = _settings(settings, owner)
    clean, poisoned = _both(table, settings, owner)
    split = _make_split(clean, poisoned, settings, calibration_ids, calibration_fraction, seed, owner)
    n_ct, n_pt = int(split.clean_test.sum()), int(split.poisoned_test.sum())
    labels = np.r_[np.zeros(n_ct), np.ones(n_pt)]
    out: dict[str, list] = {"layer": [], "auroc_head_vector": [], "auroc_head_mean": []}
    for li, layer in enumerate(clean.layers):
        cal = clean.values[split.calib, li]              # [n_cal, H * F]
        ct = clean.values[split.clean_test, li]          # [n_ct, H * F]
        pt = poisoned.values[split.poisoned_test, li]    # [n_pt, H * F]
        det = settings.distance().fit(cal)
        vec = np.r_[det.score(ct), det.score(pt)]
        f = settings.width
        m_ct, m_pt = _head_mean_scores(_head_mean(cal, f), [_head_mean(ct, f), _head_mean(pt, f)], settings)
        out["layer"].append(int(layer))
        out["auroc_head_vector"].append(auroc(vec, labels))
        out["auroc_head_mean"].append(auroc(np.r_[m_ct, m_pt], labels))
    frame = pd.DataFrame(out)
    frame["n_calibration"] = int(split.calib.sum())
    frame["n_clean_test"] = n_ct
    frame["n_poisoned_test"] = n_pt
    frame.attrs["separability"] = {**settings.to_dict(), "calibration_ids": clean.ids[split.calib].tolist(),
                                   "seed": seed}
    return frame


def head_separability(table: "pd.DataFrame", *, score: str = "ratio", calibration_ids: Iterable[Any] | None = None,
                      calibration_fraction: float | None = None, seed: int = 0,
                      settings: SeparabilitySettings | None = None) -> "pd.DataFrame":
    """AUROC of each single head's ratio ``S^{l,h}`` (triggered = positive class).

    Args:
        score: ``"ratio"`` (default): the raw ratio (``settings.feature`` applied), larger = poisoned,
            over every clean and triggered sample (nothing is fitted, so nothing is held out); an
            AUROC below 0.5 means the trigger *lowers* that head's image share. ``"distance"``:
            ``|S - mu| / (sigma + eps)`` against the clean calibration samples, scored on held-out
            samples as in :func:`layer_separability`.
        calibration_ids / calibration_fraction / seed: the calibration set for ``score="distance"``.

    Returns:
        ``DataFrame`` with ``layer, head, auroc, n_clean, n_poisoned`` (one row per layer x head).
    """
    import pandas as pd

    owner = "head_separability"
    if score not in HEAD_SCORES:
        raise InputError(f"{owner}: score={score!r} must be one of {HEAD_SCORES}")
    settings = _settings(settings, owner)
    if settings.width != 1:
        raise InputError(f"{owner}: feature={settings.feature!r} has {settings.width} values per head; a single "
                         "head's AUROC needs one (feature='ratio' or 'log_ratio')")
    clean, poisoned = _both(table, settings, owner)
    if score == "ratio":
        if calibration_ids is not None or calibration_fraction is not None:
            raise InputError(f"{owner}: score='ratio' fits nothing; calibration_ids/fraction need score='distance'")
        xc, xp = clean.values, poisoned.values  # [N, L, H]
    else:
        split = _make_split(clean, poisoned, settings, calibration_ids, calibration_fraction, seed, owner)
        shape = clean.values.shape[1:]
        w = Whitener("diagonal", sigma_eps=settings.eps).fit(clean.values[split.calib].reshape(int(split.calib.sum()), -1))

        def per_head(x: np.ndarray) -> np.ndarray:  # |S - mu| / (sigma + eps) of every head
            return np.abs(w.standardise(x.reshape(len(x), -1))).reshape(len(x), *shape)

        xc = per_head(clean.values[split.clean_test])
        xp = per_head(poisoned.values[split.poisoned_test])
    labels = np.r_[np.zeros(len(xc)), np.ones(len(xp))]
    rows = [(int(layer), int(head), auroc(np.r_[xc[:, li, hi], xp[:, li, hi]], labels))
            for li, layer in enumerate(clean.layers) for hi, head in enumerate(clean.heads)]
    frame = pd.DataFrame(rows, columns=["layer", "head", "auroc"])
    frame["n_clean"] = len(xc)
    frame["n_poisoned"] = len(xp)
    frame.attrs["separability"] = {**settings.to_dict(), "score": score}
    return frame
