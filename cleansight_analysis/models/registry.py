"""Registry of named models that ``load_lvlm`` can build or load without any download.

An entry is either a *builder* (a function returning ``(hf_model, processor)``, e.g. a tiny random
model made from configs) or a *local folder* holding a saved HF model and processor (the embedded
trained models shipped in ``data/models/``). Entries live in a
:class:`~cleansight_analysis.registry.Registry` (the package's one registry pattern); this module adds
what only models need: the folder scan of ``data/models`` at import and the card validation.
"""

from __future__ import annotations

import json
import os
import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import CardError, ModelSourceError
from ..registry import Registry
from . import tiny

#: Where the shipped artifacts live (``data/`` at the repository root; ``CLEANSIGHT_DATA`` overrides).
DATA_DIR = Path(os.environ.get("CLEANSIGHT_DATA", Path(__file__).resolve().parents[2] / "data"))
MODELS_DIR = DATA_DIR / "models"
CARD_FILE = "card.json"
#: Longest ``base`` chain of delta folders followed before giving up (a card naming itself or a loop).
MAX_BASE_DEPTH = 8


@dataclass(frozen=True)
class RegisteredModel:
    """One registry entry: exactly one of ``builder`` and ``path`` is set; ``card`` is the model card."""

    name: str
    description: str
    builder: Callable[[], tuple[Any, Any]] | None = None
    path: Path | None = None
    card: dict[str, Any] | None = None


#: name -> :class:`RegisteredModel`.
_REGISTRY: Registry[RegisteredModel] = Registry("model", error=ModelSourceError, normalize=lambda name: name)


def register_model(name: str, builder: Callable[[], tuple[Any, Any]] | None = None, *,
                   path: str | Path | None = None, description: str = "", overwrite: bool = False,
                   card: dict[str, Any] | None = None) -> None:
    """Register ``name`` for :func:`load_lvlm`, built by ``builder()`` or loaded from ``path``."""
    if (builder is None) == (path is None):
        raise ModelSourceError(f"register_model({name!r}): give exactly one of builder= and path=")
    _REGISTRY.register(name, RegisteredModel(name, description, builder, None if path is None else Path(path), card),
                       overwrite=overwrite)


class CardWarning(UserWarning):
    """A ``card.json`` under a models folder was skipped (malformed, shadowing a name, looping ``base``)."""


#: Names built into the package; a card can never take them over.
BUILTIN_NAMES = ("tiny-random-llava", "tiny-random-llava-next")
#: Card keys with a fixed type (other keys are free-form and kept as they are).
_HEADLINE_METRICS = ("clean_acc", "asr", "false_trigger_rate")


def _bad_text(value: str) -> str | None:
    if not value.strip():
        return "is empty"
    if len(value) > 300:
        return f"is {len(value)} characters long (at most 300)"
    bad = next((c for c in value if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")), None)
    return None if bad is None else f"holds the control character {bad!r}"


def validate_card(card: Any, path: str | Path = CARD_FILE) -> dict[str, Any]:
    """Check a parsed ``card.json`` against the card schema; :class:`CardError` naming the file and key if not.

    ``name``: a non-empty string without control characters; ``attack``: null or an object with a
    string ``name``; ``mode`` and ``base``: strings (``base`` without control characters);
    ``metrics``: an object whose ``clean_acc`` / ``asr`` / ``false_trigger_rate`` are numbers or null;
    ``seed``: an integer or null. Other keys are free-form.
    """
    where = repr(str(path))
    if not isinstance(card, dict):
        raise CardError(f"{where}: a card must be a JSON object, got {type(card).__name__}")
    for key in ("name", "base"):
        if card.get(key) is None:
            continue
        if not isinstance(card[key], str):
            raise CardError(f"{where}: {key!r} must be a string, got {type(card[key]).__name__} {card[key]!r:.60}")
        problem = _bad_text(card[key])
        if problem:
            raise CardError(f"{where}: {key!r} {card[key]!r:.80} {problem}")
    attack = card.get("attack")
    if attack is not None:
        if not isinstance(attack, dict):
            raise CardError(f"{where}: 'attack' must be null or an object with a 'name', got {type(attack).__name__} "
                            f"{attack!r:.60}")
        if not isinstance(attack.get("name"), str) or _bad_text(attack["name"]):
            raise CardError(f"{where}: 'attack.name' must be a non-empty string without control characters, "
                            f"got {attack.get('name')!r:.60}")
    if card.get("mode") is not None and not isinstance(card["mode"], str):
        raise CardError(f"{where}: 'mode' must be a string, got {type(card['mode']).__name__} {card['mode']!r:.60}")
    if card.get("seed") is not None and (not isinstance(card["seed"], int) or isinstance(card["seed"], bool)):
        raise CardError(f"{where}: 'seed' must be an integer, got {card['seed']!r:.60}")
    metrics = card.get("metrics")
    if metrics is not None:
        if not isinstance(metrics, dict):
            raise CardError(f"{where}: 'metrics' must be an object, got {type(metrics).__name__} {metrics!r:.60}")
        for key in _HEADLINE_METRICS:
            value = metrics.get(key)
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                      or value != value or value in (float("inf"), float("-inf"))):
                raise CardError(f"{where}: 'metrics.{key}' must be a finite number or null, got {value!r:.60}")
    return card


def read_card(folder: Path) -> dict[str, Any] | None:
    """The folder's ``card.json`` (model card of the embedded models and backdoor outputs), if any.

    Raises :class:`~cleansight_analysis.errors.CardError` when the card is not valid JSON or does
    not follow the card schema (see :func:`cleansight_analysis.models.registry.validate_card`).
    """
    path = Path(folder) / CARD_FILE
    if not path.is_file():
        return None
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise CardError(f"{str(path)!r} is not valid JSON ({type(exc).__name__}: {exc})") from None
    validate_card(card, path)
    return card


def is_delta_folder(folder: Path) -> bool:
    """A delta folder stores only what a fine-tune changed, over a ``base`` named in its card."""
    card = read_card(folder)
    return bool(card and card.get("base")) and not (Path(folder) / "config.json").is_file()


def resolve_base(folder: Path, base: str) -> Path | str:
    """A delta folder's base: a path relative to the folder, an absolute path, or a registry name."""
    candidate = (folder / base).resolve()
    if candidate.is_dir():
        return candidate
    if Path(base).is_dir():
        return Path(base)
    if lookup(base) is not None:
        return base
    raise ModelSourceError(f"{str(folder)!r}: base model {base!r} is neither a folder nor a registered model")


def base_chain(folder: Path) -> list[str]:
    """The ``base`` chain of a delta folder, from ``folder`` to the full model it starts from.

    Raises :class:`CardError` naming the chain when it loops (``base: "."``, A -> B -> A) or is longer
    than :data:`MAX_BASE_DEPTH`.
    """
    chain: list[str] = [str(folder)]
    seen = {Path(folder).resolve()}
    node: Path | None = Path(folder)
    while node is not None and is_delta_folder(node):
        base = resolve_base(node, read_card(node)["base"])
        nxt: Path | None
        if isinstance(base, str):  # a registry name
            entry = lookup(base)
            nxt = entry.path if entry is not None else None
            chain.append(base)
        else:
            nxt = base
            chain.append(str(base))
        if nxt is not None:
            key = Path(nxt).resolve()
            if key in seen:
                raise CardError(f"card.json 'base' chain loops: {' -> '.join(chain)}")
            seen.add(key)
        if len(chain) > MAX_BASE_DEPTH + 1:
            raise CardError(f"card.json 'base' chain is longer than {MAX_BASE_DEPTH}: {' -> '.join(chain)}")
        node = nxt
    return chain


def _warn(message: str) -> None:
    warnings.warn(message, CardWarning, stacklevel=3)


def register_model_folders(root: str | Path = MODELS_DIR) -> list[str]:
    """Register every folder under ``root`` that holds a ``card.json`` under the card's ``name``.

    A card that is malformed, takes a built-in name or a name another folder already registered, or
    whose ``base`` chain loops is skipped with a :class:`CardWarning` naming the file; it never makes
    the package (or any command) fail to import.
    """
    root = Path(root)
    names = []
    try:
        card_paths = sorted(root.glob("**/card.json"))
    except OSError as exc:
        _warn(f"models folder {str(root)!r} cannot be listed ({exc}); no cards registered from it")
        return names
    for card_path in card_paths:
        try:
            card = validate_card(json.loads(card_path.read_text(encoding="utf-8")), card_path)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            _warn(f"skipped {str(card_path)!r}: not readable JSON ({exc})")
            continue
        except CardError as exc:
            _warn(f"skipped {exc}")
            continue
        name = card.get("name") or card_path.parent.relative_to(root).as_posix()
        problem = _bad_text(name)
        if problem:
            _warn(f"skipped {str(card_path)!r}: its folder name {name!r:.80} {problem}")
            continue
        if name in BUILTIN_NAMES:
            _warn(f"skipped {str(card_path)!r}: name {name!r} is a built-in model; a card cannot replace it")
            continue
        known = _REGISTRY.get(name, None)
        if known is not None and (known.path is None or known.path.resolve() != card_path.parent.resolve()):
            _warn(f"skipped {str(card_path)!r}: name {name!r} is already registered from "
                  f"{repr(str(known.path)) if known.path is not None else 'a builder'}; rename one of the cards")
            continue
        metrics = card.get("metrics") or {}
        bits = [f"attack {card['attack']['name']}" if card.get("attack") else "clean", f"mode {card.get('mode')}"]
        bits += [f"{k} {metrics[k]:.3f}" for k in ("clean_acc", "asr") if isinstance(metrics.get(k), (int, float))]
        register_model(name, path=card_path.parent, description=", ".join(bits), overwrite=True, card=card)
        names.append(name)
    for name in list(names):  # base chains, once every card of this folder is registered
        entry = _REGISTRY[name]
        if not entry.card or not entry.card.get("base"):
            continue
        try:
            base_chain(entry.path)
        except CardError as exc:
            del _REGISTRY[name]
            names.remove(name)
            _warn(f"skipped {str(entry.path / CARD_FILE)!r}: {exc}")
        except ModelSourceError:  # a missing base is reported when the model is loaded
            pass
    return names


def registered_models() -> list[RegisteredModel]:
    """All registered models, sorted by name."""
    return [_REGISTRY[k] for k in sorted(_REGISTRY.names())]


def lookup(name: str) -> RegisteredModel | None:
    """The entry registered under exactly ``name``, or None."""
    return _REGISTRY.get(name, None)


def model_card(spec: str) -> dict[str, Any] | None:
    """The ``card.json`` of a registry name or a local model folder (read from disk, no model load), or None."""
    entry = lookup(spec)
    if entry is not None:
        return entry.card
    return read_card(Path(spec)) if Path(spec).is_dir() else None


def _register_defaults() -> None:
    register_model("tiny-random-llava", tiny.tiny_random_llava, overwrite=True,
                   description="random LLaVA-1.5 lookalike: CLIP 64px/8 (64 image tokens) + 4-layer Llama, 0.9M params")
    register_model("tiny-random-llava-next", tiny.tiny_random_llava_next, overwrite=True,
                   description="random LLaVA-NeXT lookalike: any-resolution grids, 4-layer Mistral with 2 KV heads")
    if MODELS_DIR.is_dir():
        try:
            register_model_folders(MODELS_DIR)
        except Exception as exc:  # noqa: BLE001 - importing the package must never fail on a bad models folder
            warnings.warn(f"models folder {str(MODELS_DIR)!r} not registered: {type(exc).__name__}: {exc}",
                          CardWarning, stacklevel=2)


_register_defaults()
