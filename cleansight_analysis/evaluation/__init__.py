"""Evaluation: the one scorer, the backdoor report, the defense runner, tables and sweeps.

- :mod:`.scoring`: utility (exact match / VQA score / CIDEr-D, chosen per sample) and the ASR rule;
- :mod:`.backdoor`: clean accuracy, ASR and false-trigger rate of a model (:func:`evaluate_backdoor`);
- :mod:`.runner`: defenses over clean and triggered inputs (:func:`~.runner.evaluate`), the evaluation cache;
- :mod:`.grid`: Tables 1-4; :mod:`.sweeps`: detection and tau sweeps (Figs. 4-6);
- :mod:`.intervention_sweeps`: perturbation and head sweeps (Figs. 1 and 9);
- :mod:`.visibility`: can the projector see a trigger at all (a probe on the frozen tower's features);
- :mod:`.metrics`, :mod:`.captions`, :mod:`cleansight_analysis.data.vqa_eval`: the metric primitives.
"""

from .backdoor import BackdoorReport, evaluate_backdoor, generate_answers
from .metrics import DEFAULT_TARGET, contains_target, exact_match, normalize_text, rate
from .scoring import attack_success_rate, mean_utility, utilities

__all__ = ["BackdoorReport", "evaluate_backdoor", "generate_answers", "DEFAULT_TARGET", "attack_success_rate",
           "contains_target", "exact_match", "mean_utility", "normalize_text", "rate", "utilities"]
