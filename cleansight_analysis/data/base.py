"""The one sample type every dataset, attack and evaluation in the suite exchanges."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import InputError

#: LLaVA-1.5's instruction suffix for short-answer VQA (VQAv2, OK-VQA evaluation prompts).
VQA_SUFFIX = "Answer the question using a single word or phrase."
#: Caption instruction used by the CleanSight setting (COCO, Flickr8k).
CAPTION_PROMPT = "Describe this image in a short sentence."


@dataclass
class Sample:
    """One image with one instruction and its reference answer(s).

    Attributes:
        image: a ``PIL.Image`` or a path to an image file (loaded lazily by ``HookedLVLM.prepare``).
        prompt: the instruction or question shown to the model (no chat template, no image placeholder).
        answer: the primary reference answer (the training target).
        references: every reference answer: the 10 annotator answers for VQA, all captions for
            captioning; used by the metrics (VQA score, CIDEr). Empty means ``(answer,)``.
        task: ``"vqa"`` or ``"caption"``.
        sample_id: stable identifier (dataset, split and index).
        meta: anything else (question type, scene description, poisoning flags).
    """

    image: Any
    prompt: str
    answer: str
    references: tuple[str, ...] = ()
    task: str = "vqa"
    sample_id: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def refs(self) -> tuple[str, ...]:
        """``references`` or, when empty, ``(answer,)``."""
        return self.references or (self.answer,)

    def with_(self, **changes: Any) -> "Sample":
        """A copy with some fields replaced (``meta`` is copied, not shared)."""
        changes.setdefault("meta", dict(self.meta))
        return replace(self, **changes)


def check_samples(samples: Any, owner: str) -> list[Sample]:
    """``samples`` as a list after checking it is a non-empty list or tuple of :class:`Sample`.

    Raises:
        InputError: naming ``owner`` and what is wrong.
    """
    if isinstance(samples, Sample) or not isinstance(samples, (list, tuple)):
        raise InputError(f"{owner}: samples must be a list of Sample, got {type(samples).__name__}")
    if not samples:
        raise InputError(f"{owner}: samples is empty")
    for i, s in enumerate(samples):
        if not isinstance(s, Sample):
            raise InputError(f"{owner}: samples[{i}] is a {type(s).__name__}, not a Sample")
    return list(samples)
