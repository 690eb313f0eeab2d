"""Caption metrics: CIDEr-D through ``pycocoevalcap``'s ``Cider`` scorer, without Java.

The COCO caption toolkit normally tokenises with the Stanford PTB tokenizer (a Java program). Here every
caption is tokenised in Python instead (:func:`caption_tokens`: lower-case, punctuation removed,
whitespace split, via :func:`~cleansight_analysis.evaluation.metrics.normalize_text`), then handed to
``pycocoevalcap.cider.cider.Cider``, the maintained reference implementation (CIDEr-D: n-grams 1..4,
TF-IDF weights from the references of the evaluated corpus, clipped counts, Gaussian length penalty
``sigma = 6``, times 10). Scores are on pycocoevalcap's scale (a good captioner scores ~1.0); papers
usually print 100 x this value ("CIDEr 103"). Tokenisation differs slightly from PTB (e.g. ``"don't"``
stays one token), so numbers are close to, not identical with, the Java pipeline.

The IDF weights depend on the whole corpus: score every caption of a split in one call. With a single
image every n-gram has IDF 0 and the score is 0 by construction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import InputError
from .metrics import normalize_text


@dataclass
class CiderResult:
    """``score``: corpus CIDEr-D (mean of ``per_sample``); ``per_sample``: ``[N]`` float64 per caption."""

    score: float
    per_sample: np.ndarray


def caption_tokens(text: str) -> str:
    """The tokenised caption as a space-joined string (lower-case, no punctuation)."""
    if not isinstance(text, str):
        raise InputError(f"captions must be strings, got {type(text).__name__}: {text!r}")
    return normalize_text(text)


def cider(predictions: Sequence[str], references: Sequence[Sequence[str]], *, sigma: float = 6.0) -> CiderResult:
    """CIDEr-D of ``N`` predicted captions against their reference captions.

    Args:
        predictions: ``N`` generated captions.
        references: ``N`` lists of reference captions (at least one per prediction).
        sigma: standard deviation of the length penalty (6 in the standard metric).

    Returns:
        :class:`CiderResult` with the corpus score and ``[N]`` per-caption scores.

    Raises:
        InputError: mismatched lengths, an empty corpus, a prediction without references, non-strings.
        ImportError: ``pycocoevalcap`` is not installed (``pip install pycocoevalcap``).
    """
    if isinstance(predictions, str) or isinstance(references, str):
        raise InputError("cider expects a list of predictions and a list of reference lists, not a string")
    predictions, references = list(predictions), list(references)
    if not predictions:
        raise InputError("cider: no predictions")
    if len(predictions) != len(references):
        raise InputError(f"cider: {len(predictions)} predictions but {len(references)} reference lists")
    gts, res = {}, {}
    for i, (pred, refs) in enumerate(zip(predictions, references)):
        if isinstance(refs, str) or not isinstance(refs, (list, tuple)) or len(refs) == 0:
            raise InputError(f"cider: references[{i}] must be a non-empty list of strings, got {refs!r}")
        gts[i] = [caption_tokens(r) for r in refs]
        res[i] = [caption_tokens(pred)]
    try:
        from pycocoevalcap.cider.cider import Cider
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("cider needs pycocoevalcap: pip install 'pycocoevalcap>=1.2'") from exc
    # n-grams 1..4: pycocoevalcap cooks references with n = 4 whatever n its scorer gets
    score, per = Cider(sigma=sigma).compute_score(gts, res)
    return CiderResult(float(score), np.asarray(per, dtype=np.float64))


__all__ = ["CiderResult", "caption_tokens", "cider"]
