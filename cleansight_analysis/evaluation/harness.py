"""Compatibility names for the former one-file defense harness; new code imports from the modules below.

The harness was split by concern:

- :mod:`.scoring`: the one scorer (``utilities``, ``answer_utility``, ``score_runs``, the ASR rule);
- :mod:`.runner`: ``run_defense``, ``ConditionRun``, ``evaluate``, ``UndefendedRuns`` /
  ``undefended_runs`` and the explicit ``EvaluationCache``;
- :mod:`.grid`: ``evaluation_grid`` and the table builders (Tables 1-4), ``make_defense``,
  ``resolve_model``, ``wide_table``;
- :mod:`.sweeps`: ``detection_table`` and the detection / tau sweeps (Figs. 4-6);
- :mod:`cleansight_analysis.defenses.ablations`: ``RandomPruning``, ``AlwaysFlag``, ``with_calibration``
  (registered as ``random_pruning`` / ``always_flag``);
- :mod:`cleansight_analysis.defenses.masking`: ``key_mask_hooks``, ``attention_pruning_positions``.
"""

from __future__ import annotations

from ..defenses.ablations import AlwaysFlag, RandomPruning, with_calibration
from ..defenses.masking import attention_pruning_positions, key_mask_hooks
from .grid import (ABLATION_VARIANTS, attack_defense_table, evaluation_grid, make_defense, mode_table,
                   module_ablation_table, resolve_model, wide_table)
from .runner import (GENERATION_ONLY_SETTINGS, METRICS, ConditionRun, EvaluationCache, UndefendedRuns, evaluate,
                     run_defense, synthetic_samples, undefended_runs)
from .scoring import VQA_REFERENCES, answer_utility, score_runs, utilities
from .sweeps import (QUANTILES, TAUS, VAL_SIZES, detection_table, layer_window_sweep, quantile_sweep, tau_sweep,
                     val_size_sweep)

__all__ = ["ABLATION_VARIANTS", "AlwaysFlag", "ConditionRun", "EvaluationCache", "GENERATION_ONLY_SETTINGS", "METRICS",
           "QUANTILES", "RandomPruning", "TAUS", "UndefendedRuns", "VAL_SIZES", "VQA_REFERENCES", "answer_utility",
           "attack_defense_table", "attention_pruning_positions", "detection_table", "evaluate", "evaluation_grid",
           "key_mask_hooks", "layer_window_sweep", "make_defense", "mode_table", "module_ablation_table",
           "quantile_sweep", "resolve_model", "run_defense", "score_runs", "synthetic_samples", "tau_sweep",
           "undefended_runs", "utilities", "val_size_sweep", "wide_table", "with_calibration"]
