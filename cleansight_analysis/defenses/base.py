"""The one interface every test-time defense shares (CleanSight, input purifiers, detectors).

A defense is calibrated once on clean samples (``fit``), then used per prepared batch::

    defense.fit(model, clean_samples)                       # no-op for purifiers
    batch = defense.prepare(model, images, prompts)         # purifiers transform images here
    out = defense.generate(model, batch, max_new_tokens=12) # DefenseOutput

Detectors also expose ``score(model, batch) -> [B]`` (higher = more likely triggered) and
``detect(model, batch) -> [B] bool``. The evaluation harness only uses this interface, so every
defense reports the same metrics (ASR, clean / poisoned utility, TPR / FPR / AUROC, latency).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..errors import InputError
from ..registry import Registry

#: What a defense does: ``detector`` flags inputs (and may prune or purify flagged ones),
#: ``purifier`` transforms every input, ``none`` is the undefended model.
DEFENSE_KINDS = ("detector", "purifier", "none")


@dataclass
class DefenseOutput:
    """What :meth:`Defense.generate` returns for one batch of ``B`` samples.

    Attributes:
        texts: the ``B`` decoded answers.
        flags: ``[B]`` bool, True for inputs judged triggered (None for purifiers / no defense).
        scores: ``[B]`` float detection scores, higher = more suspicious (None where not applicable).
        pruned: per sample, the absolute key positions of the image tokens masked (empty tensor when
            none; None for defenses that never prune).
        info: anything else (e.g. per-sample thresholds, timings).
    """

    texts: list[str]
    flags: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    pruned: list[torch.Tensor] | None = None
    info: dict[str, Any] = field(default_factory=dict)


class Defense:
    """Base class: the undefended model (``name = "none"``). Subclasses override what they change."""

    name: str = "none"
    kind: str = "none"

    def fit(self, model: Any, clean_samples: Sequence[Any]) -> "Defense":
        """Calibrate on clean samples (default: nothing to calibrate). Returns ``self``."""
        return self

    def prepare(self, model: Any, images: Sequence[Any], prompts: Sequence[str] | str) -> Any:
        """A :class:`~cleansight_analysis.inputs.Batch` for generation (left padded); purifiers
        transform the images first."""
        return model.prepare(list(images), prompts)

    def score(self, model: Any, batch: Any) -> torch.Tensor:
        """``[B]`` detection scores (higher = more suspicious). Not every defense detects."""
        raise NotImplementedError(f"defense {self.name!r} does not score inputs")

    def detect(self, model: Any, batch: Any) -> torch.Tensor:
        """``[B]`` bool flags. Not every defense detects."""
        raise NotImplementedError(f"defense {self.name!r} does not detect inputs")

    def generate(self, model: Any, batch: Any, max_new_tokens: int = 12) -> DefenseOutput:
        """Defended greedy answers for ``batch``; the base class decodes without any change."""
        return DefenseOutput(texts=model.generate(batch, max_new_tokens=max_new_tokens).texts)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.to_dict()})"


class NoDefense(Defense):
    """The undefended model (the reference row of every table)."""


#: name -> defense factory (a class, or a ``functools.partial`` fixing some settings). Filled by
#: :mod:`.registry`, which the package imports; read it through :func:`get_defense`.
DEFENSES: Registry[Any] = Registry("defense")


def get_defense(name: str, **settings: Any) -> Defense:
    """Build defense ``name`` with ``settings`` (each class validates its own settings).

    Lives next to the interface so that a defense wrapping another one by name (``AlwaysFlag``) can
    build it without importing the registry module that imports it.
    """
    factory = DEFENSES.get(name)
    if DEFENSES.key(name) == "none" and settings:
        raise InputError(f"defense 'none' takes no settings, got {sorted(settings)}")
    return factory(**settings)
