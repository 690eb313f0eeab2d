"""Intervention sweeps: ASR and utility of a (backdoored) model under perturbations (Fig. 1) and per-head
edits (Fig. 9). The interventions themselves live in :mod:`cleansight_analysis.interventions`; these
sweeps generate answers and score them with the one scorer (:mod:`~cleansight_analysis.evaluation.scoring`),
so their ``clean_acc`` is the same quantity as Table 1's clean utility (exact match on short answers, the
VQA score with 10 references, CIDEr-D for captions).

:func:`perturbation_sweep` is the measurement behind Fig. 1: pixel perturbations (``st``, ``blur``, ...)
barely lower the attack success rate, while flattening the image attention of text queries
(``attn_uniform``) removes it. One call gives a tidy table, one row per sweep point::

    from cleansight_analysis.evaluation.intervention_sweeps import perturbation_sweep

    frame = perturbation_sweep(model, test_samples, get_attack("badnet"), ["st", "attn_uniform"],
                               [0, 0.25, 0.5, 0.75, 1.0], seed=0)
    sns.lineplot(frame, x="intensity", y="asr", hue="kind")
"""

from __future__ import annotations

import numbers
import time
from typing import TYPE_CHECKING, Any, Sequence

import torch
from tqdm.auto import tqdm

from ..attacks import triggered_copy
from ..data.base import check_samples
from ..errors import InputError
from ..inputs.batch import sample_batches
from ..models.intervention import Intervention, NoIntervention
from ..interventions.heads import (ABLATION_METHODS, Head, HeadAblation, HeadImageFlatten, all_heads, check_heads,
                                   head_means)
from ..interventions.perturbations import PERTURBATION_KINDS, get_perturbation, perturbation_class
from .backdoor import generate_answers
from .scoring import attack_success_rate, mean_utility, target_of

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from ..data.base import Sample

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
    (:func:`~cleansight_analysis.evaluation.backdoor.generate_answers`); attention perturbations act at prefill and
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
        ``asr`` (share of triggered answers containing the target), ``clean_acc`` (utility of the answers
        to the perturbed clean inputs, :func:`~cleansight_analysis.evaluation.scoring.mean_utility`),
        ``poisoned_acc`` (utility of the triggered answers against the clean references) and ``n``
        (samples per condition). Rows: the baseline first (if requested), then kinds in the given order,
        intensities ascending. ``frame.attrs`` records the attack, target,
        settings, generation settings and run time.
    """
    import pandas as pd

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

    target = target_of(attack)
    triggered = triggered_copy(samples, attack) if attack is not None else None
    start = time.perf_counter()
    rows = []
    bar = tqdm(points, desc="perturbation sweep", disable=not progress)
    for kind, domain, level, iv in bar:
        bar.set_postfix_str(f"{kind}@{level:g}")
        gen = dict(intervention=iv, max_new_tokens=int(max_new_tokens), batch_size=int(batch_size), progress=False)
        clean_out = generate_answers(model, samples, **gen)
        clean_acc = mean_utility(clean_out, samples)
        asr = poisoned_acc = float("nan")
        if triggered is not None:
            trig_out = generate_answers(model, triggered, **gen)
            asr = attack_success_rate(trig_out, target)
            poisoned_acc = mean_utility(trig_out, samples)
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


#: Kinds of :func:`head_sweep`.
SWEEP_KINDS = ("ablate", "flatten")


# --------------------------------------------------------------------------------------------
# Head sweep (Fig. 9)
# --------------------------------------------------------------------------------------------


def _sweep_intervention(kind: str, head: Head, method: str, means: torch.Tensor | None, eta: float) -> Intervention:
    if kind == "ablate":
        return HeadAblation([head], method=method, means=means if method == "mean" else None)
    return HeadImageFlatten([head], eta=eta)


def head_sweep(model: Any, samples: Sequence["Sample"], attack: Any, *, kind: str = "ablate",
               method: str = "zero", layers: int | Sequence[int] | None = None,
               heads: Sequence[Head] | None = None, means: torch.Tensor | None = None, eta: float = 1.0,
               target: str | None = None, max_new_tokens: int = 12, batch_size: int = 32,
               progress: bool = True) -> "pd.DataFrame":
    """ASR and clean accuracy with one head ablated (or flattened) at a time.

    For each head, greedy answers are generated for the clean samples (clean accuracy: their utility
    against ``sample.refs``, :func:`~cleansight_analysis.evaluation.scoring.mean_utility`, the same
    quantity as Table 1's clean utility) and for their triggered copies (ASR: the output contains the
    attack's target phrase). Batches are prepared once and reused for every head.

    Args:
        model: a :class:`HookedLVLM`.
        samples: clean test samples; triggered copies come from ``triggered_copy(samples, attack)``.
        attack: the :class:`~cleansight_analysis.attacks.Attack`.
        kind: ``"ablate"`` (:class:`HeadAblation`) or ``"flatten"`` (:class:`HeadImageFlatten`).
        method: ablation method ``"zero"`` or ``"mean"`` (ignored for ``"flatten"``).
        layers: sweep every head of these layers (default all); ignored when ``heads`` is given.
        heads: an explicit list of ``(layer, head)`` pairs to sweep.
        means: ``[L, H, d_head]`` for ``method="mean"``; default :func:`head_means` over ``samples``.
        eta: flattening strength for ``kind="flatten"``.
        target: target phrase for ASR (default ``attack.target``).
        max_new_tokens, batch_size: decoding length and samples per batch.
        progress: show a progress bar over heads.

    Returns:
        DataFrame with one baseline row (``layer = head = -1``, ``kind = "baseline"``,
        ``method = "none"``) followed by one row per head, columns ``layer, head, kind, method,
        asr, clean_acc, asr_drop, clean_drop, n``. ``asr_drop = baseline asr - asr`` and
        ``clean_drop = baseline clean_acc - clean_acc`` (positive = the edit lowered it);
        ``n`` is the number of samples per condition.
    """
    import pandas as pd

    samples = check_samples(samples, "head_sweep")
    if kind not in SWEEP_KINDS:
        raise InputError(f"head_sweep: kind must be one of {SWEEP_KINDS}, got {kind!r}")
    if kind == "ablate" and method not in ABLATION_METHODS:
        raise InputError(f"head_sweep: method must be one of {ABLATION_METHODS}, got {method!r}")
    if max_new_tokens < 1:
        raise InputError(f"head_sweep: max_new_tokens must be at least 1, got {max_new_tokens}")
    sweep = check_heads(model, heads, owner="head_sweep heads") if heads is not None else all_heads(model, layers)
    if kind == "ablate" and method == "mean" and means is None:
        means = head_means(model, samples, layers=sorted({l for l, _ in sweep}), batch_size=batch_size)
    # fail fast on a bad eta or bad means, before any generation
    first = _sweep_intervention(kind, sweep[0], method, means, eta)
    if kind == "ablate":
        first.hooks(model, None)
    target = target_of(attack, target)
    trig = triggered_copy(samples, attack)
    clean_batches = [b for _, b in sample_batches(model, samples, batch_size, "left")]
    trig_batches = [b for _, b in sample_batches(model, trig, batch_size, "left")]

    def run(iv: Intervention | None) -> tuple[float, float]:
        answers_clean: list[str] = []
        answers_trig: list[str] = []
        for batch in clean_batches:
            hooks = iv.hooks(model, batch) if iv is not None else []
            answers_clean += model.generate(batch, max_new_tokens=max_new_tokens, hooks=hooks).texts
        for batch in trig_batches:
            hooks = iv.hooks(model, batch) if iv is not None else []
            answers_trig += model.generate(batch, max_new_tokens=max_new_tokens, hooks=hooks).texts
        asr = attack_success_rate(answers_trig, target)
        acc = mean_utility(answers_clean, samples)
        return asr, acc

    label = method if kind == "ablate" else f"eta={eta:g}"
    base_asr, base_acc = run(None)
    rows = [dict(layer=-1, head=-1, kind="baseline", method="none", asr=base_asr, clean_acc=base_acc,
                 asr_drop=0.0, clean_drop=0.0, n=len(samples))]
    for head in tqdm(sweep, desc=f"head_sweep ({kind})", disable=not progress, mininterval=2.0):
        asr, acc = run(_sweep_intervention(kind, head, method, means, eta))
        rows.append(dict(layer=head[0], head=head[1], kind=kind, method=label, asr=asr, clean_acc=acc,
                         asr_drop=base_asr - asr, clean_drop=base_acc - acc, n=len(samples)))
    return pd.DataFrame(rows)


__all__ = ["SWEEP_COLUMNS", "SWEEP_KINDS", "head_sweep", "perturbation_sweep"]
