"""Tables 1-4: :func:`evaluate` rows over models x defenses.

:func:`evaluation_grid` loads each model once and shares work between the rows of that model through an
:class:`~cleansight_analysis.evaluation.runner.EvaluationCache`: the undefended runs (the ``none`` answers
and the latency baseline are computed once per model and test set, not once per defense) and fitted
defenses (a CleanSight calibration fitted for the ``full`` row is reused by ``no_detection``). Reuse
changes no answer, flag or score; only the timing columns differ (one baseline timing per model).

- :func:`attack_defense_table`: Tables 1/2 (attacks x defenses);
- :func:`module_ablation_table`: Table 3 (full CleanSight, ``always_flag`` = no detection,
  ``random_pruning``, undefended);
- :func:`mode_table`: Table 4 (adapter-only vs LoRA backdoors);
- :func:`wide_table`: the tidy rows as one row per model, columns ``"<defense>/<metric>"``.
"""

from __future__ import annotations

import copy
import inspect
import json
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from ..attacks import attack_from_dict
from ..defenses.base import Defense
from ..defenses.registry import get_defense
from ..errors import InputError
from ..models.loading import load_lvlm
from ..models.registry import model_card
from .runner import EvaluationCache, check_int, evaluate, sample_list, synthetic_samples

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

DefenseSpec = Any  # name | (name, settings) | Defense | () -> Defense
ModelSpec = Any  # registry name / folder | (model, attack) | (model, attack, card)

#: Defaults of :func:`evaluate`'s keywords (read once, when the module is imported).
_EVALUATE_DEFAULTS = {k: p.default for k, p in inspect.signature(evaluate).parameters.items()
                      if p.default is not inspect.Parameter.empty}


def make_defense(spec: DefenseSpec) -> Defense:
    """A fresh :class:`Defense` from a name, ``(name, settings)``, a factory or an instance (deep-copied)."""
    if isinstance(spec, Defense):
        return copy.deepcopy(spec)
    if isinstance(spec, str):
        return get_defense(spec)
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str) and isinstance(spec[1], Mapping):
        return get_defense(spec[0], **spec[1])
    if callable(spec):
        out = spec()
        if not isinstance(out, Defense):
            raise InputError(f"defense factory returned {type(out).__name__}, not a Defense")
        return out
    raise InputError(f"cannot make a defense from {spec!r}: use a name, (name, settings), a Defense or a factory")


def resolve_model(spec: ModelSpec, device: Any = None) -> tuple[Any, Any, dict[str, Any]]:
    """``(model, attack, card)`` from a registry name / folder (attack from its card), ``(model, attack)``
    or ``(model, attack, card)`` (e.g. what :meth:`FigureContext.load` returns: no second load)."""
    if isinstance(spec, tuple) and len(spec) == 2:
        return spec[0], spec[1], {}
    if isinstance(spec, tuple) and len(spec) == 3:
        return spec[0], spec[1], dict(spec[2] or {})
    if not isinstance(spec, str):
        raise InputError(f"cannot load a model from {spec!r}: pass a registry name or (model, attack)")

    card = model_card(spec)
    if not card or not card.get("attack"):
        raise InputError(f"model {spec!r} has no attack in its card; pass (model, attack) instead")
    return load_lvlm(spec, device=device), attack_from_dict(card["attack"]), card


def _defense_label(label: Any, defense: Defense) -> str:
    return label if isinstance(label, str) else defense.name


def evaluation_grid(models: Mapping[str, ModelSpec], defenses: Mapping[str, DefenseSpec] | Sequence[DefenseSpec], *,
                    row_key: str = "attack", device: Any = None, cache: EvaluationCache | None = None,
                    **kwargs: Any) -> "pd.DataFrame":
    """Tidy table: one :func:`evaluate` row per (model, defense); ``row_key`` names the model column.

    Each model is resolved (loaded) once. The test and validation samples are made once and every row
    of a model shares an :class:`EvaluationCache` (``cache``, default a new one per call): the undefended
    runs are made once per model (the ``none`` row and every latency baseline use them) and identical
    fits are made once. ``kwargs`` go to :func:`evaluate`.
    """
    import pandas as pd

    if not models:
        raise InputError("evaluation_grid: no models given")
    items = list(defenses.items()) if isinstance(defenses, Mapping) else [(None, d) for d in defenses]
    if not items:
        raise InputError("evaluation_grid: no defenses given")
    if cache is None:
        cache = EvaluationCache()
    elif not isinstance(cache, EvaluationCache):
        raise InputError(f"evaluation_grid: cache must be an EvaluationCache, got {type(cache).__name__}")
    owner = "evaluation_grid"
    seed = kwargs.get("seed", _EVALUATE_DEFAULTS["seed"])
    if kwargs.get("samples") is None:  # one sample list for every row, so the cache can match it
        n_test = check_int(kwargs.get("n_test", _EVALUATE_DEFAULTS["n_test"]), "n_test", owner)
        kwargs["samples"] = synthetic_samples("test", n_test, check_int(seed, "seed", owner, minimum=0))
    if kwargs.get("val_samples") is None and kwargs.get("fit", True):
        n_val = check_int(kwargs.get("n_val", _EVALUATE_DEFAULTS["n_val"]), "n_val", owner)
        kwargs["val_samples"] = synthetic_samples("calibration", n_val, check_int(seed, "seed", owner, minimum=0))
    kwargs["samples"] = sample_list(kwargs["samples"], "samples", owner)
    if kwargs.get("val_samples") is not None:
        kwargs["val_samples"] = sample_list(kwargs["val_samples"], "val_samples", owner)
    rows = []
    for row_label, spec in models.items():
        model, attack, card = resolve_model(spec, device)
        for label, dspec in items:
            defense = make_defense(dspec)
            row = evaluate(model, attack, defense, cache=cache, **kwargs)
            row["defense_settings"] = json.dumps(row.pop("defense"), default=str)
            row["attack_settings"] = json.dumps(row.pop("attack"), default=str)
            row[row_key] = row_label
            row["defense_label"] = _defense_label(label, defense)
            row["mode"] = card.get("mode")
            rows.append(row)
    return pd.DataFrame(rows)


def wide_table(tidy: "pd.DataFrame", *, row_key: str = "attack", metrics: Sequence[str] = ("asr", "clean_utility"),
               column_key: str = "defense_label") -> "pd.DataFrame":
    """Tables 1/2 layout: one row per ``row_key``, columns ``"<defense>/<metric>"`` (defense order kept)."""
    import pandas as pd

    missing = [m for m in (row_key, column_key, *metrics) if m not in tidy.columns]
    if missing:
        raise InputError(f"wide_table: the tidy table lacks column(s) {missing}")
    rows = list(dict.fromkeys(tidy[row_key]))
    cols = list(dict.fromkeys(tidy[column_key]))
    out = pd.DataFrame({row_key: rows})
    for c in cols:
        sub = tidy[tidy[column_key] == c].set_index(row_key)
        for m in metrics:
            out[f"{c}/{m}"] = [sub[m].get(r, float("nan")) for r in rows]
    return out


def attack_defense_table(models_by_attack: Mapping[str, ModelSpec], defenses: Mapping[str, DefenseSpec] |
                         Sequence[DefenseSpec], *, metrics: Sequence[str] = ("asr", "clean_utility"),
                         layout: str = "wide", **kwargs: Any) -> "pd.DataFrame":
    """Tables 1/2: rows attacks, columns defenses x metrics (``layout="long"``: the tidy rows).

    Args:
        models_by_attack: ``{attack label: registry name | (model, attack)}``.
        defenses: names / ``(name, settings)`` / factories / instances (``{label: spec}`` to relabel).
        kwargs: passed to :func:`evaluate` (``n_test``, ``n_val``, ``seed``, ...) and ``device``.
    """
    tidy = evaluation_grid(models_by_attack, defenses, row_key="attack", **kwargs)
    return tidy if layout == "long" else wide_table(tidy, row_key="attack", metrics=metrics)


#: Rows of :func:`module_ablation_table`.
ABLATION_VARIANTS: tuple[str, ...] = ("none", "full", "no_detection", "random_pruning")


def module_ablation_table(models_by_attack: Mapping[str, ModelSpec], *, cleansight: DefenseSpec = "cleansight",
                          random_fraction: float = 0.9, metrics: Sequence[str] = ("asr", "clean_utility"),
                          layout: str = "wide", variants: Sequence[str] = ABLATION_VARIANTS,
                          **kwargs: Any) -> "pd.DataFrame":
    """Table 3: full CleanSight, no detection (``get_defense("always_flag", inner=...)``: prune every input)
    and random pruning of ``random_fraction`` of the image tokens (``get_defense("random_pruning")``), plus
    the undefended row.

    ``variants`` picks rows of :data:`ABLATION_VARIANTS` (e.g. leave out ``none`` / ``full`` when an
    attack x defense table already holds them)."""
    unknown = [v for v in variants if v not in ABLATION_VARIANTS]
    if unknown or not variants:
        raise InputError(f"module_ablation_table: variants {list(variants)!r} must be a non-empty subset of "
                         f"{ABLATION_VARIANTS}")
    every = {
        "none": "none",
        "full": cleansight,
        "no_detection": lambda: get_defense("always_flag", inner=make_defense(cleansight)),
        "random_pruning": ("random_pruning", {"fraction": random_fraction, "seed": int(kwargs.get("seed", 0))}),
    }
    defenses = {v: every[v] for v in ABLATION_VARIANTS if v in variants}
    tidy = evaluation_grid(models_by_attack, defenses, row_key="attack", **kwargs)
    return tidy if layout == "long" else wide_table(tidy, row_key="attack", metrics=metrics)


def mode_table(models: Mapping[str, ModelSpec], defenses: Mapping[str, DefenseSpec] | Sequence[DefenseSpec] = (
        "none", "cleansight"), *, metrics: Sequence[str] = ("asr", "clean_utility"), layout: str = "wide",
        **kwargs: Any) -> "pd.DataFrame":
    """Table 4: rows models (e.g. adapter-only vs LoRA backdoors; the ``mode`` column comes from each
    model card), columns defenses x metrics."""
    tidy = evaluation_grid(models, defenses, row_key="model_label", **kwargs)
    if layout == "long":
        return tidy
    wide = wide_table(tidy, row_key="model_label", metrics=metrics)
    modes = tidy.drop_duplicates("model_label").set_index("model_label")["mode"]
    wide.insert(1, "mode", [modes.get(m) for m in wide["model_label"]])
    return wide


__all__ = ["ABLATION_VARIANTS", "DefenseSpec", "ModelSpec", "attack_defense_table", "evaluation_grid", "make_defense",
           "mode_table", "module_ablation_table", "resolve_model", "wide_table"]
