"""Evaluation: metrics and the backdoor report (clean accuracy, ASR, false-trigger rate)."""

from .backdoor import BackdoorReport, evaluate_backdoor, generate_answers
from .metrics import DEFAULT_TARGET, contains_target, exact_match, normalize_text, rate

__all__ = ["BackdoorReport", "evaluate_backdoor", "generate_answers", "DEFAULT_TARGET", "contains_target",
           "exact_match", "normalize_text", "rate"]
