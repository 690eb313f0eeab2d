"""Attention-key masking for the Table 3 ablations, the oracle tau sweep and the logit lens.

The definitions live in the detector core; this module keeps their defense-side names:

- :func:`key_mask_hooks` (:func:`cleansight_analysis.detection.masking.key_mask_hooks`): ``hook_attn_scores``
  hooks that hide chosen key positions (or a ``[B, T]`` mask) from every query of the layers from
  ``from_layer`` on, at prefill and every decode step;
- :func:`attention_pruning_positions` (:func:`cleansight_analysis.detection.pruning.attention_pruning_positions`):
  the rule of ``docs/method.md#pruning`` (image keys whose attention from the last prompt token exceeds
  ``tau`` in any head of one layer), CleanSight's Omega.
"""

from __future__ import annotations

from ..detection.masking import key_mask_hooks
from ..detection.pruning import attention_pruning_positions

__all__ = ["attention_pruning_positions", "key_mask_hooks"]
