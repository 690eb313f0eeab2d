"""The detector: settings, calibration on clean features, the threshold and its fitting rule.

:class:`DetectorSettings` names every choice (validated on construction):

- ``feature`` (:data:`~.features.FEATURES`), ``text_keys``, ``eps``, ``log_eps``: the feature vector
  (:mod:`.features`);
- ``whitening`` (:data:`~.whitening.WHITENINGS`), ``sigma_eps``: the distance (:mod:`.whitening`);
- ``quantile``: ``gamma`` is this quantile (``numpy.quantile``, linear interpolation) of clean distances;
- ``threshold_fit``: *which* clean distances:

  - ``"in_sample"`` (the paper's): the distances of the calibration samples to the whitening fitted on
    those same samples. In-sample distances are smaller than those of new clean inputs (the fit has
    adapted to them, most of all in heavy-tailed dimensions), so ``gamma`` is too low and the
    false-positive rate on new clean inputs exceeds ``1 - quantile``.
  - ``"cross_fit"`` (default): ``folds``-fold cross-fitting. Sample ``i`` is in fold ``i % K``
    (``K = min(folds, n)``); for each fold the whitening is fitted on the other folds and the fold's
    samples are scored; ``gamma`` is the quantile of the pooled out-of-fold distances; the final
    whitening is fitted on every sample. Every distance behind ``gamma`` is then a distance of a sample
    the whitening did not see, as at test time.

Rows of one sample (``query="generated"``: one row per decoding step) are kept in one fold (``groups``)
and the threshold is the quantile of each sample's largest distance.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Annotated, Any, Literal, Sequence

import numpy as np

from ..errors import InputError
from ..settings import Field, Int, Real, Unit01, settings
from .features import (FEATURE_RULE, FEATURE_WIDTH, FEATURES, LOG_EPS, MASS_GROUPS, RATIO_EPS, TEXT_KEYS, TEXT_KEYS_RULE,
                       stealing_features)
from .whitening import SIGMA_EPS, WHITENING_RULE, WHITENINGS, Whitener, as_matrix, min_samples

#: Which clean distances set the threshold (see the module docstring).
THRESHOLD_FITS: tuple[str, ...] = ("cross_fit", "in_sample")
#: Defaults (chosen by measurement on the tiny family; see docs/detector.md).
DEFAULT_FEATURE = "log_ratio"
DEFAULT_WHITENING = "ledoit_wolf"
DEFAULT_THRESHOLD_FIT = "cross_fit"
DEFAULT_FOLDS = 5


#: Rules of the detector's settings (the error text of :class:`DetectorSettings` and of every class that
#: embeds them, e.g. :class:`~cleansight_analysis.defenses.cleansight.CleanSightConfig`).
FeatureSetting = Annotated[Literal[FEATURES], Field(description=FEATURE_RULE)]
WhiteningSetting = Annotated[Literal[WHITENINGS], Field(description=WHITENING_RULE)]
ThresholdFitSetting = Annotated[Literal[THRESHOLD_FITS], Field(description=f"must be one of {THRESHOLD_FITS} "
    "('cross_fit': gamma from out-of-fold distances; 'in_sample': from the calibration samples' own distances, "
    "the paper's)")]
FoldsSetting = Annotated[Int, Field(ge=2, description="must be an int >= 2")]
TextKeysSetting = Annotated[Literal[TEXT_KEYS], Field(description=TEXT_KEYS_RULE)]
EpsSetting = Annotated[Real, Field(ge=0.0, description="must be a finite number >= 0")]
LogEpsSetting = Annotated[Real, Field(gt=0.0, description="must be a finite number > 0")]
SigmaEpsSetting = Annotated[Real, Field(gt=0.0, description="must be a finite number > 0 (it keeps zero-variance "
                                                            "dimensions from dividing by zero)")]


@settings
class DetectorSettings:
    """Every setting of the detector (see the module docstring), checked on construction (an
    :class:`~cleansight_analysis.errors.InputError` names the setting). ``DetectorSettings.paper()``: the
    paper's ratio + diagonal whitening + in-sample threshold."""

    feature: FeatureSetting = DEFAULT_FEATURE
    whitening: WhiteningSetting = DEFAULT_WHITENING
    threshold_fit: ThresholdFitSetting = DEFAULT_THRESHOLD_FIT
    folds: FoldsSetting = DEFAULT_FOLDS
    quantile: Unit01 = 0.99
    text_keys: TextKeysSetting = "post_image"
    eps: EpsSetting = RATIO_EPS
    log_eps: LogEpsSetting = LOG_EPS
    sigma_eps: SigmaEpsSetting = SIGMA_EPS

    @classmethod
    def paper(cls, **changes: Any) -> "DetectorSettings":
        return cls(**{"feature": "ratio", "whitening": "diagonal", "threshold_fit": "in_sample", **changes})

    @property
    def width(self) -> int:
        """Feature values per head."""
        return FEATURE_WIDTH[self.feature]

    def features(self, mass: Any, groups: Sequence[str] = MASS_GROUPS) -> np.ndarray:
        """``[N, L * H * F]`` from group masses ``[N, L, H, G]``."""
        return stealing_features(mass, self.feature, self.text_keys, eps=self.eps, log_eps=self.log_eps, groups=groups)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Detector:
    """A calibrated detector: ``distance(x) > gamma`` flags.

    Attributes:
        settings: the :class:`DetectorSettings`.
        whitener: fitted on every calibration sample.
        gamma: the threshold.
        distances: ``[n]`` the per-sample clean distances ``gamma`` is the quantile of (out-of-fold
            under ``"cross_fit"``, in-sample under ``"in_sample"``).
        in_sample: ``[n]`` per-sample distances to the final whitening (equal to ``distances`` for
            ``"in_sample"``).
        folds: ``[n]`` fold of each sample (``None`` for ``"in_sample"``).
    """

    settings: DetectorSettings
    whitener: Whitener
    gamma: float
    distances: np.ndarray
    in_sample: np.ndarray
    folds: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def distance(self, x: Any) -> np.ndarray:
        return self.whitener.distance(x)

    def threshold(self, quantile: float) -> float:
        """The threshold another ``quantile`` in ``[0, 1]`` would give (same clean distances)."""
        return float(np.quantile(self.distances, quantile))

    def flags(self, x: Any) -> np.ndarray:
        return self.distance(x) > self.gamma


def _per_sample(dist: np.ndarray, owner: np.ndarray | None, n: int) -> np.ndarray:
    """Each sample's largest distance over its rows (``owner`` ``[rows]`` sample index; None: one row each)."""
    if owner is None:
        return dist
    out = np.full(n, -np.inf)
    np.maximum.at(out, owner, dist)
    return out


def least_samples(settings: DetectorSettings) -> int:
    """Fewest clean samples :func:`fit_detector` accepts: 3 for ``"cross_fit"`` (each fold's whitening needs
    2), else what the whitening needs (1 diagonal, 2 Ledoit-Wolf)."""
    return 3 if settings.threshold_fit == "cross_fit" else min_samples(settings.whitening)


def fit_detector(x: Any, settings: DetectorSettings | None = None, *, groups: Any = None,
                 owner: str = "fit_detector") -> Detector:
    """Calibrate on clean features ``x`` ``[rows, D]``.

    Args:
        x: clean features (one row per sample, or per sample and decoding step with ``groups``).
        settings: :class:`DetectorSettings` (default: the package defaults).
        groups: ``[rows]`` int sample index of each row (0..n-1), or None (row ``i`` is sample ``i``).

    Raises:
        InputError: fewer samples than :func:`least_samples`.
    """
    settings = settings or DetectorSettings()
    x = as_matrix(x, owner)
    rows = len(x)
    if groups is None:
        owner_of, n = None, rows
    else:
        owner_of = np.asarray(groups, dtype=np.int64).reshape(-1)
        if len(owner_of) != rows:
            raise InputError(f"{owner}: {len(owner_of)} groups for {rows} feature rows")
        n = int(owner_of.max()) + 1 if rows else 0
    if n < min_samples(settings.whitening):
        raise InputError(f"{owner}: whitening={settings.whitening!r} needs at least {min_samples(settings.whitening)} "
                         f"clean sample(s), got {n}")

    def whitener() -> Whitener:
        return Whitener(settings.whitening, sigma_eps=settings.sigma_eps)

    final = whitener().fit(x)
    in_sample = _per_sample(final.distance(x), owner_of, n)
    folds = None
    if settings.threshold_fit == "in_sample":
        dist = in_sample
    else:
        if n < 3:
            raise InputError(f"{owner}: threshold_fit='cross_fit' needs at least 3 clean samples (each fold's "
                             f"whitening is fitted on the others), got {n}; use threshold_fit='in_sample'")
        k = min(settings.folds, n)
        folds = np.arange(n) % k
        row_fold = folds if owner_of is None else folds[owner_of]
        oof = np.empty(rows)
        for f in range(k):
            held = row_fold == f
            oof[held] = whitener().fit(x[~held]).distance(x[held])
        dist = _per_sample(oof, owner_of, n)
    gamma = float(np.quantile(dist, settings.quantile))
    return Detector(settings, final, gamma, dist, in_sample, folds,
                    info={"n_samples": n, "feature_rows": rows, "shrinkage": final.shrinkage_})


__all__ = ["DEFAULT_FEATURE", "DEFAULT_FOLDS", "DEFAULT_THRESHOLD_FIT", "DEFAULT_WHITENING", "THRESHOLD_FITS",
           "Detector", "DetectorSettings", "EpsSetting", "FeatureSetting", "FoldsSetting", "LogEpsSetting",
           "SigmaEpsSetting", "TextKeysSetting", "ThresholdFitSetting", "WhiteningSetting", "fit_detector",
           "least_samples"]
