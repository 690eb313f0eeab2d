"""The perturbation interface: :class:`Perturbation`, the kind registry, the argument checks and the
factory :func:`get_perturbation` (the kinds themselves: :mod:`.pixel`, :mod:`.attention`)."""

from __future__ import annotations

import math
import numbers
from dataclasses import fields
from typing import Any, ClassVar

import numpy as np

from ...errors import InputError
from ...models.intervention import Intervention
from ...registry import Registry

#: Pixel perturbation kinds (act on the image before the processor).
PIXEL_KINDS: tuple[str, ...] = ("st", "shrinkpad", "blur", "jpeg", "noise")
#: Attention perturbation kinds (act on ``hook_pattern`` of the LM layers).
ATTENTION_KINDS: tuple[str, ...] = ("attn_uniform",)
#: Every kind :func:`get_perturbation` knows.
PERTURBATION_KINDS: tuple[str, ...] = PIXEL_KINDS + ATTENTION_KINDS
#: kind -> perturbation class (a :class:`~cleansight_analysis.registry.Registry`; each class registers
#: itself with ``@PERTURBATIONS.register`` under its ``kind``).
PERTURBATIONS: Registry[type["Perturbation"]] = Registry("perturbation kind", plural="kinds", name_attr="kind")
#: Grey used for padding and rotation fill (the paper's 127).
GREY = 127


# ---------------------------------------------------------------------------------------------- checks
def _check_unit(value: Any, what: str, owner: str) -> float:
    """``value`` as a float in ``[0, 1]`` or :class:`InputError` naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(f"{owner}: {what} must be a number in [0, 1], got {value!r} ({type(value).__name__})")
    value = float(value)
    if not (0.0 <= value <= 1.0):  # also rejects NaN
        raise InputError(f"{owner}: {what} must lie in [0, 1] (0 = no perturbation, 1 = strongest), got {value!r}")
    return value


def _check_real(value: Any, what: str, owner: str, lo: float, hi: float, *, hi_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(float(value)):
        raise InputError(f"{owner}: {what} must be a number, got {value!r}")
    value = float(value)
    if value < lo or value > hi or (hi_open and value == hi):
        bracket = ")" if hi_open else "]"
        raise InputError(f"{owner}: {what} must lie in [{lo:g}, {hi:g}{bracket}, got {value!r}")
    return value


def _check_int(value: Any, what: str, owner: str, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputError(f"{owner}: {what} must be an integer, got {value!r} ({type(value).__name__})")
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise InputError(f"{owner}: {what} must lie in [{lo}, {hi}], got {value}")
    return value


def _check_bool(value: Any, what: str, owner: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise InputError(f"{owner}: {what} must be True or False, got {value!r}")
    return bool(value)


# ---------------------------------------------------------------------------------------------- base
class Perturbation(Intervention):
    """An intervention whose strength is one number, ``intensity`` in ``[0, 1]``.

    Concrete perturbations are dataclasses; their fields other than the intensity are the *settings*
    accepted by :func:`get_perturbation`. ``name`` is ``"{kind}@{intensity}"``.
    """

    kind: ClassVar[str] = "perturbation"
    domain: ClassVar[str] = "none"  # type: ignore[misc]
    #: dataclass field holding the intensity (``"intensity"``, or ``"eta"`` for attention kinds).
    intensity_field: ClassVar[str] = "intensity"

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"{self.kind}@{self.intensity:g}"

    @property
    def intensity(self) -> float:
        return float(getattr(self, self.intensity_field))

    @classmethod
    def setting_names(cls) -> tuple[str, ...]:
        """Names of the settings (dataclass fields other than the intensity)."""
        return tuple(f.name for f in fields(cls) if f.init and f.name != cls.intensity_field)  # type: ignore[arg-type]

    def settings(self) -> dict[str, Any]:
        """Current settings as plain Python values."""
        out = {}
        for key in self.setting_names():
            value = getattr(self, key)
            if isinstance(value, tuple):
                value = [list(v) if isinstance(v, tuple) else v for v in value]
            out[key] = value
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "domain": self.domain, "kind": self.kind, "intensity": self.intensity,
                **self.settings()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.settings().items())
        return f"{type(self).__name__}({self.intensity_field}={self.intensity!r}{', ' if args else ''}{args})"


# ---------------------------------------------------------------------------------------------- factory
def perturbation_class(kind: str) -> type[Perturbation]:
    """The class of perturbation ``kind`` (case-insensitive), or :class:`InputError` listing the kinds."""
    return PERTURBATIONS.get(kind)


def get_perturbation(kind: str, intensity: float, **settings: Any) -> Perturbation:
    """Build perturbation ``kind`` at ``intensity`` (in ``[0, 1]``; 0 = identity).

    Args:
        kind: one of :data:`PERTURBATION_KINDS`.
        intensity: strength; ``eta`` for ``attn_uniform``.
        **settings: fields of that kind's class (e.g. ``seed`` for pixel kinds, ``layers`` / ``heads``
            for ``attn_uniform``).

    Raises:
        InputError: unknown kind (lists the known kinds), intensity outside ``[0, 1]`` or not a number,
            unknown setting (lists the accepted ones) or a setting value out of range.
    """
    cls = perturbation_class(kind)
    _check_unit(intensity, "intensity", f"perturbation {cls.kind!r}")
    accepted = cls.setting_names()
    unknown = sorted(set(settings) - set(accepted))
    if unknown:
        raise InputError(f"perturbation {cls.kind!r} has no setting(s) {', '.join(unknown)}; "
                         f"accepted: {', '.join(accepted)}")
    return cls(**{cls.intensity_field: intensity}, **settings)
