"""cleansight-analysis: attention stealing in backdoored LVLMs, and the CleanSight test-time defense.

Quick start::

    import cleansight_analysis as cs
    model = cs.load_lvlm("tiny-random-llava")
    batch = model.prepare(image, "What is in the image?")
    rows = model.attention_rows(batch)          # [B, L, H, K] rows of the last prompt token
    mass = rows.group_mass()                    # [B, L, H, 4]: system / image / prompt / template_tail
"""

from ._runtime import configure_environment

configure_environment()

from .attention import AttentionRows  # noqa: E402
from .errors import CleanSightError, InputError, LayerIndexError, ModelSourceError, UnsupportedModelError  # noqa: E402
from .inputs import GROUP_NAMES, Batch, ImageTokens, TokenGroups  # noqa: E402
from .models import SUPPORTED_ARCHITECTURES, Generation, HookedLVLM, load_lvlm, register_model, registered_models  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "AttentionRows", "Batch", "CleanSightError", "GROUP_NAMES", "Generation", "HookedLVLM", "ImageTokens",
    "InputError", "LayerIndexError", "ModelSourceError", "SUPPORTED_ARCHITECTURES", "TokenGroups",
    "UnsupportedModelError", "load_lvlm", "register_model", "registered_models", "__version__",
]
