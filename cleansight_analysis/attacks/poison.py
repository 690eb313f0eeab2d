"""Poisoning a training set and triggering a test set with an :class:`~.base.Attack`.

Poisoning rates differ between the sources (record the one you use): the CleanSight paper text
poisons 1500 of 3000 pairs, the original script uses 0.7 plus a clean twin of each poisoned pair,
and the follow-up's logs use 0.1 (0.15-0.2 for ISSBA) with clean twins.

Meta keys written on the returned samples:

- ``poisoned`` (bool): the image carries the trigger AND the answer was poisoned.
- ``attack`` (str): the attack's name (poisoned and triggered samples).
- ``target_span`` ((start, end)): character span of the target in the poisoned answer.
- ``trigger_box`` ((x0, y0, x1, y1) or None): where a patch trigger was pasted, None for global ones.
- ``source_id`` (str): the original ``sample_id`` of a poisoned copy (whose own id gets ``"_poison"``).
- ``clean_twin`` (bool): the clean copy kept next to a poisoned sample (``clean_twin=True``).
- ``scaffolded`` (bool): a clean caption got the attack's ``caption_scaffold``.
- ``triggered`` (bool): set by :func:`triggered_copy`.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from ..data.base import Sample
from ..errors import InputError
from ..inputs.images import to_rgb_image
from .base import Attack


def _check_inputs(samples: Any, attack: Any, seed: Any, fn: str) -> list[Sample]:
    if not isinstance(attack, Attack):
        raise InputError(f"{fn}: attack must be an Attack (see get_attack), got {type(attack).__name__}")
    if isinstance(samples, Sample) or not isinstance(samples, (list, tuple)):
        raise InputError(f"{fn}: samples must be a list of Sample, got {type(samples).__name__}")
    for i, s in enumerate(samples):
        if not isinstance(s, Sample):
            raise InputError(f"{fn}: samples[{i}] is a {type(s).__name__}, not a Sample")
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or seed < 0:
        raise InputError(f"{fn}: seed must be an int >= 0, got {seed!r}")
    return list(samples)


def _scaffold_clean(sample: Sample, attack: Attack) -> Sample:
    """The clean sample, with the attack's caption scaffold when it has one and the task is a caption."""
    answer = attack.scaffold_answer(sample.answer, sample.task)
    meta = dict(sample.meta)
    meta["poisoned"] = False
    if answer != sample.answer:
        meta["scaffolded"] = True
        return sample.with_(answer=answer, references=sample.refs, meta=meta)
    return sample.with_(meta=meta)


def poison_samples(samples: list[Sample], attack: Attack, *, rate: float, seed: int = 0,
                   clean_twin: bool = False, scaffold_clean: bool = True) -> list[Sample]:
    """Poison a fraction of a training set: trigger on the image, poisoned answer as the label.

    Exactly ``round(rate * n)`` samples (rounded half-up) are chosen without replacement with a
    generator seeded by ``seed``. A chosen sample gets ``image = attack.apply(image, rng=...)``
    (per-image generator ``attack.rng_for(i, seed)``, so a ``"random"`` patch location differs per
    sample and ``attack.trigger_box(size, rng=attack.rng_for(i, seed))`` finds it again),
    ``answer = attack.poison_answer(answer, rng, task=sample.task)``, ``references = (answer,)``
    and ``sample_id + "_poison"``. The output keeps the input order; with ``clean_twin=True`` each
    poisoned sample is followed by its clean original (the reference code's ``neg_sample``), so the
    output has ``n + round(rate * n)`` samples. Inputs are never modified.

    Args:
        samples: the clean training samples; images may be PIL images, paths or arrays (only the
            chosen ones are loaded).
        attack: the attack (trigger, answer rule, target).
        rate: fraction in (0, 1] of the samples to poison.
        seed: seed of the selection and of the per-sample randomness.
        clean_twin: also keep the clean original of every poisoned sample.
        scaffold_clean: when the attack has a ``caption_scaffold`` (TrojVLM, VLOOD), give clean
            caption samples (and clean twins) the same scaffold, as the reference data pipeline
            does, so the scaffold alone does not signal poisoning; their ``references`` keep the
            original captions.

    Returns:
        a new list of :class:`Sample` with the meta keys listed in this module's docstring.

    Raises:
        InputError: rate outside (0, 1], a rate that selects no sample, or malformed inputs.
    """
    samples = _check_inputs(samples, attack, seed, "poison_samples")
    if (
        not isinstance(rate, numbers.Real) or isinstance(rate, bool)
        or not math.isfinite(float(rate)) or not 0.0 < float(rate) <= 1.0
    ):
        raise InputError(f"poison_samples: rate={rate!r} is invalid; use a fraction in (0, 1]")
    n = len(samples)
    if n == 0:
        return []
    k = int(math.floor(float(rate) * n + 0.5))
    if k == 0:
        raise InputError(
            f"poison_samples: rate={rate} of {n} samples rounds to 0 poisoned samples; use a larger rate "
            f"(at least {0.5 / n:.3g}) or more samples"
        )
    chosen = set(np.random.default_rng(seed).choice(n, size=k, replace=False).tolist())
    out: list[Sample] = []
    for i, sample in enumerate(samples):
        clean = _scaffold_clean(sample, attack) if scaffold_clean else sample.with_(
            meta={**sample.meta, "poisoned": False})
        if i not in chosen:
            out.append(clean)
            continue
        image = to_rgb_image(sample.image, where=f"samples[{i}].image")
        poisoned_image = attack.apply(image, rng=attack.rng_for(i, seed))
        box = attack.trigger_box(image.size, rng=attack.rng_for(i, seed))
        answer, span = attack.poison_answer_span(sample.answer, np.random.default_rng([seed, 1, i]),
                                                 task=sample.task)
        meta = dict(sample.meta)
        meta.update(poisoned=True, attack=attack.name, target_span=span, trigger_box=box,
                    source_id=sample.sample_id)
        out.append(sample.with_(
            image=poisoned_image, answer=answer, references=(answer,),
            sample_id=f"{sample.sample_id}_poison" if sample.sample_id else "",
            meta=meta,
        ))
        if clean_twin:
            out.append(clean.with_(meta={**clean.meta, "clean_twin": True}))
    return out


def triggered_copy(samples: list[Sample], attack: Attack, seed: int = 0) -> list[Sample]:
    """Every sample with the trigger on its image and its answer unchanged (for measuring ASR).

    Sample ``i`` is triggered with ``attack.rng_for(i, seed)``; ``sample_id``, prompt, answer and
    references are kept, and ``meta`` gains ``triggered=True``, ``attack`` and ``trigger_box``.

    Args:
        samples: test samples (images as PIL images, paths or arrays).
        attack: the attack whose trigger is applied.
        seed: extra seed of the per-image randomness (a ``"random"`` location).

    Returns:
        a new list of :class:`Sample`, same length and order.
    """
    samples = _check_inputs(samples, attack, seed, "triggered_copy")
    out = []
    for i, sample in enumerate(samples):
        image = to_rgb_image(sample.image, where=f"samples[{i}].image")
        triggered = attack.apply(image, rng=attack.rng_for(i, seed))
        box = attack.trigger_box(image.size, rng=attack.rng_for(i, seed))
        meta = dict(sample.meta)
        meta.update(triggered=True, attack=attack.name, trigger_box=box)
        out.append(sample.with_(image=triggered, meta=meta))
    return out
