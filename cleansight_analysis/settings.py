"""Validated settings classes, one rule for all of them (pydantic does the checking).

:func:`settings` turns a class with annotated fields into a frozen pydantic dataclass: every field is
checked against its annotation on construction (and on ``dataclasses.replace``), strictly (no bool where a
number is expected, no string turned into a number, unknown keywords refused), and a failure is one
:class:`~cleansight_analysis.errors.InputError` line naming the class, the setting, the value and the rule::

    @settings
    class MySettings:
        quantile: Unit01 = 0.99                      # a finite float in (0, 1]
        folds: Annotated[Int, Field(ge=2)] = 5       # an int (numpy ints accepted), >= 2
        mode: Literal["a", "b"] = "a"

    MySettings(folds=1)   # InputError: MySettings: folds=1 must be >= 2

A field's ``Field(description=...)`` is the rule shown in the error (write it as "must be ..."); without
one the rule is derived from pydantic's error. Cross-field rules stay in ``__post_init__``, which runs after
the fields are checked. The result is still a standard dataclass (``fields``, ``asdict``, ``replace``).
"""

from __future__ import annotations

import numbers
from typing import Annotated, Any, Callable, TypeVar

from pydantic import BeforeValidator, ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass as _pydantic_dataclass

from .errors import InputError

T = TypeVar("T")


def _integral(value: Any) -> Any:
    """numpy / other integral numbers -> int (bools are left for the strict check to refuse)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    return value


def _real(value: Any) -> Any:
    """numpy floats and ints -> float (bools are left for the strict check to refuse)."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return value


#: An int; numpy integers accepted, bools refused.
Int = Annotated[int, BeforeValidator(_integral)]
#: A finite float; ints and numpy numbers accepted, bools / NaN / infinities refused.
Real = Annotated[float, BeforeValidator(_real), Field(allow_inf_nan=False)]
#: A finite float in (0, 1].
Unit01 = Annotated[Real, Field(gt=0.0, le=1.0, description="must be a number in (0, 1]")]
#: An int >= 1.
PositiveInt = Annotated[Int, Field(ge=1, description="must be an int >= 1")]

_CONFIG = ConfigDict(strict=True, extra="forbid", arbitrary_types_allowed=True)

_PHRASES: dict[str, Callable[[dict], str]] = {
    "greater_than": lambda c: f"must be > {c['gt']}",
    "greater_than_equal": lambda c: f"must be >= {c['ge']}",
    "less_than": lambda c: f"must be < {c['lt']}",
    "less_than_equal": lambda c: f"must be <= {c['le']}",
    "literal_error": lambda c: f"must be one of ({c['expected']})",
    "finite_number": lambda c: "must be a finite number",
    "int_type": lambda c: "must be an int",
    "float_type": lambda c: "must be a number",
    "string_type": lambda c: "must be a string",
    "bool_type": lambda c: "must be True or False",
    "tuple_type": lambda c: "must be a tuple",
}


def _message(cls: type, error: ValidationError, values: dict[str, Any]) -> str:
    """One line for the first failing field of ``error``."""
    errors = error.errors(include_url=False)
    first = errors[0]
    loc = first.get("loc") or ("?",)
    names = list(cls.__pydantic_fields__)
    # a positional argument's error is located by its index
    name = names[loc[0]] if isinstance(loc[0], int) and 0 <= loc[0] < len(names) else str(loc[0])
    owner = cls.__name__
    if first["type"] in ("unexpected_keyword_argument", "unexpected_positional_argument"):
        accepted = ", ".join(cls.__pydantic_fields__)
        return f"{owner}: unknown setting {name!r}; settings: {accepted}"
    info = cls.__pydantic_fields__.get(name)
    rule = info.description if info is not None and info.description else None
    if rule is None:
        ctx = first.get("ctx") or {}
        phrase = _PHRASES.get(first["type"])
        rule = phrase(ctx) if phrase else first["msg"]
    value = values.get(name, first.get("input"))
    return " ".join(f"{owner}: {name}={value!r} {rule}".split())


def settings(cls: type[T] | None = None, *, frozen: bool = True) -> Any:
    """Class decorator: a validated settings dataclass (see the module docstring)."""

    def wrap(c: type[T]) -> type[T]:
        out = _pydantic_dataclass(c, frozen=frozen, config=_CONFIG)
        init = out.__init__

        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            try:
                init(self, *args, **kwargs)
            except ValidationError as exc:
                for err in exc.errors(include_url=False):  # an InputError raised by a validator or __post_init__
                    inner = (err.get("ctx") or {}).get("error")
                    if isinstance(inner, InputError):
                        raise inner from None
                names = list(out.__pydantic_fields__)
                values = {**dict(zip(names, args)), **kwargs}
                raise InputError(_message(out, exc, values)) from None

        __init__.__doc__ = init.__doc__
        __init__.__wrapped__ = init  # type: ignore[attr-defined]
        out.__init__ = __init__  # type: ignore[method-assign]
        return out

    return wrap if cls is None else wrap(cls)


__all__ = ["Field", "Int", "PositiveInt", "Real", "Unit01", "settings"]
