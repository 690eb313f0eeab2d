"""Attention access and attention-stealing measurements.

- :class:`AttentionRows` (rows of chosen queries, sliced inside the forward pass, and their mass per token
  group) lives in the model core, :mod:`cleansight_analysis.models.rows`, and is re-exported here;
- :mod:`.stealing`: the stealing table (sample x layer x head masses and ratio S^{l,h}), thief tokens
  and their localisation against a trigger mask;
- :mod:`.separability`: AUROC, the whitened-distance statistic, layer- and head-wise separability.
"""

from ..models.rows import AttentionRows, RowRecorder, StopForward
from .separability import (SeparabilitySettings, WhitenedDistance, auroc, detector_scores, head_separability,
                           layer_separability)
from .stealing import (StealingSettings, attention_grid, stealing_table, stealing_tables, thief_map, thief_tokens,
                       trigger_grid)

__all__ = ["AttentionRows", "RowRecorder", "SeparabilitySettings", "StealingSettings", "StopForward",
           "WhitenedDistance", "attention_grid", "auroc", "detector_scores", "head_separability",
           "layer_separability", "stealing_table", "stealing_tables", "thief_map", "thief_tokens", "trigger_grid"]
