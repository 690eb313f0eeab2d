"""Every defense by name: ``get_defense("cleansight", quantile=0.99)``, ``get_defense("jpeg")``, ...

Names map to classes that live in :mod:`.base`, :mod:`.cleansight`, :mod:`.baselines` and
:mod:`.ablations` (the Table 3 ablations ``random_pruning`` and ``always_flag``, e.g.
``get_defense("always_flag", inner="cleansight")``), registered here, in one table, into
:data:`~cleansight_analysis.defenses.base.DEFENSES` (a :class:`~cleansight_analysis.registry.Registry`).
"""

from __future__ import annotations

from functools import partial
from typing import Any

from .ablations import AlwaysFlag, RandomPruning
from .base import DEFENSES, Defense, NoDefense, get_defense
from .baselines import AttentionEntropyDetector, Purifier, ScaleUpDetector, StripDetector
from .cleansight import CleanSight

DEFENSES.register("none", NoDefense)
DEFENSES.register("cleansight", CleanSight)
for _kind in ("blur", "st", "shrinkpad", "jpeg"):
    DEFENSES.register(_kind, partial(Purifier, kind=_kind))
DEFENSES.register("strip", StripDetector)
DEFENSES.register("attention_entropy", AttentionEntropyDetector)
DEFENSES.register("scale_up", ScaleUpDetector)
DEFENSES.register("random_pruning", RandomPruning)
DEFENSES.register("always_flag", AlwaysFlag)

#: Every defense name, in table order.
DEFENSE_NAMES: tuple[str, ...] = DEFENSES.names()



def available_defenses() -> tuple[str, ...]:
    """Names :func:`get_defense` accepts, in table order (every defense module is imported with the package)."""
    return DEFENSES.names()


def defense_factory(name: str) -> Any:
    """The class (or ``functools.partial`` of a class) that :func:`get_defense` calls for ``name``; an
    unknown name raises :class:`~cleansight_analysis.errors.InputError` listing the known ones."""
    return DEFENSES.get(name)


__all__ = ["DEFENSES", "DEFENSE_NAMES", "Defense", "available_defenses", "defense_factory", "get_defense"]
