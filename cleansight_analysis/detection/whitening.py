"""The whitened distance of a feature vector to clean calibration features (one definition).

:class:`Whitener` with the named setting ``whitening``:

- ``"diagonal"`` (the paper and its code): ``mu`` and the population ``sigma`` per dimension;
  ``d(x) = || (x - mu) / (sigma + sigma_eps) ||_2`` (``sigma_eps = 1e-8`` keeps a dimension that never
  varied finite).
- ``"ledoit_wolf"``: Mahalanobis distance under a Ledoit-Wolf shrunk covariance. The features are first
  standardised per dimension (``z = (x - mu) / (sigma + sigma_eps)``), then
  :class:`sklearn.covariance.LedoitWolf` shrinks the covariance of ``z`` (the correlation matrix) towards
  a scaled identity, and ``d(x) = sqrt(z^T C^{-1} z)`` with ``C`` the shrunk matrix (eigenvalues floored
  at ``sigma_eps**2``). Standardising first makes the shrinkage target scale-free: features whose scales
  differ by orders of magnitude (raw ratios) would otherwise let the largest dimension set the target
  for all. With no correlation and full shrinkage it reduces to ``"diagonal"``.
  ``"full"`` (:class:`~cleansight_analysis.attention.separability.SeparabilitySettings`) also takes a
  fixed shrinkage weight in ``[0, 1]`` (``shrinkage=``) instead of Ledoit-Wolf's.

``fit`` needs at least 1 sample (``"diagonal"``: one sample gives ``sigma = 0``, so only that very vector
scores 0) or 2 (``"ledoit_wolf"``); ``distance`` refuses NaN / infinite features.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from ..errors import InputError

#: The whitening settings.
WHITENINGS: tuple[str, ...] = ("diagonal", "ledoit_wolf")
#: Default floor added to each ``sigma`` (the paper's 1e-8).
SIGMA_EPS = 1e-8
#: What ``whitening`` accepts.
WHITENING_RULE = (f"must be one of {WHITENINGS} ('diagonal': per-dimension mu and sigma, the paper's; 'ledoit_wolf': "
                  "Mahalanobis with a Ledoit-Wolf shrunk covariance)")


def check_whitening(whitening: Any, owner: str) -> str:
    if not isinstance(whitening, str) or whitening not in WHITENINGS:
        raise InputError(f"{owner}: whitening={whitening!r} {WHITENING_RULE}")
    return whitening


def min_samples(whitening: str) -> int:
    """Fewest calibration samples a whitening can be fitted on."""
    return 2 if whitening == "ledoit_wolf" else 1


def as_matrix(x: Any, owner: str) -> np.ndarray:
    """``x`` as a finite float64 ``[n, d]`` matrix (a vector is one dimension)."""
    x = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise InputError(f"{owner}: expected features [n, d], got shape {x.shape}")
    if not np.isfinite(x).all():
        raise InputError(f"{owner}: features contain {int((~np.isfinite(x)).sum())} NaN or infinite value(s)")
    return x


class Whitener:
    """Fit on clean features ``[n, d]``; :meth:`distance` of any features to them.

    Args:
        whitening: ``"diagonal"`` or ``"ledoit_wolf"`` (see the module docstring).
        sigma_eps: floor added to each ``sigma`` (and ``sigma_eps**2`` floors the shrunk eigenvalues).
        shrinkage: ``"ledoit_wolf"`` only: ``None`` (Ledoit-Wolf's estimate) or a fixed weight in ``[0, 1]``.

    Attributes (after ``fit``): ``mu`` ``[d]``, ``sigma`` ``[d]`` (population std), ``matrix`` ``[d, d]``
    (``"ledoit_wolf"``: ``z @ matrix`` has identity covariance; ``None`` for ``"diagonal"``),
    ``shrinkage_`` (the weight used, or ``None``), ``n`` (samples fitted on).
    """

    def __init__(self, whitening: str = "diagonal", *, sigma_eps: float = SIGMA_EPS, shrinkage: float | None = None):
        self.whitening = check_whitening(whitening, "Whitener")
        if not isinstance(sigma_eps, numbers.Real) or isinstance(sigma_eps, bool) or not sigma_eps > 0:
            raise InputError(f"Whitener: sigma_eps={sigma_eps!r} must be a finite number > 0")
        self.sigma_eps = float(sigma_eps)
        if shrinkage is not None and (isinstance(shrinkage, bool) or not isinstance(shrinkage, numbers.Real)
                                      or not 0.0 <= float(shrinkage) <= 1.0):
            raise InputError(f"Whitener: shrinkage={shrinkage!r} must be None (Ledoit-Wolf) or a number in [0, 1]")
        self.shrinkage = None if shrinkage is None else float(shrinkage)
        self.mu: np.ndarray | None = None
        self.sigma: np.ndarray | None = None
        self.matrix: np.ndarray | None = None
        self.shrinkage_: float | None = None
        self.n = 0

    @classmethod
    def from_params(cls, whitening: str, mu: Any, sigma: Any, matrix: Any = None, *,
                    sigma_eps: float = SIGMA_EPS) -> "Whitener":
        """A fitted whitener from stored parameters (a calibration file)."""
        w = cls(whitening, sigma_eps=sigma_eps)
        w.mu, w.sigma = np.asarray(mu, dtype=np.float64), np.asarray(sigma, dtype=np.float64)
        w.matrix = None if matrix is None else np.asarray(matrix, dtype=np.float64)
        if (w.whitening == "ledoit_wolf") != (w.matrix is not None):
            raise InputError(f"Whitener.from_params: whitening={whitening!r} "
                             f"{'needs' if w.whitening == 'ledoit_wolf' else 'takes no'} matrix")
        return w

    @property
    def fitted(self) -> bool:
        return self.mu is not None

    def fit(self, x: Any) -> "Whitener":
        """Fit on clean features ``x`` ``[n, d]`` (``n >=`` :func:`min_samples`)."""
        x = as_matrix(x, "Whitener.fit")
        n, d = x.shape
        least = min_samples(self.whitening)
        if n < least:
            raise InputError(f"Whitener.fit: whitening={self.whitening!r} needs at least {least} calibration "
                             f"sample(s), got {n}")
        self.n = n
        self.mu, self.sigma = x.mean(0), x.std(0)
        self.matrix, self.shrinkage_ = None, None
        if self.whitening == "ledoit_wolf":
            z = (x - self.mu) / (self.sigma + self.sigma_eps)
            if self.shrinkage is None:
                from sklearn.covariance import LedoitWolf

                est = LedoitWolf(assume_centered=True, store_precision=False).fit(z)
                cov, self.shrinkage_ = est.covariance_, float(est.shrinkage_)
            else:
                from sklearn.covariance import ShrunkCovariance

                est = ShrunkCovariance(shrinkage=self.shrinkage, assume_centered=True, store_precision=False).fit(z)
                cov, self.shrinkage_ = est.covariance_, self.shrinkage
            vals, vecs = np.linalg.eigh(cov)
            self.matrix = vecs / np.sqrt(np.clip(vals, self.sigma_eps ** 2, None))[None, :]
        return self

    def standardise(self, x: Any) -> np.ndarray:
        """``(x - mu) / (sigma + sigma_eps)`` ``[n, d]``."""
        if self.mu is None or self.sigma is None:
            raise InputError("Whitener: call fit() on clean calibration features first")
        x = as_matrix(x, "Whitener.distance")
        if x.shape[1] != len(self.mu):
            raise InputError(f"Whitener.distance: {x.shape[1]} features, fitted on {len(self.mu)}")
        return (x - self.mu[None, :]) / (self.sigma[None, :] + self.sigma_eps)

    def distance(self, x: Any) -> np.ndarray:
        """Whitened distance ``[n]`` (float64) of each row of ``x`` ``[n, d]``."""
        z = self.standardise(x)
        if self.matrix is not None:
            z = z @ self.matrix
        return np.sqrt((z ** 2).sum(1))

    def params(self) -> dict[str, Any]:
        """``mu``, ``sigma`` and ``matrix`` (``None`` for ``"diagonal"``) as float64 arrays."""
        return {"mu": self.mu, "sigma": self.sigma, "matrix": self.matrix}


def whitened_distance(x: Any, mu: np.ndarray, sigma: np.ndarray, sigma_eps: float = SIGMA_EPS) -> np.ndarray:
    """The diagonal distance ``|| (x - mu) / (sigma + sigma_eps) ||_2`` per row: ``[N, D]`` -> ``[N]``."""
    return Whitener.from_params("diagonal", mu, sigma, sigma_eps=sigma_eps).distance(x)


__all__ = ["SIGMA_EPS", "WHITENINGS", "WHITENING_RULE", "Whitener", "as_matrix", "check_whitening", "min_samples", "whitened_distance"]
