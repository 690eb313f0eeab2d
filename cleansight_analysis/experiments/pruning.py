"""Fig. 6: how the pruning threshold ``tau`` trades the backdoor against the answer (oracle detector).

CleanSight prunes, for a flagged input, the image keys ``Omega = {j in I_vis : max_h alpha^{l_e,h}_{q,j} > tau}``
of its last detection layer ``l_e`` (``docs/method.md#pruning``). Fig. 6 isolates that step: every
triggered input is flagged (an oracle detector, ``gamma = -inf``) and ``tau`` is swept. A small ``tau``
masks many image tokens (the backdoor should die, and so may the answer); ``tau -> 1`` masks nothing
(the undefended model).

The sweep runs the fitted CleanSight defense's own one-pass pruning
(:func:`cleansight_analysis.evaluation.sweeps.tau_sweep` with ``defense=``), so ``l_e`` and the
``mask_scope`` are the defense's. The fit uses ``tau="auto"``, so its calibrated ``tau`` is swept too and
marked in the table (``is_auto``); the default ``tau`` (1e-4) is one of :data:`DEFAULT_TAUS`.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from ..defenses.cleansight import MASK_SCOPES, CleanSight
from ..errors import InputError
from ..evaluation.sweeps import tau_sweep
from ..inputs.batch import sample_batches

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from .context import FigureContext

#: tau values of the sweep (log spaced; ``1.0`` masks nothing: no attention weight exceeds 1).
DEFAULT_TAUS: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
#: Absolute tau values named by the paper and its code (``docs/method.md#tau``).
PAPER_TAUS: dict[str, float] = {"paper code": 1e-4, "paper's balance": 1e-3, "released pkg": 0.02}
#: Samples per forward pass while fitting CleanSight.
FIT_BATCH = 32
#: Columns of :func:`pruning_threshold_table`.
COLUMNS: tuple[str, ...] = ("attack", "mask_scope", "tau", "is_auto", "asr", "poisoned_utility", "mean_pruned",
                            "image_tokens", "pruned_share", "layer", "detection_layers", "tau_auto", "n", "n_val")


def fit_cleansight(model: Any, samples: Sequence[Any], **settings: Any) -> Any:
    """A :class:`~cleansight_analysis.defenses.cleansight.CleanSight` fitted on clean ``samples``.

    ``settings`` go to the config (default: the defense's defaults, ``layers="auto"``, ``tau="auto"``).
    The warning about fewer calibration samples than feature dimensions is silenced: it concerns the
    detector's threshold ``gamma``, which the oracle analyses of Figs. 6 and 7 never use (they only
    take ``l_e``, ``tau`` and the mask from the fit).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"CleanSight\.fit: .* calibration samples for")
        return CleanSight(**settings).fit(model, list(samples))


def with_mask_scope(defense: Any, scope: str) -> Any:
    """A shallow copy of a fitted CleanSight whose config uses ``mask_scope=scope`` (same calibration)."""
    if scope not in MASK_SCOPES:
        raise InputError(f"mask scope {scope!r} is not one of {MASK_SCOPES}")
    out = copy.copy(defense)
    out.config = replace(defense.config, mask_scope=scope)
    return out


def mean_image_tokens(model: Any, samples: Sequence[Any], batch_size: int = 32) -> float:
    """Mean number of image tokens per sample (tokenisation only, no forward pass)."""
    counts = [len(g.image) for _, batch in sample_batches(model, list(samples), batch_size) for g in batch.groups]
    return float(sum(counts) / max(len(counts), 1))


def sweep_taus(model: Any, attack: Any, defense: Any, samples: Sequence[Any], *, taus: Sequence[float] = DEFAULT_TAUS,
               seed: int = 0, batch_size: int = 32, max_new_tokens: int = 12, image_tokens: float | None = None,
               progress: bool = False) -> "pd.DataFrame":
    """Oracle tau sweep of one fitted CleanSight ``defense`` on the triggered copies of ``samples``.

    The defense's calibrated tau is added to ``taus`` (``is_auto`` marks its row).

    Returns:
        one row per tau (ascending): ``mask_scope, tau, is_auto, asr, poisoned_utility, mean_pruned``
        (image tokens masked per input), ``image_tokens`` (per input), ``pruned_share``
        (``mean_pruned / image_tokens``), ``layer`` (``l_e``), ``detection_layers`` (``"5,6,7"``),
        ``tau_auto``, ``n``.
    """
    cal = getattr(defense, "calibration", None)
    if cal is None:
        raise InputError("sweep_taus: the defense is not fitted (call fit_cleansight first)")
    bad = [t for t in taus if not isinstance(t, (int, float)) or isinstance(t, bool) or not 0.0 < float(t) <= 1.0]
    if bad or not taus:
        raise InputError(f"sweep_taus: taus must be numbers in (0, 1], got {list(taus)!r}")
    auto = float(cal.tau)
    grid = sorted({float(t) for t in taus} | {auto})
    out = tau_sweep(model, attack, defense=defense, taus=grid, samples=list(samples), seed=seed,
                    batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress)
    if image_tokens is None:
        image_tokens = mean_image_tokens(model, samples, batch_size)
    out["is_auto"] = [t == auto for t in out["tau"]]
    out["image_tokens"] = float(image_tokens)
    out["pruned_share"] = out["mean_pruned"] / float(image_tokens) if image_tokens else float("nan")
    out["detection_layers"] = ",".join(str(int(x)) for x in cal.layers)
    out["tau_auto"] = auto
    out["mask_scope"] = defense.config.mask_scope
    return out


def _scope_plan(attacks: Sequence[str], mask_scopes: Mapping[str, Sequence[str] | None]) -> dict[str, list[str]]:
    """``{attack: [scopes]}`` from ``{scope: attacks or None (= every attack)}``, attack order kept."""
    if not mask_scopes:
        raise InputError("pruning_threshold_table: mask_scopes is empty; e.g. {'reference': None}")
    plan: dict[str, list[str]] = {a: [] for a in attacks}
    for scope, names in mask_scopes.items():
        for a in (attacks if names is None else names):
            if a not in plan:
                raise InputError(f"pruning_threshold_table: mask scope {scope!r} names attack {a!r}, which is not "
                                 f"among the notebook's attacks {list(attacks)}")
            plan[a].append(scope)
    return {a: s for a, s in plan.items() if s}


def pruning_threshold_table(ctx: "FigureContext", *, taus: Sequence[float] = DEFAULT_TAUS, n_val: int = 16,
                            mask_scopes: Mapping[str, Sequence[str] | None] | None = None,
                            max_new_tokens: int = 12, batch_size: int = 64) -> "pd.DataFrame":
    """Fig. 6 table: ASR, poisoned utility and pruned share vs tau, per attack (oracle detector), cached.

    For each attack: the backdoored model is loaded, CleanSight (default settings, ``layers="auto"``, but
    ``tau="auto"`` so that the calibrated tau is marked) is fitted on ``ctx.count(n_val)`` clean calibration samples, and the triggered copies of
    ``ctx.count()`` test samples are answered with every tau (plus the calibrated one) and every mask
    scope that ``mask_scopes`` asks for that attack. Smoke runs sweep the first attack only (each attack
    loads its own model) and only the smallest and largest tau (plus the calibrated one).

    Args:
        ctx: the notebook's :class:`FigureContext`.
        taus: thresholds in (0, 1].
        n_val: clean calibration samples of the fit (gives ``l_e`` and the calibrated tau; the detector's
            gamma is unused here, so a few samples suffice: 16 x 64 image tokens for the tau quantile).
        mask_scopes: ``{mask_scope: attacks or None (= all)}``; default ``{"reference": None}``, the
            defense's default scope (prefill from ``l_e``, every layer at decode steps).

    Returns:
        DataFrame with :data:`COLUMNS`, one row per attack x scope x tau.
    """
    import pandas as pd

    mask_scopes = dict(mask_scopes or {"reference": None})
    attacks = list(ctx.attacks[:1] if ctx.smoke else ctx.attacks)
    plan = _scope_plan(attacks, {s: (None if a is None else [x for x in a if x in attacks])
                                 for s, a in mask_scopes.items()})
    grid = sorted({float(t) for t in taus})
    if ctx.smoke:  # the extremes only (plus the calibrated tau), to keep smoke runs short
        grid = sorted({grid[0], grid[-1]})

    def compute() -> pd.DataFrame:
        test, val = ctx.samples("test"), ctx.samples("calibration", n_val)
        parts = []
        for attack_name in plan:
            model, attack, _ = ctx.load(attack_name)
            defense = fit_cleansight(model, val, batch_size=FIT_BATCH, tau="auto")
            tokens = mean_image_tokens(model, test, batch_size)
            for scope in plan[attack_name]:
                part = sweep_taus(model, attack, with_mask_scope(defense, scope), test, taus=grid, seed=ctx.seed,
                                  batch_size=batch_size, max_new_tokens=max_new_tokens, image_tokens=tokens,
                                  progress=not ctx.smoke)
                part["attack"] = attack_name
                part["n_val"] = len(val)
                parts.append(part)
        return pd.concat(parts, ignore_index=True)[list(COLUMNS)]

    return ctx.cached("pruning_threshold", compute, taus=grid, n_val=ctx.count(n_val),
                      mask_scopes={s: (None if a is None else list(a)) for s, a in mask_scopes.items()},
                      attacks_swept=list(plan), max_new_tokens=max_new_tokens)


def pruning_summary(table: "pd.DataFrame", taus: Sequence[float] = (1e-4, 1e-3), digits: int = 3) -> "pd.DataFrame":
    """Per attack and scope: ASR / poisoned utility / pruned share at the calibrated tau and at ``taus``,
    the undefended ASR (largest tau), the largest swept tau with ASR 0 (NaN if none) and the paper's claim
    (ASR ~0 by tau 1e-3 for every attack), for the notebook. Rates are rounded to ``digits``; taus are not."""
    import pandas as pd

    rows = []
    for (attack, scope), sub in table.groupby(["attack", "mask_scope"], sort=False):
        sub = sub.sort_values("tau")
        auto = sub[sub["is_auto"]].iloc[0]
        row = {"attack": attack, "mask_scope": scope, "asr_undefended": float(sub["asr"].iloc[-1]),
               "tau_auto": float(auto["tau"]), "asr_at_auto": float(auto["asr"]),
               "utility_at_auto": float(auto["poisoned_utility"]), "pruned_at_auto": float(auto["pruned_share"])}
        for t in taus:
            hit = sub[np.isclose(sub["tau"], t)]
            row[f"asr_at_{t:g}"] = float(hit["asr"].iloc[0]) if len(hit) else float("nan")
            row[f"utility_at_{t:g}"] = float(hit["poisoned_utility"].iloc[0]) if len(hit) else float("nan")
        zero = sub[sub["asr"] == 0]
        row["largest_tau_asr0"] = float(zero["tau"].max()) if len(zero) else float("nan")
        row["paper: ASR at tau 1e-3"] = "~0 (every attack)"
        rows.append(row)
    out = pd.DataFrame(rows)
    rates = [c for c in out.columns if c.startswith(("asr", "utility", "pruned"))]
    out[rates] = out[rates].round(digits)
    return out


__all__ = ["COLUMNS", "DEFAULT_TAUS", "PAPER_TAUS", "fit_cleansight", "mean_image_tokens", "pruning_summary",
           "pruning_threshold_table", "sweep_taus", "with_mask_scope"]
