"""Every defense by name: ``get_defense("cleansight", quantile=0.99)``, ``get_defense("jpeg")``, ...

Names map to classes that live in :mod:`.cleansight`, :mod:`.baselines` and :mod:`.ablations` (the Table 3
ablations ``random_pruning`` and ``always_flag``, e.g. ``get_defense("always_flag", inner="cleansight")``);
they are imported lazily so that importing the package stays cheap.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from ..errors import InputError
from .base import Defense, NoDefense

#: name -> (module, class name, fixed keyword arguments)
_DEFENSES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "none": ("base", "NoDefense", {}),
    "cleansight": ("cleansight", "CleanSight", {}),
    "blur": ("baselines", "Purifier", {"kind": "blur"}),
    "st": ("baselines", "Purifier", {"kind": "st"}),
    "shrinkpad": ("baselines", "Purifier", {"kind": "shrinkpad"}),
    "jpeg": ("baselines", "Purifier", {"kind": "jpeg"}),
    "strip": ("baselines", "StripDetector", {}),
    "attention_entropy": ("baselines", "AttentionEntropyDetector", {}),
    "scale_up": ("baselines", "ScaleUpDetector", {}),
    "random_pruning": ("ablations", "RandomPruning", {}),
    "always_flag": ("ablations", "AlwaysFlag", {}),
}
DEFENSE_NAMES: tuple[str, ...] = tuple(_DEFENSES)


def get_defense(name: str, **settings: Any) -> Defense:
    """Build defense ``name`` with ``settings`` (each class validates its own settings)."""
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in _DEFENSES:
        raise InputError(f"unknown defense {name!r}; known defenses: {', '.join(DEFENSE_NAMES)}")
    module, cls_name, fixed = _DEFENSES[key]
    if key == "none":
        if settings:
            raise InputError(f"defense 'none' takes no settings, got {sorted(settings)}")
        return NoDefense()
    cls = getattr(import_module(f"{__package__}.{module}"), cls_name)
    return cls(**fixed, **settings)
