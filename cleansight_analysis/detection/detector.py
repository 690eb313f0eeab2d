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

import math
import numbers
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from ..errors import InputError
from .features import (FEATURE_WIDTH, LOG_EPS, MASS_GROUPS, RATIO_EPS, check_eps, check_feature, check_text_keys,
                       stealing_features)
from .whitening import SIGMA_EPS, Whitener, as_matrix, check_whitening, min_samples

#: Which clean distances set the threshold (see the module docstring).
THRESHOLD_FITS: tuple[str, ...] = ("cross_fit", "in_sample")
#: Defaults (chosen by measurement on the tiny family; see docs/detector.md).
DEFAULT_FEATURE = "log_ratio"
DEFAULT_WHITENING = "ledoit_wolf"
DEFAULT_THRESHOLD_FIT = "cross_fit"
DEFAULT_FOLDS = 5


def check_quantile(value: Any, owner: str, name: str = "quantile") -> float:
    if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value))
            or not 0.0 < float(value) <= 1.0):
        raise InputError(f"{owner}: {name}={value!r} must be a number in (0, 1]")
    return float(value)


def check_threshold_fit(value: Any, owner: str) -> str:
    if not isinstance(value, str) or value not in THRESHOLD_FITS:
        raise InputError(f"{owner}: threshold_fit={value!r} must be one of {THRESHOLD_FITS} ('cross_fit': gamma from "
                         "out-of-fold distances; 'in_sample': from the calibration samples' own distances, the paper's)")
    return value


def check_folds(value: Any, owner: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 2:
        raise InputError(f"{owner}: folds={value!r} must be an int >= 2")
    return int(value)


@dataclass(frozen=True)
class DetectorSettings:
    """Every setting of the detector (see the module docstring). ``DetectorSettings.paper()``: the paper's
    ratio + diagonal whitening + in-sample threshold."""

    feature: str = DEFAULT_FEATURE
    whitening: str = DEFAULT_WHITENING
    threshold_fit: str = DEFAULT_THRESHOLD_FIT
    folds: int = DEFAULT_FOLDS
    quantile: float = 0.99
    text_keys: str = "post_image"
    eps: float = RATIO_EPS
    log_eps: float = LOG_EPS
    sigma_eps: float = SIGMA_EPS

    def __post_init__(self) -> None:
        validate(self, "DetectorSettings")

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


def validate(obj: Any, owner: str) -> None:
    """Check and normalise the detector settings found on ``obj`` (a frozen dataclass with those fields)."""
    def put(name: str, value: Any) -> None:
        object.__setattr__(obj, name, value)

    put("feature", check_feature(obj.feature, owner))
    put("whitening", check_whitening(obj.whitening, owner))
    put("threshold_fit", check_threshold_fit(obj.threshold_fit, owner))
    put("folds", check_folds(obj.folds, owner))
    put("quantile", check_quantile(obj.quantile, owner))
    put("text_keys", check_text_keys(obj.text_keys, owner))
    put("eps", check_eps(obj.eps, owner, "eps", positive=False))
    put("log_eps", check_eps(obj.log_eps, owner, "log_eps", positive=True))
    if not isinstance(obj.sigma_eps, numbers.Real) or isinstance(obj.sigma_eps, bool) or not (
            math.isfinite(float(obj.sigma_eps)) and obj.sigma_eps > 0):
        raise InputError(f"{owner}: sigma_eps={obj.sigma_eps!r} must be a finite number > 0 "
                         "(it keeps zero-variance dimensions from dividing by zero)")
    put("sigma_eps", float(obj.sigma_eps))


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
           "Detector", "DetectorSettings", "check_folds", "check_quantile", "check_threshold_fit", "fit_detector",
           "least_samples", "validate"]
