"""The Table 3 ablation defenses, registered like every other defense.

- ``get_defense("random_pruning", fraction=0.9)`` (:class:`RandomPruning`): mask a random share of every
  input's image tokens, no detection;
- ``get_defense("always_flag", inner="cleansight")`` (:class:`AlwaysFlag`, Table 3's "no detection"
  row): the wrapped detector treats every input as flagged, so it purifies / prunes every input.

:func:`with_calibration` gives a copy of a fitted CleanSight-like defense with other calibration values
(``gamma = -inf``: flag everything; another ``tau``); the oracle tau sweep (Fig. 6) uses it too.
"""

from __future__ import annotations

import copy
import numbers
from dataclasses import is_dataclass, replace
from typing import Any, Mapping, Sequence

import torch

from ..detection.masking import key_mask_hooks
from ..errors import InputError
from .base import Defense, DefenseOutput, get_defense
from .baselines import CalibratedDetector


def _nonneg_int(value: Any, what: str, owner: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise InputError(f"{owner}: {what}={value!r} must be an int >= 0")
    return int(value)


class RandomPruning(Defense):
    """Table 3 ablation: mask a random ``fraction`` of every input's image tokens (no detection).

    Args:
        fraction: share of each sample's image tokens masked (the paper: 0.9).
        from_layer: first LM layer whose attention ignores them (default 0: every layer).
        seed: seed of the per-batch draws.
    """

    name = "random_pruning"
    kind = "purifier"

    def __init__(self, fraction: float = 0.9, from_layer: int = 0, seed: int = 0):
        if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0.0 <= fraction <= 1.0:
            raise InputError(f"RandomPruning: fraction={fraction!r} must be a number in [0, 1]")
        self.fraction = float(fraction)
        self.from_layer = _nonneg_int(from_layer, "from_layer", "RandomPruning")
        self.seed = _nonneg_int(seed, "seed", "RandomPruning")
        self._gen = torch.Generator().manual_seed(self.seed)

    def generate(self, model: Any, batch: Any, max_new_tokens: int = 12) -> DefenseOutput:
        pruned = []
        for g in batch.groups:
            img = g.image
            k = int(round(self.fraction * len(img)))
            pruned.append(img[torch.randperm(len(img), generator=self._gen)[:k]].sort().values)
        hooks = key_mask_hooks(model, pruned, self.from_layer)
        texts = model.generate(batch, max_new_tokens=max_new_tokens, hooks=hooks).texts
        return DefenseOutput(texts=texts, pruned=pruned, info={"fraction": self.fraction})

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "fraction": self.fraction, "from_layer": self.from_layer,
                "seed": self.seed}


def with_calibration(defense: Defense, **changes: Any) -> Defense:
    """A shallow copy of a fitted CleanSight-like defense whose ``calibration`` dataclass has ``changes``
    (e.g. ``gamma=-inf``: flag every input; ``tau=1e-3``: another pruning threshold)."""
    cal = getattr(defense, "calibration", None)
    if cal is None or not is_dataclass(cal):
        raise InputError(f"with_calibration: {defense!r} has no fitted calibration (call fit first)")
    out = copy.copy(defense)
    out.calibration = replace(cal, **changes)
    return out


def _inner_defense(inner: Any) -> Defense:
    """A defense from an instance, a registry name or ``(name, settings)``."""
    if isinstance(inner, Defense):
        return inner
    if isinstance(inner, str):
        return get_defense(inner)
    if isinstance(inner, tuple) and len(inner) == 2 and isinstance(inner[0], str) and isinstance(inner[1], Mapping):
        return get_defense(inner[0], **inner[1])
    raise InputError(f"AlwaysFlag: inner must be a detector defense, a name or (name, settings); got {inner!r}")


class AlwaysFlag(Defense):
    """Table 3 ablation "no detection": the wrapped detector purifies every input, flagged or not.

    The wrapper never edits the inner defense; it asks it to answer with every flag raised, in the way
    that detector supports:

    - a CleanSight-like detector (a ``calibration`` dataclass with ``gamma``): a copy with
      ``gamma = -inf`` (:func:`with_calibration`), so every input is flagged and pruned inside its one-pass
      hooks;
    - a detector with ``generate_flagged(model, batch, flags, max_new_tokens) -> DefenseOutput`` (answer
      with the given flags instead of detecting): called with all-True flags;
    - a quantile-calibrated baseline detector (``then`` / ``purifier``, e.g. STRIP): its scores are
      reported, and with ``then="purify"`` every input is answered from its purified image.

    Detection scores are the inner detector's own; flags are all True.

    Args:
        inner: the detector: a :class:`Defense` or a registry name / ``(name, settings)``
            (default ``"cleansight"``).

    Raises:
        InputError: ``inner`` does not detect or offers none of the ways above to force its flags.
    """

    kind = "detector"

    def __init__(self, inner: Any = "cleansight"):
        inner = _inner_defense(inner)
        if getattr(inner, "kind", None) != "detector":
            raise InputError(f"AlwaysFlag: needs a detector defense, got {inner!r}")
        if self._mode(inner) is None:
            raise InputError(f"AlwaysFlag: {inner.name!r} cannot be made to flag every input (it has no "
                             "calibration with gamma, no generate_flagged(model, batch, flags, max_new_tokens) "
                             "and is not a calibrated baseline detector)")
        self.inner = inner
        self.name = f"{inner.name}_no_detection"

    @staticmethod
    def _mode(inner: Defense) -> str | None:
        if callable(getattr(inner, "generate_flagged", None)):
            return "flagged"
        if hasattr(inner, "calibration"):
            return "calibration"
        if isinstance(inner, CalibratedDetector):
            return "baseline"
        return None

    def fit(self, model: Any, clean_samples: Sequence[Any]) -> "AlwaysFlag":
        self.inner.fit(model, clean_samples)
        return self

    def prepare(self, model: Any, images: Sequence[Any], prompts: Sequence[str] | str) -> Any:
        return self.inner.prepare(model, images, prompts)

    def score(self, model: Any, batch: Any) -> torch.Tensor:
        return self.inner.score(model, batch)

    def detect(self, model: Any, batch: Any) -> torch.Tensor:
        return torch.ones(len(batch), dtype=torch.bool)

    def generate(self, model: Any, batch: Any, max_new_tokens: int = 12) -> DefenseOutput:
        mode = self._mode(self.inner)
        if mode == "flagged":
            out = self.inner.generate_flagged(model, batch, self.detect(model, batch), max_new_tokens=max_new_tokens)
        elif mode == "calibration":
            cal = getattr(self.inner, "calibration", None)
            if cal is None or not hasattr(cal, "gamma"):
                raise InputError(f"AlwaysFlag: {self.inner.name!r} is not calibrated (call fit first)")
            out = with_calibration(self.inner, gamma=float("-inf")).generate(model, batch,
                                                                            max_new_tokens=max_new_tokens)
        else:
            out = self._baseline(model, batch, max_new_tokens)
        return self._checked(out)

    def _baseline(self, model: Any, batch: Any, max_new_tokens: int) -> DefenseOutput:
        """A calibrated baseline detector with every input flagged: scores as usual; with
        ``then="purify"`` every input is answered from its purified image."""
        inner = self.inner
        threshold = inner._check_fitted()
        scores = inner.score(model, batch)
        flags = self.detect(model, batch)
        info: dict[str, Any] = {"threshold": threshold, "then": inner.then}
        if inner.then == "purify":
            rows = list(range(len(batch)))
            texts = list(model.generate(inner.purifier.purify_batch(model, batch, rows),
                                        max_new_tokens=max_new_tokens).texts)
            info["purified"] = rows
        else:
            texts = list(model.generate(batch, max_new_tokens=max_new_tokens).texts)
        return DefenseOutput(texts=texts, flags=flags, scores=scores, info=info)

    def _checked(self, out: DefenseOutput) -> DefenseOutput:
        if out.flags is not None and not bool(torch.as_tensor(out.flags).all()):
            raise InputError(f"AlwaysFlag: {self.inner.name!r} did not flag every input; cannot force "
                             "purification of every input")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "inner": self.inner.to_dict()}


__all__ = ["AlwaysFlag", "RandomPruning", "with_calibration"]
