"""The one interface every intervention shares: pixel perturbations, attention edits, head ablations.

An intervention may change the image (``apply_image``), act on the forward pass through hooks
(``hooks(model, batch)``, called once per prepared batch because key masks depend on each sample's
token groups), or both. :func:`cleansight_analysis.evaluation.generate_answers` and every sweep take
an intervention through this interface, so a new perturbation or ablation works everywhere at once.

The interface is part of the model core (it is "what to change about a forward pass": an image
transform and hooks), so that the attention analyses and the interventions (siblings that must not
import each other) can both take one; the interventions themselves live in
:mod:`cleansight_analysis.interventions`, whose ``base`` module re-exports these names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ..inputs.images import to_rgb_image
from .hooknames import HookSpec


class Intervention:
    """Base class. Subclasses override :meth:`apply_image` and/or :meth:`hooks`.

    Attributes:
        name: short label used as the ``condition`` column of result tables.
        domain: ``"pixel"`` (acts on images), ``"attention"`` (edits attention patterns),
            ``"activation"`` (edits head outputs) or ``"none"``.
    """

    name: str = "intervention"
    domain: str = "none"

    def apply_image(self, image: Any) -> Any:
        """The (possibly) transformed image; identity by default. Takes and returns ``PIL.Image``."""
        return image

    def hooks(self, model: Any, batch: Any) -> list[HookSpec]:
        """``(hook_name, fn)`` forward hooks for this prepared ``batch`` (none by default)."""
        return []

    def transform(self, image: Any, where: str = "image") -> Any:
        """A sample's image (path, PIL, array or tensor), or its list of images, as RGB PIL image(s)
        passed through :meth:`apply_image`; ``where`` names the input in error messages."""
        if isinstance(image, (list, tuple)):
            return [self.apply_image(to_rgb_image(im, where)) for im in image]
        return self.apply_image(to_rgb_image(image, where))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "domain": self.domain}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.to_dict()})"


class NoIntervention(Intervention):
    """Leaves images and the forward pass alone (the ``clean`` / ``triggered`` reference conditions)."""

    name = "none"


@dataclass
class HookIntervention(Intervention):
    """Wraps a fixed hook list or a ``fn(model, batch) -> hooks`` factory as an intervention."""

    hook_source: Sequence[HookSpec] | Callable[[Any, Any], Sequence[HookSpec]] = ()
    name: str = "hooks"
    domain: str = "activation"
    params: dict[str, Any] = field(default_factory=dict)

    def hooks(self, model: Any, batch: Any) -> list[HookSpec]:
        if callable(self.hook_source):
            return list(self.hook_source(model, batch))
        return list(self.hook_source)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "domain": self.domain, **self.params}


@dataclass
class Compose(Intervention):
    """Several interventions at once: images pass through each in order, hooks are concatenated."""

    parts: Sequence[Intervention] = ()

    @property
    def name(self) -> str:  # type: ignore[override]
        return "+".join(p.name for p in self.parts) or "none"

    @property
    def domain(self) -> str:  # type: ignore[override]
        return "+".join(sorted({p.domain for p in self.parts})) or "none"

    def apply_image(self, image: Any) -> Any:
        for p in self.parts:
            image = p.apply_image(image)
        return image

    def hooks(self, model: Any, batch: Any) -> list[HookSpec]:
        return [h for p in self.parts for h in p.hooks(model, batch)]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "domain": self.domain, "parts": [p.to_dict() for p in self.parts]}


def as_intervention(value: Any) -> Intervention:
    """``None`` -> :class:`NoIntervention`; a hook list or factory -> :class:`HookIntervention`."""
    if value is None:
        return NoIntervention()
    if isinstance(value, Intervention):
        return value
    if callable(value) or isinstance(value, (list, tuple)):
        return HookIntervention(value)
    raise TypeError(f"expected an Intervention, a hook list or a hook factory, got {type(value).__name__}")
