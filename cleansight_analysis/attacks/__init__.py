"""The attack zoo: backdoor triggers and data poisoning for LLaVA-style vision-language models.

One interface for every attack (:class:`Attack`)::

    from cleansight_analysis.attacks import get_attack, poison_samples, triggered_copy

    attack = get_attack("badnet")                       # CleanSight's 30/336 noise patch, top-left
    tiny = get_attack("badnet", size=4)                 # explicit 4 px patch for 32 px images
    img = attack.apply(image)                           # new RGB PIL image
    mask = attack.trigger_mask(img.size)                # bool [H, W] (None for global triggers)
    train = poison_samples(samples, attack, rate=0.1, clean_twin=True)
    test = triggered_copy(test_samples, attack)

Attacks (:data:`ATTACKS`): ``badnet``, ``blended``, ``sig``, ``wanet``, ``trojvlm``, ``vlood``,
``custom``. Presets: ``"lvlm"`` (default; the CleanSight setting at 336 px) and ``"classic"``
(classification toolkits) where defined; ``get_attack("blended", preset="lvlm_code")`` gives the
authors' code value alpha 0.1. ISSBA is not shipped (it needs a trained StegaStamp encoder).
"""

from .base import (
    ALIASES,
    ATTACKS,
    DEFAULT_TARGET,
    MODES,
    OBJECTIVES,
    UNAVAILABLE,
    Attack,
    attack_from_dict,
    get_attack,
    list_attacks,
    list_presets,
    register_attack,
)
from .checks import LOCATION_NAMES
from .patterns import BLEND_PATTERN_PATH, blend_pattern, cartoon_pattern, write_assets
from .poison import poison_samples, triggered_copy
from .triggers import SIG, VLOOD, BadNet, Blended, Custom, PatchAttack, TrojVLM, WaNet

__all__ = [
    "ALIASES", "ATTACKS", "Attack", "BLEND_PATTERN_PATH", "BadNet", "Blended", "Custom", "DEFAULT_TARGET",
    "LOCATION_NAMES", "MODES", "OBJECTIVES", "PatchAttack", "SIG", "TrojVLM", "UNAVAILABLE", "VLOOD", "WaNet",
    "attack_from_dict", "blend_pattern", "cartoon_pattern", "get_attack", "list_attacks", "list_presets",
    "poison_samples", "register_attack", "triggered_copy", "write_assets",
]
