"""Test-time defenses with one interface (:class:`Defense`): CleanSight and its baselines."""

from .base import DEFENSE_KINDS, Defense, DefenseOutput, NoDefense
from .registry import DEFENSE_NAMES, available_defenses, get_defense

__all__ = ["DEFENSE_KINDS", "DEFENSE_NAMES", "Defense", "DefenseOutput", "NoDefense", "available_defenses",
           "get_defense"]
