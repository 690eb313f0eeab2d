"""How strong is a backdoor? Clean accuracy, attack success rate and false-trigger rate."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from tqdm.auto import tqdm

from ..attacks import triggered_copy
from ..data.base import Sample
from ..models.intervention import NoIntervention, as_intervention
from .metrics import rate
from .scoring import attack_success_rate, is_attack_success, mean, target_of, utilities


@dataclass
class BackdoorReport:
    """``clean_acc``: mean utility of the clean answers (:func:`~cleansight_analysis.evaluation.scoring.utilities`:
    exact match on short answers, VQA score with 10 references, CIDEr-D for captions), the same quantity as
    Table 1's clean utility; ``asr``: triggered outputs containing the target; ``false_trigger_rate``: clean
    outputs containing the target; ``n``: samples per condition; ``by_question_type``: clean utility per
    ``meta["question_type"]`` (empty when samples carry none); ``asr_by_question_type``: the ASR of the
    triggered copies per question type (empty without an attack or question types), which shows whether a
    backdoor fails everywhere or on one kind of question only."""

    clean_acc: float
    asr: float
    false_trigger_rate: float
    n: int
    seconds: float
    by_question_type: dict[str, float] = field(default_factory=dict)
    asr_by_question_type: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def generate_answers(model: Any, samples: Sequence[Sample], *, batch_size: int = 64, max_new_tokens: int = 16,
                     progress: bool = True, desc: str = "generate", hooks: Sequence = (),
                     intervention: Any = None) -> list[str]:
    """Greedy answers of a :class:`HookedLVLM` for ``samples`` (batched, left-padded).

    Args:
        hooks: fixed ``(name, fn)`` hooks active at prefill and every decode step.
        intervention: an :class:`~cleansight_analysis.interventions.Intervention` (or a
            ``fn(model, batch) -> hooks`` factory): its ``apply_image`` transforms each image and its
            ``hooks(model, batch)`` are added for every batch.
    """
    iv = as_intervention(intervention)
    out: list[str] = []
    starts = range(0, len(samples), batch_size)
    for s in tqdm(starts, desc=desc, disable=not progress, mininterval=2.0):
        chunk = samples[s:s + batch_size]
        images = [x.image if isinstance(iv, NoIntervention) else iv.transform(x.image) for x in chunk]
        batch = model.prepare(images, [x.prompt for x in chunk])
        out += model.generate(batch, max_new_tokens=max_new_tokens,
                              hooks=[*hooks, *iv.hooks(model, batch)]).texts
    return out


def evaluate_backdoor(model: Any, samples: Sequence[Sample], attack: Any | None, *, target: str | None = None,
                      batch_size: int = 64, max_new_tokens: int = 16, progress: bool = True) -> BackdoorReport:
    """Clean accuracy and false triggers on ``samples``; ASR on their triggered copies (if ``attack``)."""
    start = time.perf_counter()
    target = target_of(attack, target)
    clean = generate_answers(model, samples, batch_size=batch_size, max_new_tokens=max_new_tokens,
                             progress=progress, desc="clean")
    scores = utilities(clean, list(samples))
    acc = mean(scores)
    ftr = attack_success_rate(clean, target)
    asr, asr_by_type = float("nan"), {}
    if attack is not None:
        trig = triggered_copy(list(samples), attack)
        outs = generate_answers(model, trig, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                progress=progress, desc="triggered")
        success = [is_attack_success(t, target) for t in outs]  # one test per answer, overall and per type
        asr = rate(success)
        asr_by_type = _by_question_type([float(hit) for hit in success], samples)
    return BackdoorReport(acc, asr, ftr, len(samples), round(time.perf_counter() - start, 1),
                          _by_question_type(scores, samples), asr_by_type)


def _by_question_type(values: Sequence[float], samples: Sequence[Sample]) -> dict[str, float]:
    """Mean of ``values`` per ``meta["question_type"]`` of the matching samples (rounded to 4 places; samples
    without a type are left out)."""
    groups: dict[str, list[float]] = {}
    for value, s in zip(values, samples):
        if "question_type" in s.meta:
            groups.setdefault(s.meta["question_type"], []).append(value)
    return {k: round(mean(v), 4) for k, v in sorted(groups.items())}
