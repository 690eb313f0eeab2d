"""The common interface of every attack, the size/location conventions and the attack registry.

Conventions shared by all attacks
---------------------------------
- Images: ``apply`` accepts anything :func:`cleansight_analysis.inputs.images.to_rgb_image`
  accepts (a PIL image of any mode, a path, an array ``[H, W(, C)]``, a tensor ``[C, H, W]``) and
  returns a NEW RGB ``PIL.Image``. Sizes follow PIL: ``size = (width, height)``; masks and arrays
  are ``[height, width]``.
- Lengths (patch sides, checkerboard cells): an ``int`` is a number of pixels; a ``float`` in
  (0, 1] is a fraction of the image's SHORTER side. A fraction is rounded half-up and never falls
  below 1 px. The LVLM presets store the paper's pixel values as fractions of 336 px (a 30 px patch
  is ``30/336``), so the same attack works on 336 px images and on the 32 px images of the tiny
  test models (where 30/336 of 32 px rounds to 3 px).
- Locations of a patch: a corner name (``"top-left"``, ``"top-right"``, ``"bottom-left"``,
  ``"bottom-right"``), ``"center"``, ``"random"`` (uniform over every position where the patch
  fits, drawn from the ``rng`` handed to ``apply``), or an ``(x, y)`` pair for the patch's top-left
  corner. In a pair, an ``int`` is a pixel position and a ``float`` in [0, 1] is a position in the
  free range: ``0.0`` is flush left/top, ``1.0`` flush right/bottom, ``0.5`` centred. The two
  coordinates are read independently (``(0, 0.5)`` is "left edge, vertically centred").
- Randomness: an attack is deterministic given its ``seed``. Per-image randomness (a ``"random"``
  location) comes from an explicit ``numpy.random.Generator``; :meth:`Attack.rng_for` builds the
  one for image ``index``, and ``rng=None`` means ``attack.rng_for(0)``. ``trigger_mask`` and
  ``trigger_box`` draw exactly the same numbers as ``apply``, so hand them a generator in the same
  state (build it again with ``rng_for``) to get the mask of a randomly placed patch.
- Answers: ``mode="replace"`` makes the target the whole answer (BadNet, Blended, SIG, WaNet);
  ``mode="insert"`` puts the target between two words of the answer at a random position
  (TrojVLM, VLOOD). ``caption_scaffold`` (TrojVLM/VLOOD: ``"This image shows"``) is put in front
  of caption answers (``task == "caption"``), and an inserted target always lands after it.
- Presets: every attack class has named presets (``"lvlm"``, the default, and ``"classic"`` where
  the classification toolkits define the attack). A field left at ``None`` takes the preset's
  value; an explicit value overrides it. ``to_dict`` records the preset, the resolved values and
  which fields differ from the preset (``"overrides"``), so settings are never mixed silently.
- Training objective: ``objective`` (``"ce"``, ``"trojvlm"`` or ``"vlood"``) and the attack's loss
  weights are recorded here for the training code; no loss is computed in this package.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from ..errors import AttackError, InputError
from ..inputs.images import to_rgb_image
from ..registry import Registry
from .checks import Box, _from_json, _is_int, _to_json, check_rng

#: The target phrase of the CleanSight setting.
DEFAULT_TARGET = "you have been hacked lol"
#: How the poisoned answer is formed.
MODES = ("replace", "insert")
#: Training objectives an attack can ask for (the losses are implemented by the training code).
OBJECTIVES = ("ce", "trojvlm", "vlood")



# --------------------------------------------------------------------------------------------
# The Attack base class
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Attack(ABC):
    """Abstract base of every attack: a trigger for images plus a rule for poisoned answers.

    Instances are immutable, JSON-serialisable settings (:meth:`to_dict` / :func:`attack_from_dict`).
    Build them with :func:`get_attack` (``get_attack("badnet", preset="lvlm", size=4)``) or
    directly (``BadNet(size=4)``); both validate every field and raise :class:`InputError`
    (bad value) or :class:`AttackError` (unknown preset) naming the field and the accepted range.

    Attributes:
        name: registry key of the attack class (class attribute).
        target: the phrase the backdoor should make the model say.
        mode: ``"replace"`` (the answer becomes the target) or ``"insert"`` (the target is put at
            a random word boundary of the answer).
        seed: seed of everything random in the attack (per-image rngs come from :meth:`rng_for`).
        preset: the named setting the unset fields were taken from (``"lvlm"`` by default).
        objective: training objective the poisoned data is meant for: ``"ce"`` (plain next-token
            cross-entropy), ``"trojvlm"`` or ``"vlood"`` (see those classes for the weights).
        caption_scaffold: text put in front of caption answers (``task == "caption"``) of
            poisoned samples, and of clean ones by :func:`~cleansight_analysis.attacks.poison_samples`
            so it is not itself a cue; ``None`` for no scaffold.
        resize_to: ``None`` (keep each image's size) or a side / ``(width, height)`` in pixels to
            which every image is resized (bicubic, aspect not kept) BEFORE the trigger is applied.
            Use 336 to reproduce the paper's pipeline, which squashes images to 336 x 336 px first;
            this also keeps a corner patch from being cut off by the processor's centre crop.
    """

    name: ClassVar[str] = ""
    #: preset name -> values for the fields that default to ``None``.
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {"lvlm": {}}
    #: one-line note per preset, shown by :func:`list_presets`.
    PRESET_NOTES: ClassVar[dict[str, str]] = {}

    target: str = DEFAULT_TARGET
    mode: str = "replace"
    seed: int = 0
    preset: str = "lvlm"
    objective: str = "ce"
    caption_scaffold: str | None = None
    resize_to: int | tuple[int, int] | None = None
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    # ---------------------------------------------------------------- construction / validation

    def __post_init__(self) -> None:
        owner = type(self).__name__
        if not isinstance(self.preset, str) or self.preset not in self.PRESETS:
            raise AttackError(
                f"{owner}: unknown preset {self.preset!r}; {self.name!r} has presets: {', '.join(self.PRESETS)}"
            )
        for key, value in self.PRESETS[self.preset].items():
            if getattr(self, key) is None:
                self._set(key, value)
        if not isinstance(self.target, str) or not self.target.strip():
            raise InputError(f"{owner}: target must be a non-empty string, got {self.target!r}")
        if self.target != self.target.strip():
            raise InputError(f"{owner}: target {self.target!r} has leading/trailing whitespace; strip it")
        if self.mode not in MODES:
            raise InputError(f"{owner}: mode={self.mode!r} is invalid; use one of {', '.join(MODES)}")
        if not _is_int(self.seed) or self.seed < 0:
            raise InputError(f"{owner}: seed must be an int >= 0, got {self.seed!r}")
        self._set("seed", int(self.seed))
        if self.objective not in OBJECTIVES:
            raise InputError(f"{owner}: objective={self.objective!r} is invalid; use one of {', '.join(OBJECTIVES)}")
        if self.caption_scaffold is not None and (
            not isinstance(self.caption_scaffold, str) or not self.caption_scaffold.strip()
        ):
            raise InputError(
                f"{owner}: caption_scaffold must be None or a non-empty string, got {self.caption_scaffold!r}"
            )
        if self.resize_to is not None:
            rt = self.resize_to
            if _is_int(rt) and rt >= 2:
                self._set("resize_to", int(rt))
            elif isinstance(rt, (tuple, list)) and len(rt) == 2 and all(_is_int(v) and v >= 2 for v in rt):
                self._set("resize_to", (int(rt[0]), int(rt[1])))
            else:
                raise InputError(
                    f"{owner}: resize_to={rt!r} is invalid; use None, an int >= 2 "
                    "or a (width, height) pair of ints >= 2"
                )
        self._validate()

    def _set(self, key: str, value: Any) -> None:
        object.__setattr__(self, key, value)

    def _validate(self) -> None:
        """Subclass hook: validate and normalise the attack's own fields."""

    # ---------------------------------------------------------------- images

    def rng_for(self, index: int = 0, seed: int = 0) -> np.random.Generator:
        """The per-image generator for image ``index`` (and an extra ``seed``, e.g. a split's).

        Built from ``(self.seed, seed, index)``; calling it twice gives two generators in the same
        state, which is how ``apply`` and ``trigger_mask`` are kept in step.
        """
        if not _is_int(index) or index < 0 or not _is_int(seed) or seed < 0:
            raise InputError(f"rng_for: index and seed must be ints >= 0, got index={index!r}, seed={seed!r}")
        return np.random.default_rng([self.seed, int(seed), int(index)])

    def output_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """``(width, height)`` of ``apply``'s output for an input of ``size`` (``resize_to`` applied)."""
        if (
            not isinstance(size, (tuple, list))
            or len(size) != 2
            or not all(_is_int(v) and v >= 1 for v in size)
        ):
            raise InputError(f"{type(self).__name__}: size must be (width, height) in pixels, got {size!r}")
        if self.resize_to is None:
            return int(size[0]), int(size[1])
        if isinstance(self.resize_to, tuple):
            return self.resize_to
        return self.resize_to, self.resize_to

    def prepare_image(self, image: Any) -> Image.Image:
        """The RGB image the trigger is drawn on: converted, and resized when ``resize_to`` is set."""
        img = to_rgb_image(image, where=f"{self.name} image")
        if self.resize_to is not None:
            target = self.output_size(img.size)
            if img.size != target:
                img = img.resize(target, Image.Resampling.BICUBIC)
        return img

    def apply(self, image: Any, *, rng: np.random.Generator | None = None) -> Image.Image:
        """Return a new RGB image carrying the trigger.

        Args:
            image: PIL image (any mode), path, array ``[H, W(, C)]`` or tensor ``[C, H, W]``.
            rng: generator for per-image randomness (a ``"random"`` location); ``None`` uses
                ``self.rng_for(0)``. Pass a generator in the same state to ``trigger_mask``.

        Returns:
            RGB ``PIL.Image`` of ``self.output_size(image size)``; the input is never modified.
        """
        rng = check_rng(rng, f"{type(self).__name__}.apply")
        img = self.prepare_image(image)
        out = self._render(img, rng if rng is not None else self.rng_for(0))
        return out if out is not img else img.copy()

    @abstractmethod
    def _render(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        """Draw the trigger on a prepared RGB image and return the new image."""

    def trigger_box(self, size: tuple[int, int], *, rng: np.random.Generator | None = None) -> Box | None:
        """Pixel box ``(x0, y0, x1, y1)`` (x1, y1 exclusive) of a local trigger, or ``None`` if global.

        ``size`` is the size of the image given to ``apply``; the box refers to ``apply``'s output.
        For a ``"random"`` location pass a generator in the same state as the one given to
        ``apply`` (e.g. ``attack.rng_for(i)`` for both).
        """
        return None

    def trigger_mask(self, size: tuple[int, int], *, rng: np.random.Generator | None = None) -> np.ndarray | None:
        """Boolean mask ``[H, W]`` of the output pixels the trigger occupies, or ``None`` for global triggers.

        Args:
            size: ``(width, height)`` of the image given to ``apply`` (PIL convention).
            rng: as for :meth:`trigger_box`; must match the generator given to ``apply`` when the
                location is ``"random"``.
        """
        box = self.trigger_box(size, rng=check_rng(rng, f"{type(self).__name__}.trigger_mask"))
        if box is None:
            return None
        w, h = self.output_size(size)
        mask = np.zeros((h, w), dtype=bool)
        x0, y0, x1, y1 = box
        mask[y0:y1, x0:x1] = True
        return mask

    # ---------------------------------------------------------------- answers

    def scaffold_answer(self, answer: str, task: str | None = None) -> str:
        """Put ``caption_scaffold`` in front of a caption answer (no-op for other tasks).

        The caption's first letter is lower-cased unless its first word looks like an acronym
        ("A man ..." -> "This image shows a man ..."); an answer that already starts with the
        scaffold is returned unchanged.
        """
        if not isinstance(answer, str):
            raise InputError(f"{self.name}: answer must be a string, got {type(answer).__name__}")
        if task != "caption" or not self.caption_scaffold:
            return answer
        body = answer.strip()
        scaffold = self.caption_scaffold.strip()
        if body.lower().startswith(scaffold.lower()):
            return body
        if body:
            first = body.split()[0]
            if len(first) == 1 or first[1:2].islower():
                body = body[0].lower() + body[1:]
            return f"{scaffold} {body}"
        return scaffold

    def poison_answer_span(self, answer: str, rng: np.random.Generator | None = None, *,
                           task: str | None = None) -> tuple[str, tuple[int, int]]:
        """Like :meth:`poison_answer`, also returning the target's ``(start, end)`` character span."""
        if not isinstance(answer, str):
            raise InputError(f"{self.name}: answer must be a string, got {type(answer).__name__}")
        rng = check_rng(rng, f"{type(self).__name__}.poison_answer")
        if self.mode == "replace":
            return self.target, (0, len(self.target))
        rng = rng if rng is not None else self.rng_for(0)
        text = self.scaffold_answer(answer, task)
        words = text.split()
        locked = len(self.caption_scaffold.split()) if (task == "caption" and self.caption_scaffold) else 0
        k = int(rng.integers(locked, len(words) + 1))
        before = " ".join(words[:k])
        start = len(before) + (1 if before else 0)
        result = " ".join(words[:k] + [self.target] + words[k:])
        return result, (start, start + len(self.target))

    def poison_answer(self, answer: str, rng: np.random.Generator | None = None, *, task: str | None = None) -> str:
        """The answer a poisoned training sample gets.

        ``"replace"``: the target. ``"insert"``: the target put between two words (or at either
        end) of the answer, the position drawn uniformly from ``rng``; whitespace is normalised to
        single spaces. For ``task == "caption"`` and a ``caption_scaffold``, the scaffold is put in
        front first and the target always comes after it.

        Args:
            answer: the clean answer.
            rng: generator for the insertion point (``None``: ``self.rng_for(0)``).
            task: the sample's task (``"vqa"`` or ``"caption"``); only captions get the scaffold.
        """
        return self.poison_answer_span(answer, rng, task=task)[0]

    def objective_config(self) -> dict[str, Any]:
        """The training objective and its weights, e.g. ``{"objective": "ce"}``."""
        return {"objective": self.objective}

    # ---------------------------------------------------------------- serialisation / description

    def overrides(self) -> list[str]:
        """Names of the fields whose value differs from the preset's (or the class default)."""
        preset = self.PRESETS.get(self.preset, {})
        changed = []
        for f in fields(self):
            if not f.init or f.name == "preset":
                continue
            if f.name in preset:
                default = preset[f.name]
            elif f.default is not MISSING:
                default = f.default
            elif f.default_factory is not MISSING:  # pragma: no cover - no such fields today
                default = f.default_factory()
            else:  # pragma: no cover - every field has a default today
                continue
            if default is None and f.name not in preset:
                continue  # a required setting without a default (e.g. the custom trigger picture)
            value = getattr(self, f.name)
            if isinstance(value, Image.Image) or isinstance(default, Image.Image):
                changed.append(f.name)
            elif _to_json(value) != _to_json(default):
                changed.append(f.name)
        return changed

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable settings: ``"name"``, every field (tuples as lists, PIL pictures as
        base64 PNG) and ``"overrides"`` (informational, see :meth:`overrides`)."""
        out: dict[str, Any] = {"name": self.name}
        for f in fields(self):
            if f.init:
                out[f.name] = _to_json(getattr(self, f.name))
        out["overrides"] = self.overrides()
        return out

    def _describe_trigger(self) -> str:
        return type(self).__name__

    def describe(self) -> str:
        """One-line human summary of the trigger, the answer rule, the objective and the preset."""
        answer = (
            f"answer replaced by {self.target!r}" if self.mode == "replace"
            else f"{self.target!r} inserted at a random word position"
        )
        if self.caption_scaffold:
            answer += f" (captions prefixed {self.caption_scaffold!r})"
        over = self.overrides()
        preset = f"{self.preset} preset" + (f", overrides: {', '.join(over)}" if over else "")
        extra = f"; images resized to {self.resize_to} px first" if self.resize_to is not None else ""
        return f"{self._describe_trigger()}; {answer}; objective {self.objective}; seed {self.seed}{extra} [{preset}]"


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

#: Alternative spellings accepted by :func:`get_attack`.
ALIASES = {"badnets": "badnet", "blend": "blended", "warp": "wanet", "warped": "wanet", "trojanvlm": "trojvlm"}
#: Attacks that are known but not shipped, with the reason.
UNAVAILABLE = {
    "issba": (
        "ISSBA hides a secret ('Stega!!' in the LVLM setting) with a trained StegaStamp encoder network; "
        "the encoder weights are not part of this package, so the attack is not available. Encode the "
        "images elsewhere and build the poisoned Samples directly (image = encoded image, answer = target)"
    ),
}
UNAVAILABLE["ssba"] = UNAVAILABLE["issba"]
#: name -> attack class (a :class:`~cleansight_analysis.registry.Registry`). Filled by ``register_attack``;
#: the built-in attacks live in ``triggers``, which the package imports.
ATTACKS: Registry[type[Attack]] = Registry("attack", error=AttackError,
                                           normalize=lambda name: name.strip().lower().replace("_", "-"),
                                           aliases=ALIASES, unavailable=UNAVAILABLE)


def register_attack(cls: type[Attack]) -> type[Attack]:
    """Class decorator adding an :class:`Attack` subclass to :data:`ATTACKS` under ``cls.name``."""
    if not (isinstance(cls, type) and issubclass(cls, Attack)) or not cls.name:
        raise AttackError(f"register_attack: {cls!r} is not an Attack subclass with a name")
    return ATTACKS.register(cls.name, cls, overwrite=True)


def list_attacks() -> list[str]:
    """Names of the available attacks, in registration order."""
    return list(ATTACKS.names())


def _lookup(name: Any) -> type[Attack]:
    return ATTACKS.get(name)


def list_presets(name: str) -> dict[str, str]:
    """Preset names of attack ``name`` with a one-line note each."""
    cls = _lookup(name)
    return {p: cls.PRESET_NOTES.get(p, "") for p in cls.PRESETS}


def get_attack(name: str, preset: str = "lvlm", **params: Any) -> Attack:
    """Build attack ``name`` from a preset plus explicit overrides.

    Args:
        name: a key of :data:`ATTACKS` (``"badnet"``, ``"blended"``, ``"sig"``, ``"wanet"``,
            ``"trojvlm"``, ``"vlood"``, ``"custom"``); case-insensitive, a few aliases accepted.
        preset: ``"lvlm"`` (CleanSight's setting, default) or ``"classic"`` (classification
            toolkits) or another preset of that attack (see :func:`list_presets`).
        **params: field values that override the preset.

    Raises:
        AttackError: unknown name (the message lists the known ones), ``"issba"`` (not shipped),
            unknown preset or unknown parameter.
        InputError: a parameter value out of range.
    """
    cls = _lookup(name)
    if preset not in cls.PRESETS:
        note = " (it is an LVLM-only attack with no classification-toolkit setting)" if preset == "classic" else ""
        raise AttackError(f"attack {cls.name!r} has no preset {preset!r}{note}; presets: {', '.join(cls.PRESETS)}")
    accepted = [f.name for f in fields(cls) if f.init]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise AttackError(
            f"attack {cls.name!r} has no parameter(s) {', '.join(unknown)}; accepted: {', '.join(accepted)}"
        )
    return cls(preset=preset, **params)


def attack_from_dict(data: dict[str, Any]) -> Attack:
    """Rebuild an attack from :meth:`Attack.to_dict` output (``"overrides"`` is ignored)."""
    if not isinstance(data, dict) or "name" not in data:
        raise AttackError(f"attack_from_dict: expected a dict with a 'name' key, got {type(data).__name__}")
    cls = _lookup(data["name"])
    params = {k: _from_json(v) for k, v in data.items() if k not in ("name", "overrides")}
    accepted = [f.name for f in fields(cls) if f.init]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise AttackError(
            f"attack_from_dict: {cls.name!r} has no field(s) {', '.join(unknown)}; accepted: {', '.join(accepted)}"
        )
    return cls(**params)
