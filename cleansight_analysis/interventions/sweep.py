"""Perturbation sweeps: ASR and utility of a (backdoored) model against perturbation intensity.

This is the measurement behind the paper's Fig. 1: pixel perturbations (``st``, ``blur``, ...) barely
lower the attack success rate, while flattening the image attention of text queries (``attn_uniform``)
removes it. One call gives a tidy table, one row per sweep point::

    from cleansight_analysis.interventions.sweep import perturbation_sweep

    frame = perturbation_sweep(model, test_samples, get_attack("badnet"), ["st", "attn_uniform"],
                               [0, 0.25, 0.5, 0.75, 1.0], seed=0)
    sns.lineplot(frame, x="intensity", y="asr", hue="kind")
"""

from __future__ import annotations

import numbers
import time
from typing import Any, Sequence

from ..errors import InputError
from ..evaluation.metrics import DEFAULT_TARGET, contains_target, exact_match, rate
from .base import Intervention, NoIntervention
from .perturbations import PERTURBATION_KINDS, get_perturbation, perturbation_class

#: Columns of the frame returned by :func:`perturbation_sweep`, in order.
SWEEP_COLUMNS: tuple[str, ...] = ("kind", "domain", "intensity", "asr", "clean_acc", "poisoned_acc", "n")


def _check_kinds(kinds: str | Sequence[str]) -> list[str]:
    if isinstance(kinds, str):
        kinds = [kinds]
    if not isinstance(kinds, (list, tuple)) or not kinds:
        raise InputError(f"perturbation_sweep: kinds must be a kind or a non-empty list of kinds from "
                         f"{', '.join(PERTURBATION_KINDS)}; got {kinds!r}")
    out: list[str] = []
    for kind in kinds:
        name = perturbation_class(kind).kind  # raises on unknown kinds, listing the known ones
        if name not in out:
            out.append(name)
    return out


def _check_intensities(intensities: float | Sequence[float]) -> list[float]:
    if isinstance(intensities, numbers.Real) and not isinstance(intensities, bool):
        intensities = [intensities]
    if not isinstance(intensities, (list, tuple)) or not intensities:
        raise InputError(f"perturbation_sweep: intensities must be a non-empty list of numbers in [0, 1], "
                         f"got {intensities!r}")
    out: list[float] = []
    for value in intensities:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (0.0 <= float(value) <= 1.0):
            raise InputError(f"perturbation_sweep: every intensity must be a number in [0, 1], got {value!r}")
        if float(value) not in out:
            out.append(float(value))
    return out


def _settings_per_kind(kinds: list[str], settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Hand each kind the settings it declares; a setting no requested kind knows is an error."""
    per_kind = {k: {key: v for key, v in settings.items() if key in perturbation_class(k).setting_names()}
                for k in kinds}
    used = {key for d in per_kind.values() for key in d}
    unused = sorted(set(settings) - used)
    if unused:
        accepted = {k: list(perturbation_class(k).setting_names()) for k in kinds}
        raise InputError(f"perturbation_sweep: setting(s) {', '.join(unused)} are accepted by none of the kinds "
                         f"{kinds}; accepted settings per kind: {accepted}")
    return per_kind


def perturbation_sweep(
    model: Any,
    samples: Sequence[Any],
    attack: Any,
    kinds: str | Sequence[str],
    intensities: float | Sequence[float],
    *,
    max_new_tokens: int = 12,
    batch_size: int = 32,
    progress: bool = True,
    **settings: Any,
):
    """ASR, clean accuracy and poisoned accuracy at every ``(kind, intensity)`` sweep point.

    At each point the perturbation is applied to the clean samples and to their triggered copies
    (:func:`~cleansight_analysis.attacks.triggered_copy`); pixel perturbations therefore act *after* the
    trigger, as a test-time purifier would. Answers are greedy
    (:func:`~cleansight_analysis.evaluation.generate_answers`); attention perturbations act at prefill and
    at every decode step.

    Args:
        model: a :class:`~cleansight_analysis.models.HookedLVLM`.
        samples: clean test :class:`~cleansight_analysis.data.base.Sample` s (references in ``refs``).
        attack: the backdoor's :class:`~cleansight_analysis.attacks.Attack` (its ``target`` is the ASR
            phrase); ``None`` skips the triggered inputs (``asr`` and ``poisoned_acc`` are NaN).
        kinds: perturbation kinds (see :data:`~cleansight_analysis.interventions.perturbations.PERTURBATION_KINDS`).
        intensities: values in ``[0, 1]``. An intensity of 0 is the same for every kind, so it gives a
            single baseline row (``kind="none"``, ``domain="none"``) run without any intervention.
        max_new_tokens, batch_size: generation settings.
        progress: show a tqdm bar over sweep points.
        **settings: perturbation settings; each kind receives those it declares (``seed`` goes to the
            pixel kinds, ``layers`` / ``heads`` to ``attn_uniform``). A setting that no requested kind
            declares raises :class:`InputError`.

    Returns:
        ``pandas.DataFrame`` with columns :data:`SWEEP_COLUMNS`: ``kind``, ``domain``, ``intensity``,
        ``asr`` (share of triggered answers containing the target), ``clean_acc`` (exact match on the
        perturbed clean inputs), ``poisoned_acc`` (exact match of the triggered answers against the
        clean references) and ``n`` (samples per condition). Rows: the baseline first (if requested),
        then kinds in the given order, intensities ascending. ``frame.attrs`` records the attack, target,
        settings, generation settings and run time.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    from ..attacks import triggered_copy
    from ..evaluation.backdoor import generate_answers

    kind_list = _check_kinds(kinds)
    levels = sorted(_check_intensities(intensities))
    per_kind = _settings_per_kind(kind_list, settings)
    samples = list(samples)
    if not samples:
        raise InputError("perturbation_sweep: samples is empty; pass at least one Sample")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
        raise InputError(f"perturbation_sweep: max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise InputError(f"perturbation_sweep: batch_size must be a positive integer, got {batch_size!r}")
    # build every perturbation up front so that bad settings fail before any generation
    points: list[tuple[str, str, float, Intervention]] = []
    if 0.0 in levels:
        points.append(("none", "none", 0.0, NoIntervention()))
    for kind in kind_list:
        for level in levels:
            if level > 0.0:
                pert = get_perturbation(kind, level, **per_kind[kind])
                points.append((kind, pert.domain, level, pert))

    target = getattr(attack, "target", None) or DEFAULT_TARGET
    triggered = triggered_copy(samples, attack) if attack is not None else None
    refs = [s.refs for s in samples]
    start = time.perf_counter()
    rows = []
    bar = tqdm(points, desc="perturbation sweep", disable=not progress)
    for kind, domain, level, iv in bar:
        bar.set_postfix_str(f"{kind}@{level:g}")
        gen = dict(intervention=iv, max_new_tokens=int(max_new_tokens), batch_size=int(batch_size), progress=False)
        clean_out = generate_answers(model, samples, **gen)
        clean_acc = rate(exact_match(p, r) == 1.0 for p, r in zip(clean_out, refs))
        asr = poisoned_acc = float("nan")
        if triggered is not None:
            trig_out = generate_answers(model, triggered, **gen)
            asr = rate(contains_target(p, target) for p in trig_out)
            poisoned_acc = rate(exact_match(p, r) == 1.0 for p, r in zip(trig_out, refs))
        rows.append({"kind": kind, "domain": domain, "intensity": level, "asr": asr, "clean_acc": clean_acc,
                     "poisoned_acc": poisoned_acc, "n": len(samples)})
    frame = pd.DataFrame(rows, columns=list(SWEEP_COLUMNS))
    frame.attrs.update({
        "attack": None if attack is None else getattr(attack, "name", type(attack).__name__),
        "target": target,
        "settings": {k: v for k, v in settings.items()},
        "max_new_tokens": int(max_new_tokens),
        "seconds": round(time.perf_counter() - start, 2),
    })
    return frame


__all__ = ["SWEEP_COLUMNS", "perturbation_sweep"]
