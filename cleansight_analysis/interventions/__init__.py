"""Interventions with one interface (:class:`Intervention`): pixel perturbations, attention edits,
per-head ablations and activation patching, plus the sweeps and the logit lens built on them.

- :mod:`.perturbations`: ``get_perturbation(kind, intensity)`` for ``st``, ``shrinkpad``, ``blur``,
  ``jpeg``, ``noise`` (pixels) and ``attn_uniform`` (attention interpolation);
- :mod:`.sweep`: ASR / clean accuracy / poisoned accuracy per perturbation kind and intensity;
- :mod:`.heads`: zero / mean ablation on ``hook_z``, head image-attention flattening, head sweeps,
  activation patching of ``hook_z``;
- :mod:`.logit_lens`: p(correct) - p(target) per layer at the answer position.
"""

from .base import Compose, HookIntervention, Intervention, NoIntervention, as_intervention
from .heads import HeadAblation, HeadImageFlatten, head_means, head_sweep, patch_heads
from .logit_lens import logit_lens
from .perturbations import PERTURBATION_KINDS, AttentionUniform, Perturbation, get_perturbation
from .sweep import perturbation_sweep

__all__ = ["PERTURBATION_KINDS", "AttentionUniform", "Compose", "HeadAblation", "HeadImageFlatten",
           "HookIntervention", "Intervention", "NoIntervention", "Perturbation", "as_intervention",
           "get_perturbation", "head_means", "head_sweep", "logit_lens", "patch_heads", "perturbation_sweep"]
