"""Registry of named models that ``load_lvlm`` can build or load without any download.

An entry is either a *builder* (a function returning ``(hf_model, processor)``, e.g. a tiny random
model made from configs) or a *local folder* holding a saved HF model and processor (the embedded
trained models shipped in ``data/models/``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import ModelSourceError


#: Where the shipped artifacts live (``data/`` at the repository root; ``CLEANSIGHT_DATA`` overrides).
DATA_DIR = Path(os.environ.get("CLEANSIGHT_DATA", Path(__file__).resolve().parents[2] / "data"))
MODELS_DIR = DATA_DIR / "models"


@dataclass(frozen=True)
class RegisteredModel:
    """One registry entry: exactly one of ``builder`` and ``path`` is set; ``card`` is the model card."""

    name: str
    description: str
    builder: Callable[[], tuple[Any, Any]] | None = None
    path: Path | None = None
    card: dict[str, Any] | None = None


_REGISTRY: dict[str, RegisteredModel] = {}


def register_model(name: str, builder: Callable[[], tuple[Any, Any]] | None = None, *,
                   path: str | Path | None = None, description: str = "", overwrite: bool = False,
                   card: dict[str, Any] | None = None) -> None:
    """Register ``name`` for :func:`load_lvlm`, built by ``builder()`` or loaded from ``path``."""
    if (builder is None) == (path is None):
        raise ModelSourceError(f"register_model({name!r}): give exactly one of builder= and path=")
    if name in _REGISTRY and not overwrite:
        raise ModelSourceError(f"model name {name!r} is already registered (pass overwrite=True to replace it)")
    _REGISTRY[name] = RegisteredModel(name, description, builder, None if path is None else Path(path), card)


def register_model_folders(root: str | Path = MODELS_DIR) -> list[str]:
    """Register every folder under ``root`` that holds a ``card.json`` under the card's ``name``."""
    names = []
    for card_path in sorted(Path(root).glob("**/card.json")):
        try:
            card = json.loads(card_path.read_text())
        except json.JSONDecodeError:
            continue
        name = card.get("name") or str(card_path.parent.relative_to(root))
        metrics = card.get("metrics") or {}
        bits = [f"attack {card['attack']['name']}" if card.get("attack") else "clean", f"mode {card.get('mode')}"]
        bits += [f"{k} {metrics[k]:.3f}" for k in ("clean_acc", "asr") if isinstance(metrics.get(k), (int, float))]
        register_model(name, path=card_path.parent, description=", ".join(bits), overwrite=True, card=card)
        names.append(name)
    return names


def registered_models() -> list[RegisteredModel]:
    """All registered models, sorted by name."""
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def lookup(name: str) -> RegisteredModel | None:
    return _REGISTRY.get(name)


def model_card(spec: str) -> dict[str, Any] | None:
    """The ``card.json`` of a registry name or a local model folder (read from disk, no model load), or None."""
    from .loading import read_card

    entry = lookup(spec)
    if entry is not None:
        return entry.card
    return read_card(Path(spec)) if Path(spec).is_dir() else None


def _register_defaults() -> None:
    from . import tiny

    register_model("tiny-random-llava", tiny.tiny_random_llava, overwrite=True,
                   description="random LLaVA-1.5 lookalike: CLIP 64px/8 (64 image tokens) + 4-layer Llama, 0.9M params")
    register_model("tiny-random-llava-next", tiny.tiny_random_llava_next, overwrite=True,
                   description="random LLaVA-NeXT lookalike: any-resolution grids, 4-layer Mistral with 2 KV heads")
    if MODELS_DIR.is_dir():
        register_model_folders(MODELS_DIR)


_register_defaults()
