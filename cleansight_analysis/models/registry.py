"""Registry of named models that ``load_lvlm`` can build or load without any download.

An entry is either a *builder* (a function returning ``(hf_model, processor)``, e.g. a tiny random
model made from configs) or a *local folder* holding a saved HF model and processor (the embedded
trained models shipped in ``data/models/``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import ModelSourceError


@dataclass(frozen=True)
class RegisteredModel:
    """One registry entry: exactly one of ``builder`` and ``path`` is set."""

    name: str
    description: str
    builder: Callable[[], tuple[Any, Any]] | None = None
    path: Path | None = None


_REGISTRY: dict[str, RegisteredModel] = {}


def register_model(name: str, builder: Callable[[], tuple[Any, Any]] | None = None, *,
                   path: str | Path | None = None, description: str = "", overwrite: bool = False) -> None:
    """Register ``name`` for :func:`load_lvlm`, built by ``builder()`` or loaded from ``path``."""
    if (builder is None) == (path is None):
        raise ModelSourceError(f"register_model({name!r}): give exactly one of builder= and path=")
    if name in _REGISTRY and not overwrite:
        raise ModelSourceError(f"model name {name!r} is already registered (pass overwrite=True to replace it)")
    _REGISTRY[name] = RegisteredModel(name, description, builder, None if path is None else Path(path))


def registered_models() -> list[RegisteredModel]:
    """All registered models, sorted by name."""
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def lookup(name: str) -> RegisteredModel | None:
    return _REGISTRY.get(name)


def _register_defaults() -> None:
    from . import tiny

    register_model("tiny-random-llava", tiny.tiny_random_llava, overwrite=True,
                   description="random LLaVA-1.5 lookalike: CLIP 64px/8 (64 image tokens) + 4-layer Llama, 0.9M params")
    register_model("tiny-random-llava-next", tiny.tiny_random_llava_next, overwrite=True,
                   description="random LLaVA-NeXT lookalike: any-resolution grids, 4-layer Mistral with 2 KV heads")


_register_defaults()
