"""Interventions with one interface (:class:`Intervention`): pixel perturbations, attention edits,
per-head ablations and activation patching, plus the logit lens built on them.

- :mod:`.perturbations`: ``get_perturbation(kind, intensity)`` for ``st``, ``shrinkpad``, ``blur``,
  ``jpeg``, ``noise`` (pixels) and ``attn_uniform`` (attention interpolation);
- :mod:`.heads`: zero / mean ablation on ``hook_z``, head image-attention flattening, head means,
  activation patching of ``hook_z``;
- :mod:`.logit_lens`: p(correct) - p(target) per layer at the answer position.

The sweeps that generate answers and score them (``perturbation_sweep``, ``head_sweep``) are evaluations:
they live in :mod:`cleansight_analysis.evaluation.intervention_sweeps`. This package never imports the
evaluation layer.
"""

from ..models.intervention import Compose, HookIntervention, Intervention, NoIntervention, as_intervention
from .heads import HeadAblation, HeadImageFlatten, head_means, patch_heads
from .logit_lens import logit_lens
from .perturbations import PERTURBATION_KINDS, AttentionUniform, Perturbation, get_perturbation

__all__ = ["PERTURBATION_KINDS", "AttentionUniform", "Compose", "HeadAblation", "HeadImageFlatten",
           "HookIntervention", "Intervention", "NoIntervention", "Perturbation", "as_intervention",
           "get_perturbation", "head_means", "logit_lens", "patch_heads"]
