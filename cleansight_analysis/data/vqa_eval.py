"""VQA answer normalisation and the VQA accuracy ("VQA score") used for VQAv2 and OK-VQA.

The rules follow the official VQA evaluation (the one behind the VQAv2 / EvalAI leaderboards and
LLaVA-1.5's reported numbers), re-implemented here:

1. newlines and tabs become spaces, surrounding whitespace is dropped;
2. punctuation ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is deleted when it touches a space
   somewhere in the answer (or the answer contains a digit-comma-digit group such as ``1,000``) and
   is replaced by a space otherwise (so ``t-shirt`` becomes ``t shirt``); apostrophes are kept;
3. a period is deleted unless a digit follows it (``3.5`` survives, ``yes.`` loses its period);
4. the answer is lower-cased and split on whitespace; number words ``none``/``zero`` .. ``ten``
   become digits, the articles ``a``/``an``/``the`` are dropped, and apostrophe-less contractions
   are restored (``dont`` -> ``don't``, ``youre`` -> ``you're``, ``hed've`` -> ``he'd've``).
   Words that already carry their apostrophe (``it's``) are left alone, and so are ordinary words
   that only look like contractions without one (``its``, ``well``, ``ill``, ``shed``, ``wed``).

Two deliberate differences from the official script: both prediction and references are always
normalised (the script only does so when the annotators disagree; the released VQAv2 annotations
are already normalised, so this changes nothing for them), and the official table's ``somebody'd``
entry, which is written backwards there, is simply absent here (it never fires in practice).
Like the official table (whose ``I'm``/``I've``/``I'd've`` keys are capitalised and therefore never
match lower-cased words), ``im``/``ive`` are not expanded.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from ..errors import InputError

__all__ = ["vqa_normalize", "vqa_score"]

_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}

_ARTICLES = frozenset({"a", "an", "the"})

_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
                "@", "`", ",", "?", "!")

# Contractions in their written form.  The lookup table maps every spelling that lacks exactly one
# of the apostrophes to the written form: "dont" -> "don't", and for the double contractions
# "hed've" / "he'dve" -> "he'd've" (the fully stripped "hedve" is not recognised, as officially).
_CONTRACTIONS = (
    "ain't", "aren't", "can't", "could've", "couldn't", "couldn't've", "didn't", "doesn't",
    "don't", "hadn't", "hadn't've", "hasn't", "haven't", "he'd", "he'd've", "he's", "how'd",
    "how'll", "how's", "isn't", "it'd", "it'd've", "it'll", "ma'am", "mightn't", "mightn't've",
    "might've", "mustn't", "must've", "needn't", "not've", "o'clock", "oughtn't", "'ow's'at",
    "shan't", "she'd've", "should've", "shouldn't", "shouldn't've", "somebody'd've",
    "somebody'll", "somebody's", "someone'd", "someone'd've", "someone'll", "someone's",
    "something'd", "something'd've", "something'll", "that's", "there'd", "there'd've",
    "there're", "there's", "they'd", "they'd've", "they'll", "they're", "they've", "'twas",
    "wasn't", "we'd've", "we've", "weren't", "what'll", "what're", "what's", "what've", "when's",
    "where'd", "where's", "where've", "who'd", "who'd've", "who'll", "who's", "who've", "why'll",
    "why're", "why's", "won't", "would've", "wouldn't", "wouldn't've", "y'all", "y'all'll",
    "y'all'd've", "you'd", "you'd've", "you'll", "you're", "you've",
)


def _build_contraction_table() -> dict[str, str]:
    table: dict[str, str] = {}
    for written in _CONTRACTIONS:
        positions = [i for i, ch in enumerate(written) if ch == "'"]
        for pos in positions:
            table[written[:pos] + written[pos + 1:]] = written
    return table


_CONTRACTION_TABLE = _build_contraction_table()

_PERIOD = re.compile(r"\.(?!\d)")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")


def _strip_punctuation(text: str) -> str:
    """Steps 2 and 3 of the module docstring (decisions are made on the unmodified text)."""
    has_grouped_number = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        if mark not in out:
            continue
        touches_space = (mark + " ") in text or (" " + mark) in text
        out = out.replace(mark, "" if (touches_space or has_grouped_number) else " ")
    return _PERIOD.sub("", out)


def vqa_normalize(answer: str) -> str:
    """Bring a free-form VQA answer to the canonical form used for exact-match scoring.

    Lower-cases, removes or spaces out punctuation, drops articles, turns number words up to ten
    into digits and re-inserts missing apostrophes in known contractions; see the module docstring
    for the exact rules.  Examples: ``"Two dogs!"`` -> ``"2 dogs"``, ``"a Cat"`` -> ``"cat"``,
    ``"it's"`` -> ``"it's"``, ``"dont"`` -> ``"don't"``, ``"Yes."`` -> ``"yes"``.

    Raises:
        InputError: ``answer`` is not a string.
    """
    if not isinstance(answer, str):
        raise InputError(f"vqa_normalize expects a string answer, got {type(answer).__name__}: {answer!r}")
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    text = _strip_punctuation(text)
    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word in _ARTICLES:
            continue
        words.append(_CONTRACTION_TABLE.get(word, word))
    return " ".join(words)


def vqa_score(prediction: str, references: Iterable[str], *, normalize: bool = True) -> float:
    """VQA accuracy of one predicted answer against the annotators' answers, in ``[0, 1]``.

    The official rule: for each of the N annotators, leave that annotator out and score
    ``min(#remaining annotators who gave exactly the prediction / 3, 1)``; the result is the mean
    of those N scores.  With the usual 10 answers this gives 0.3 for one match, 0.6 for two, 0.9
    for three and 1.0 from four matches on.  With a single reference the score is 1.0 on a match
    and 0.0 otherwise (there is nothing to leave out).

    Args:
        prediction: the model's answer.
        references: the annotator answers (``Sample.references``).
        normalize: apply :func:`vqa_normalize` to the prediction and every reference first.

    Raises:
        InputError: no references (e.g. a VQAv2 test-split sample), or a non-string entry.
    """
    refs = list(references) if not isinstance(references, str) else [references]
    if not refs:
        raise InputError(
            "vqa_score needs at least one reference answer, got none "
            "(test-split samples carry no annotations and cannot be scored)"
        )
    for ref in refs:
        if not isinstance(ref, str):
            raise InputError(f"vqa_score references must be strings, got {type(ref).__name__}: {ref!r}")
    if not isinstance(prediction, str):
        raise InputError(f"vqa_score expects a string prediction, got {type(prediction).__name__}: {prediction!r}")
    if normalize:
        prediction = vqa_normalize(prediction)
        refs = [vqa_normalize(r) for r in refs]
    else:
        prediction = prediction.strip()
        refs = [r.strip() for r in refs]
    hits = [r == prediction for r in refs]
    if len(refs) == 1:
        return 1.0 if hits[0] else 0.0
    total = sum(hits)
    per_subset = [min((total - int(h)) / 3.0, 1.0) for h in hits]
    return sum(per_subset) / len(per_subset)
