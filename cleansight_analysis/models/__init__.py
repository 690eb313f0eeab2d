"""Models: loading, the hooked wrapper, per-architecture adapters, the registry and tiny models."""

from .families import SUPPORTED_ARCHITECTURES, ModelFamily, family_for
from .hooked import Generation, HookedLVLM
from .loading import load_lvlm
from .registry import register_model, registered_models

__all__ = ["SUPPORTED_ARCHITECTURES", "ModelFamily", "family_for", "Generation", "HookedLVLM", "load_lvlm",
           "register_model", "registered_models"]
