"""One registry pattern for every "thing by name": attacks, defenses, perturbations and models.

A :class:`Registry` maps names to objects (classes or factories). Entries are added with
:meth:`Registry.register`, as a decorator (``@ATTACKS.register`` / ``@PERTURBATIONS.register("blur")``)
or as a call (``DEFENSES.register("blur", partial(Purifier, kind="blur"))``); they are read back with
:meth:`Registry.get` (an unknown name raises the registry's error, listing the known names) and
:meth:`Registry.names` (registration order). It is a mutable mapping, so ``name in REG``, ``REG[name]``
and ``list(REG)`` keep working where a plain dict was used before.

Layer 0: imports nothing from the package but :mod:`.errors`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, MutableMapping
from typing import Any, Generic, TypeVar

from .errors import InputError

T = TypeVar("T")
_RAISE: Any = object()


class Registry(MutableMapping[str, T], Generic[T]):
    """Names -> objects, with one lookup rule and one error message.

    Args:
        kind: what an entry is, for messages (``"attack"``, ``"perturbation kind"``).
        error: exception class raised for unknown, unavailable or duplicate names.
        plural: how the known names are introduced in messages (default ``kind + "s"``).
        normalize: maps a requested name to its key (default: ``str.strip().lower()`` for strings).
        aliases: alternative spellings (already normalised) -> key.
        unavailable: names that are known but not shipped -> the reason (raised by :meth:`get`).
        name_attr: attribute holding an object's own name, used by ``@register`` without a name.
    """

    def __init__(self, kind: str, *, error: type[Exception] = InputError, plural: str | None = None,
                 normalize: Callable[[str], str] | None = None, aliases: Mapping[str, str] | None = None,
                 unavailable: Mapping[str, str] | None = None, name_attr: str = "name"):
        self.kind = kind
        self.error = error
        self.plural = plural or f"{kind}s"
        self._normalize = normalize or (lambda name: name.strip().lower())
        # kept by reference: a module's public ALIASES / UNAVAILABLE dict stays the one the registry reads
        self.aliases: Mapping[str, str] = aliases if aliases is not None else {}
        self.unavailable: Mapping[str, str] = unavailable if unavailable is not None else {}
        self.name_attr = name_attr
        self._entries: dict[str, T] = {}

    # ------------------------------------------------------------------ registering
    def register(self, name: Any = None, obj: Any = _RAISE, *, overwrite: bool = False) -> Any:
        """Add an entry. Three spellings:

        - ``REG.register("name", obj)``: registers ``obj`` and returns it;
        - ``@REG.register("name")``: decorator registering the decorated object under ``"name"``;
        - ``@REG.register``: decorator registering the object under its ``name_attr`` attribute.

        A name already registered raises ``error`` unless ``overwrite=True``.
        """
        if obj is not _RAISE:
            return self._add(name, obj, overwrite)
        if name is not None and not isinstance(name, str):  # bare decorator: ``name`` is the object
            target = name
            return self._add(getattr(target, self.name_attr, None), target, overwrite)

        def decorator(target: Any) -> Any:
            return self._add(name if name is not None else getattr(target, self.name_attr, None), target, overwrite)

        return decorator

    def _add(self, name: Any, obj: Any, overwrite: bool) -> Any:
        if not isinstance(name, str) or not name:
            raise self.error(f"cannot register {obj!r} as a {self.kind}: it needs a non-empty string name, "
                             f"got {name!r}")
        if name in self._entries and not overwrite:
            raise self.error(f"{self.kind} name {name!r} is already registered (pass overwrite=True to replace it)")
        self._entries[name] = obj
        return obj

    # ------------------------------------------------------------------ reading
    def key(self, name: Any) -> Any:
        """The registry key of a requested name (normalised, aliases resolved); non-strings unchanged."""
        if not isinstance(name, str):
            return name
        key = self._normalize(name)
        return self.aliases.get(key, key)

    def get(self, name: Any, default: Any = _RAISE) -> T:  # type: ignore[override]
        """The entry of ``name``. Unknown names raise ``error`` listing the known ones, unless a
        ``default`` is given (then it is returned, as ``Mapping.get`` does)."""
        key = self.key(name)
        if isinstance(key, str) and key in self._entries:
            return self._entries[key]
        if default is not _RAISE:
            return default
        known = ", ".join(self._entries)
        if not isinstance(name, str):
            raise self.error(f"{self.kind} name must be a string, got {type(name).__name__}; known {self.plural}: "
                             f"{known}")
        if key in self.unavailable:
            raise self.error(f"{self.kind} {name!r} is not available: {self.unavailable[key]}. Available: {known}")
        raise self.error(f"unknown {self.kind} {name!r}; known {self.plural}: {known}")

    def names(self) -> tuple[str, ...]:
        """Registered names, in registration order."""
        return tuple(self._entries)

    def copy(self) -> "Registry[T]":
        """A registry with the same settings and entries (tests register into a copy)."""
        out: Registry[T] = Registry(self.kind, error=self.error, plural=self.plural, normalize=self._normalize,
                                    aliases=dict(self.aliases), unavailable=dict(self.unavailable),
                                    name_attr=self.name_attr)
        out._entries = dict(self._entries)
        return out

    # ------------------------------------------------------------------ mapping protocol (exact keys)
    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __setitem__(self, name: str, obj: T) -> None:
        self._entries[name] = obj

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, names={list(self._entries)})"


__all__ = ["Registry"]
