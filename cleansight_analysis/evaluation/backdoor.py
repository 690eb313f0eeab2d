"""How strong is a backdoor? Clean accuracy, attack success rate and false-trigger rate."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from ..data.base import Sample
from .metrics import DEFAULT_TARGET, contains_target, exact_match, rate


@dataclass
class BackdoorReport:
    """``clean_acc``: exact match on clean inputs; ``asr``: triggered outputs containing the target;
    ``false_trigger_rate``: clean outputs containing the target; ``n``: samples per condition;
    ``by_question_type``: clean exact match per ``meta["question_type"]`` (empty when samples carry none)."""

    clean_acc: float
    asr: float
    false_trigger_rate: float
    n: int
    seconds: float
    by_question_type: dict[str, float] = field(default_factory=dict)

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
    from tqdm.auto import tqdm

    from ..interventions.base import NoIntervention, as_intervention

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
    from ..attacks import triggered_copy

    start = time.perf_counter()
    target = target or getattr(attack, "target", None) or DEFAULT_TARGET
    clean = generate_answers(model, samples, batch_size=batch_size, max_new_tokens=max_new_tokens,
                             progress=progress, desc="clean")
    hits = [exact_match(p, s.refs) == 1.0 for p, s in zip(clean, samples)]
    acc = rate(hits)
    per_type: dict[str, list[bool]] = {}
    for hit, s in zip(hits, samples):
        if "question_type" in s.meta:
            per_type.setdefault(s.meta["question_type"], []).append(hit)
    by_type = {k: round(rate(v), 4) for k, v in sorted(per_type.items())}
    ftr = rate(contains_target(p, target) for p in clean)
    asr = float("nan")
    if attack is not None:
        trig = triggered_copy(list(samples), attack)
        outs = generate_answers(model, trig, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                progress=progress, desc="triggered")
        asr = rate(contains_target(p, target) for p in outs)
    return BackdoorReport(acc, asr, ftr, len(samples), round(time.perf_counter() - start, 1), by_type)
