"""Small helpers shared by the summary modules (one copy of each): number formats and sample counts."""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from ..perturbation import attack_label


def _finite(value: Any) -> bool:
    try:
        return value is not None and bool(np.isfinite(float(value)))
    except (TypeError, ValueError):
        return False


def _pct(value: Any, digits: int = 0) -> str:
    """A fraction in percent: ``0.773 -> "77 %"`` (``digits=1``: ``"77.3 %"``); ``"n/a"`` when missing."""
    return f"{100 * float(value):.{digits}f} %" if _finite(value) else "n/a"


def _span(values: Any, unit: str = " %") -> str:
    """``"lo-hi %"`` of finite fractions in percent (one value: ``"v %"``); ``unit`` follows the numbers."""
    vals = [float(v) for v in values if _finite(v)]
    if not vals:
        return "n/a"
    lo, hi = round(100 * min(vals)), round(100 * max(vals))
    return f"{lo}{unit}" if lo == hi else f"{lo}-{hi}{unit}"


def _num(value: Any, digits: int = 2) -> str:
    """A plain number with ``digits`` decimals (AUROC, rates as fractions); ``"n/a"`` when missing."""
    return f"{float(value):.{digits}f}" if _finite(value) else "n/a"


def _range(values: Iterable[Any], digits: int = 2) -> str:
    """``"lo-hi"`` of finite values with ``digits`` decimals (one distinct value: ``"v"``)."""
    vals = [float(v) for v in values if _finite(v)]
    if not vals:
        return "n/a"
    lo, hi = _num(min(vals), digits), _num(max(vals), digits)
    return lo if lo == hi else f"{lo}-{hi}"


def _points(value: Any, digits: int = 0) -> str:
    """A difference of two fractions in percentage points, signed: ``0.109 -> "+11 points"``."""
    return f"{100 * float(value):+.{digits}f} points" if _finite(value) else "n/a"


def _layers(layers: Iterable[Any], word: bool = False) -> str:
    """``[5, 6, 7] -> "5-7"``, ``[2] -> "2"``, ``[1, 3] -> "1,3"``; also accepts ``"5,6,7"``.

    ``word=True`` names them: ``"layers 5-7"`` / ``"layer 2"``.
    """
    if isinstance(layers, str):
        layers = [x for x in layers.split(",") if x.strip()]
    vals = sorted(int(x) for x in layers)
    if not vals:
        text = "none"
    elif len(vals) > 1 and vals == list(range(vals[0], vals[-1] + 1)):
        text = f"{vals[0]}-{vals[-1]}"
    else:
        text = ",".join(str(v) for v in vals)
    return (f"layer {text}" if len(vals) == 1 else f"layers {text}") if word and vals else text


def _tau(value: Any) -> str:
    """A threshold as written: ``0.001 -> "1e-03"``, ``0.5113 -> "0.51"``."""
    if not _finite(value):
        return "n/a"
    value = float(value)
    return f"{value:.0e}" if 0 < value < 0.01 else f"{value:.2f}"


def _names(items: Iterable[Any]) -> str:
    """``["badnet", "sig"] -> "BadNet, SIG"`` (``"none"`` when empty)."""
    items = [attack_label(i) for i in items]
    return ", ".join(items) if items else "none"


def _detection_counts(rows: Any) -> str:
    """``"256 clean + 256 triggered test inputs, 200 clean validation inputs"`` from detection rows.

    Args:
        rows: ``{attack: detection rows}`` (``sample_id, condition`` in ``calibration / clean / triggered``),
            e.g. ``DetectionInputs.rows``; one table is accepted too. Counts that differ between attacks are
            joined with ``/``.
    """
    tables = list(rows.values()) if isinstance(rows, dict) else [rows]
    counts: dict[str, set[int]] = {"clean": set(), "triggered": set(), "calibration": set()}
    for t in tables:
        for cond in counts:
            counts[cond].add(int(t.loc[t["condition"] == cond, "sample_id"].nunique()))
    fmt = {k: "/".join(str(v) for v in sorted(vals)) for k, vals in counts.items()}
    return (f"{fmt['clean']} clean + {fmt['triggered']} triggered test inputs, {fmt['calibration']} clean "
            "validation inputs")


__all__ = ["_detection_counts", "_finite", "_layers", "_names", "_num", "_pct", "_points", "_range", "_span", "_tau",
           "attack_label"]
