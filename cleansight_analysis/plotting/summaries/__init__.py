"""What a notebook's tables say, written as Markdown from the tables themselves (no hand-typed numbers).

Each function reads tidy tables (the ones the notebook just computed or loaded from its cache) and returns
Markdown text; a notebook shows it with ``IPython.display.Markdown(...)``, so its "what we see" paragraph
always matches its figures. One module per notebook; the small formatting helpers live in ``_format``.
"""

from __future__ import annotations

from .defense import defense_tables_summary
from .heads import head_ablation_summary
from .layer_sweep import layer_window_summary
from .layerwise import layerwise_detection_summary
from .lens import logit_lens_summary
from .perturbation import perturbation_summary
from .pruning import pruning_threshold_summary
from .stealing import stealing_summary
from .threshold import threshold_summary

__all__ = ["defense_tables_summary", "head_ablation_summary", "layer_window_summary", "layerwise_detection_summary",
           "logit_lens_summary", "perturbation_summary", "pruning_threshold_summary", "stealing_summary",
           "threshold_summary"]
