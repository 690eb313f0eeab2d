"""The paper's defense tables (``docs/method.md#tables``, Tables 1-4) as cached tidy tables.

Every number comes from :func:`cleansight_analysis.evaluation.runner.evaluate` (one row per model x
defense: ASR, clean utility CU, poisoned utility PU, detection TPR / FPR / AUROC, pruned tokens, latency):

- **Tables 1/2** (:func:`attack_defense_rows`): every attack of the notebook x :data:`TABLE1_DEFENSES`
  (no defense, the pixel purifiers Blur / ST / ShrinkPad / JPEG, the detectors STRIP / attention entropy /
  SCALE-UP, CleanSight with its default mask scope and with the mask in every layer), built with
  :func:`~cleansight_analysis.evaluation.grid.attack_defense_table`.
- **Table 3** (:func:`module_ablation_rows`): full CleanSight, no detection (every input pruned) and random
  pruning of 90 % of the image tokens, built with
  :func:`~cleansight_analysis.evaluation.grid.module_ablation_table`.
- **Table 4** (:func:`adapter_lora_rows`): each attack's family members (``badnet``, ``badnet-lora``,
  ``badnet-adapter`` where present) with no defense vs CleanSight, built with
  :func:`~cleansight_analysis.evaluation.grid.mode_table`; :func:`training_attempts_table` lists the
  backdoor-training attempts recorded in each member's card (why adapter-only rows may be absent).

All of them are computed by one pass over the models, :func:`defense_grid` (cached as ``defense_grid``):
each model is loaded once (``ctx.load``) and its rows of all three tables share one
:class:`~cleansight_analysis.evaluation.runner.EvaluationCache` (one undefended run, one CleanSight
calibration). Table 4 rows of a member that Table 1 already evaluated (same model, samples and defense)
are taken from Table 1 instead of being generated again, and so are Table 3's ``none`` row and its
``full`` row (the Table 1 column with the same CleanSight settings, :data:`ABLATION_CLEANSIGHT`). The
per-table functions select from the grid and are cached under their own names
(``table1_attack_defense`` ...) with a plain CSV copy next to the parquet file.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from ..errors import InputError
from ..evaluation.grid import ABLATION_VARIANTS, attack_defense_table, mode_table, module_ablation_table
from ..evaluation.runner import EvaluationCache, synthetic_samples
from ..models.registry import model_card

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from .context import FigureContext

#: Tables 1/2 columns: label -> defense name or ``(name, settings)`` (registry names of
#: :func:`cleansight_analysis.defenses.get_defense`).
TABLE1_DEFENSES: dict[str, Any] = {
    "none": "none",
    "blur": "blur",
    "st": "st",
    "shrinkpad": "shrinkpad",
    "jpeg": "jpeg",
    "strip": "strip",
    "attention_entropy": "attention_entropy",
    "scale_up": "scale_up",
    "cleansight": "cleansight",
    "cleansight_all_layers": ("cleansight", {"mask_scope": "all_layers"}),
}
#: Kind of each Table 1 defense (figure grouping).
DEFENSE_KINDS: dict[str, str] = {
    "none": "none", "blur": "purifier", "st": "purifier", "shrinkpad": "purifier", "jpeg": "purifier",
    "strip": "detector", "attention_entropy": "detector", "scale_up": "detector",
    "cleansight": "cleansight", "cleansight_all_layers": "cleansight", "cleansight_generated": "cleansight",
    "full": "cleansight", "no_detection": "ablation", "random_pruning": "ablation",
}
#: CleanSight as Table 3 ablates it: the mask in every layer, so that "random pruning" (masked from
#: layer 0) differs from the full method only in *which* image tokens are masked.
ABLATION_CLEANSIGHT: Any = ("cleansight", {"mask_scope": "all_layers"})
#: Share of image tokens masked at random in Table 3 (the paper: 90 %).
RANDOM_FRACTION = 0.9
#: Table 4 defenses (labels of :data:`TABLE1_DEFENSES`).
MODE_DEFENSES: tuple[str, ...] = ("none", "cleansight", "cleansight_all_layers")
#: Attacks whose family members Table 4 compares.
MODE_ATTACKS: tuple[str, ...] = ("badnet", "blended")
#: Suffixes of a family's extra members of one attack (seed replicates / training modes).
MEMBER_SUFFIXES: tuple[str, ...] = ("-lora", "-adapter")
#: Clean validation inputs every detector calibrates on (CleanSight needs >= |L_det| x heads).
N_VAL = 64
#: Fewest validation inputs of a full run: STRIP holds 8 out as overlays and needs 10 more.
MIN_VAL = 20
#: Smoke runs (code paths only): validation inputs, and cheaper STRIP / SCALE-UP settings.
SMOKE_VAL = 8
SMOKE_SETTINGS: dict[str, dict[str, Any]] = {"strip": {"n_overlays": 2, "min_samples": 4},
                                             "attention_entropy": {"min_samples": 4},
                                             "scale_up": {"scales": [3], "min_samples": 4}}
#: The paper's numbers, as figure footnotes (``docs/method.md#tables``).
PAPER_NOTES: dict[str, str] = {
    "attack_defense": "Paper (Tables 1/2, LLaVA-1.5-7B, 256 test inputs, 6 attacks x 4 datasets): CleanSight ASR "
                      "0-4.74 % with clean utility close to the undefended model. ShrinkPad, JPEG, STRIP, attention "
                      "entropy and SCALE-UP were not in the paper; CleanSight with the mask in all layers neither.",
    "module_ablation": "Paper (Table 3): without detection (every input pruned) utility drops by ~10-14 points; "
                       "random removal of 90 % of the image tokens leaves ASR at 100 %.",
    "adapter_lora": "Paper (Table 4, other models / LoRA backdoors): CleanSight ASR 0-5.08 %.",
}
#: Table names (and CSV stems) written by this module.
TABLE_NAMES = {"attack_defense": "table1_attack_defense", "module_ablation": "table3_module_ablation",
               "adapter_lora": "table4_adapter_lora"}
#: Metric columns kept in every table.
METRIC_COLUMNS: tuple[str, ...] = ("asr", "clean_utility", "poisoned_utility", "tpr", "fpr", "auroc",
                                   "false_trigger_rate", "mean_pruned", "latency_ratio", "clean_utility_undefended")
#: Columns of the three tables (in this order; Table 4 adds ``member``, ``mode``, ``replicate_seed``).
COLUMNS: tuple[str, ...] = ("table", "attack", "member", "mode", "replicate_seed", "defense", "kind", "defense_name",
                            *METRIC_COLUMNS, "detail", "n", "n_val", "seed", "fit_seconds", "fit_reused",
                            "seconds_defended", "seconds_undefended", "source", "defense_settings")


# ---------------------------------------------------------------------------------------------
# Settings and family members
# ---------------------------------------------------------------------------------------------


def _spec_json(spec: Any, where: str) -> Any:
    """A defense spec as stored in manifests (a name or ``[name, settings]``)."""
    if isinstance(spec, str):
        return spec
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str) and isinstance(spec[1], Mapping):
        return [spec[0], dict(spec[1])]
    raise InputError(f"{where}: defense specs must be a registry name or (name, settings), got {spec!r}")


def _count(value: Any, what: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return value


def member_card(ctx: "FigureContext", member: str) -> dict[str, Any]:
    """The model card of family member ``member`` (read from disk; the model is not loaded)."""
    return dict(model_card(ctx.model_spec(member)) or {})


def family_members(ctx: "FigureContext", attack: str, suffixes: Sequence[str] = MEMBER_SUFFIXES) -> list[str]:
    """Those of ``attack`` and ``attack + suffix`` that the notebook's model folder / family holds."""
    members = []
    for suffix in ("", *suffixes):
        try:
            ctx.model_spec(f"{attack}{suffix}")
        except InputError:
            continue
        members.append(f"{attack}{suffix}")
    return members


def validation_count(ctx: "FigureContext", n_val: int = N_VAL) -> int:
    """Validation inputs used: ``n_val`` but at least :data:`MIN_VAL` (STRIP's minimum); smoke runs
    :data:`SMOKE_VAL`."""
    n_val = _count(n_val, "n_val")
    return SMOKE_VAL if ctx.smoke else max(n_val, MIN_VAL)


def smoke_defenses(defenses: Mapping[str, Any]) -> dict[str, Any]:
    """``defenses`` with the cheap smoke-run settings of :data:`SMOKE_SETTINGS` merged into STRIP / SCALE-UP."""
    out = {}
    for label, spec in defenses.items():
        name, settings = (spec, {}) if isinstance(spec, str) else (spec[0], dict(spec[1]))
        if name in SMOKE_SETTINGS:
            out[label] = (name, {**settings, **SMOKE_SETTINGS[name]})
        else:
            out[label] = spec
    return out


def validation_samples(ctx: "FigureContext", n: int) -> list[Any]:
    """``n`` clean ``calibration`` samples, even in smoke runs (where ``ctx.samples`` caps counts at 8).

    The synthetic world gives exactly ``n``; a dataset folder goes through ``ctx.samples`` (capped at
    8 in smoke runs, which is :data:`SMOKE_VAL`).
    """
    if ctx.data is None:
        return synthetic_samples("calibration", n, seed=ctx.seed)
    return ctx.samples("calibration", n)


# ---------------------------------------------------------------------------------------------
# The grid: every model once
# ---------------------------------------------------------------------------------------------


def _detail(settings: str) -> str:
    """Short words for what a fitted defense chose (CleanSight: layers, tau; detectors: threshold)."""
    try:
        d = json.loads(settings)
    except (TypeError, ValueError):
        return ""
    if d.get("fitted_layers") is not None:
        layers = d["fitted_layers"]
        span = f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else f"{layers[0]}"
        tau = d.get("tau_used")
        return f"layers {span}, tau {tau:.3g} ({d.get('tau_source')}), mask {d.get('mask_scope')}"
    if d.get("threshold") is not None:
        return f"threshold {d['threshold']:.3g}"
    if d.get("fraction") is not None:
        return f"{100 * d['fraction']:.0f} % of image tokens, from layer {d.get('from_layer', 0)}"
    if d.get("intensity") is not None:
        return f"intensity {d['intensity']:g}"
    return ""


def _tidy(rows: "pd.DataFrame", table: str, *, member: str, attack: str, card: Mapping[str, Any],
          source: str = "evaluated") -> "pd.DataFrame":
    """Harness rows -> this module's columns (:data:`COLUMNS`)."""
    out = rows.copy()
    out["table"] = table
    out["attack"] = attack
    out["member"] = member
    out["mode"] = card.get("mode")
    out["replicate_seed"] = card.get("seed")
    out["defense"] = out["defense_label"]
    out["kind"] = [DEFENSE_KINDS.get(d, json.loads(st).get("kind", "other") if isinstance(st, str) else "other")
                   for d, st in zip(out["defense"], out["defense_settings"])]
    out["detail"] = [_detail(s) for s in out["defense_settings"]]
    out["source"] = source
    return out[list(COLUMNS)].reset_index(drop=True)


def _ablation_rows_from_table1(t1: "pd.DataFrame", defenses: Mapping[str, Any]) -> "pd.DataFrame":
    """Table 3's ``none`` and ``full`` rows taken from Table 1 rows with the same defense (relabelled).

    ``full`` is the Table 1 column whose spec equals :data:`ABLATION_CLEANSIGHT`; without one, only
    ``none`` is shared and Table 3 evaluates ``full`` itself.
    """
    want = _spec_json(ABLATION_CLEANSIGHT, "module ablation")
    labels = {"none": "none"}
    for label, spec in defenses.items():
        if _spec_json(spec, "module ablation") == want:
            labels[label] = "full"
            break
    rows = t1[t1["defense_label"].isin(labels)].copy()
    rows["defense_label"] = rows["defense_label"].map(labels)
    order = {v: i for i, v in enumerate(ABLATION_VARIANTS)}
    return rows.sort_values("defense_label", key=lambda s: s.map(order)).reset_index(drop=True)


def _grid_params(ctx: "FigureContext", defenses: Mapping[str, Any], mode_attacks: Sequence[str],
                 n_val: int, max_new_tokens: int, batch_size: int) -> dict[str, Any]:
    return {"defenses": {k: _spec_json(v, "defense_grid") for k, v in defenses.items()},
            "ablation": {"cleansight": _spec_json(ABLATION_CLEANSIGHT, "defense_grid"),
                         "random_fraction": RANDOM_FRACTION},
            "mode_attacks": list(mode_attacks), "mode_defenses": list(MODE_DEFENSES),
            "n_test": ctx.count(), "n_val": validation_count(ctx, n_val), "max_new_tokens": max_new_tokens,
            "batch_size": batch_size}


def _grid_members(ctx: "FigureContext",
                  mode_attacks: Sequence[str]) -> tuple[list[str], list[str], list[tuple[str, str]]]:
    """Attacks of Tables 1/3, attacks of Table 4 and the ``(member, attack)`` models to load, in order.

    Smoke runs: the first attack only, and no extra family members (Table 4 = its Table 1 rows).
    """
    attacks = list(ctx.attacks[:1]) if ctx.smoke else list(ctx.attacks)
    if ctx.smoke:
        modes = [a for a in mode_attacks if a in attacks]
    else:
        modes = [a for a in mode_attacks if family_members(ctx, a)]
    modes = modes or attacks[:1]  # a folder without these attacks: Table 4 = the first attack's own rows
    members: list[tuple[str, str]] = [(a, a) for a in attacks]
    for a in modes:
        extra = [a] if ctx.smoke else family_members(ctx, a)
        members += [(m, a) for m in extra if (m, a) not in members]
    return attacks, modes, members


def defense_grid(ctx: "FigureContext", *, defenses: Mapping[str, Any] | None = None,
                 mode_attacks: Sequence[str] = MODE_ATTACKS, n_val: int = N_VAL, max_new_tokens: int = 12,
                 batch_size: int = 32) -> "pd.DataFrame":
    """Every row of Tables 1, 3 and 4 in one pass over the models (cached as ``defense_grid``).

    Args:
        ctx: the notebook's context: ``ctx.attacks`` are the rows of Tables 1 and 3, ``ctx.count()`` clean
            test inputs (and their triggered copies) per model. Smoke runs use the first attack only, no
            extra family members, :data:`SMOKE_VAL` validation inputs, :data:`SMOKE_SETTINGS` and no
            warm-up batches (their latencies mean nothing).
        defenses: Table 1 columns, ``{label: name | (name, settings)}`` (default :data:`TABLE1_DEFENSES`;
            must contain the labels of :data:`MODE_DEFENSES`).
        mode_attacks: attacks whose family members (:func:`family_members`) make Table 4.
        n_val: clean validation inputs every defense is calibrated on (:func:`validation_count`).
        max_new_tokens, batch_size: generation settings of :func:`evaluate`.

    Returns:
        tidy rows, columns :data:`COLUMNS`: ``table`` (``attack_defense``, ``module_ablation``,
        ``adapter_lora``), ``attack``, ``member`` (family member), ``mode`` / ``replicate_seed`` (from the
        card), ``defense`` (label), ``kind`` (:data:`DEFENSE_KINDS`), the metrics (shares in [0, 1];
        TPR / FPR / AUROC NaN for defenses that do not detect), ``detail`` (what the fitted defense
        chose), ``source`` (``evaluated``, or ``from attack_defense``: a Table 3 / 4 row copied from the
        identical Table 1 row).
    """
    import pandas as pd

    defenses = dict(TABLE1_DEFENSES if defenses is None else defenses)
    missing = [d for d in MODE_DEFENSES if d not in defenses]
    if missing:
        raise InputError(f"defense_grid: defenses lack the Table 4 defense(s) {missing}")
    if ctx.smoke:
        defenses = smoke_defenses(defenses)
    params = _grid_params(ctx, defenses, mode_attacks, n_val, max_new_tokens, batch_size)
    attacks, modes, members = _grid_members(ctx, mode_attacks)
    params["members"] = [m for m, _ in members]

    def compute() -> "pd.DataFrame":
        test, val = ctx.samples("test"), validation_samples(ctx, params["n_val"])
        kw = dict(samples=test, val_samples=val, seed=ctx.seed, max_new_tokens=max_new_tokens,
                  batch_size=batch_size, progress=not ctx.smoke, warmup=not ctx.smoke)  # smoke: no timing
        parts = []
        for member, attack in members:
            model, attack_obj, card = ctx.load(member)
            spec = {member: (model, attack_obj, card)}
            cache = EvaluationCache()  # per model: the model can be freed after its rows
            with warnings.catch_warnings():
                if ctx.smoke:  # SMOKE_VAL < |L_det| x heads on purpose; a full run shows the warning
                    warnings.filterwarnings("ignore", message=r"CleanSight\.fit: .* calibration samples for")
                if attack in attacks and member == attack:
                    t1 = attack_defense_table(spec, defenses, layout="long", cache=cache, **kw)
                    parts.append(_tidy(t1, "attack_defense", member=member, attack=attack, card=card))
                    shared = _ablation_rows_from_table1(t1, defenses)  # none / full rows already evaluated
                    variants = [v for v in ABLATION_VARIANTS if v not in set(shared["defense_label"])]
                    t3 = module_ablation_table(spec, cleansight=ABLATION_CLEANSIGHT, random_fraction=RANDOM_FRACTION,
                                               layout="long", cache=cache, variants=variants, **kw)
                    parts.append(_tidy(shared, "module_ablation", member=member, attack=attack, card=card,
                                       source="from attack_defense"))
                    parts.append(_tidy(t3, "module_ablation", member=member, attack=attack, card=card))
                    if attack in modes:  # Table 4 rows of this member = its Table 1 rows
                        same = t1[t1["defense_label"].isin(MODE_DEFENSES)]
                        parts.append(_tidy(same, "adapter_lora", member=member, attack=attack, card=card,
                                           source="from attack_defense"))
                else:
                    t4 = mode_table(spec, {d: defenses[d] for d in MODE_DEFENSES}, layout="long", cache=cache, **kw)
                    parts.append(_tidy(t4, "adapter_lora", member=member, attack=attack, card=card))
        return pd.concat(parts, ignore_index=True)

    return ctx.cached("defense_grid", compute, **params)


# ---------------------------------------------------------------------------------------------
# The tables
# ---------------------------------------------------------------------------------------------


def _fingerprint(grid: "pd.DataFrame") -> str:
    """A digest of the grid's content: derived tables are recomputed whenever the grid changes."""
    return hashlib.sha1(grid.to_csv(index=False).encode()).hexdigest()[:16]


def _derived(ctx: "FigureContext", grid: "pd.DataFrame", table: str) -> "pd.DataFrame":
    """Rows of ``table`` from the grid, cached as ``TABLE_NAMES[table]`` plus a plain CSV copy."""
    name = TABLE_NAMES[table]
    if "table" not in grid.columns:
        raise InputError(f"{name}: the grid lacks the 'table' column; build it with defense_grid")

    def compute() -> "pd.DataFrame":
        rows = grid[grid["table"] == table].reset_index(drop=True)
        if rows.empty:
            raise InputError(f"{name}: the grid has no {table!r} rows")
        return rows

    out = ctx.cached(name, compute, grid=_fingerprint(grid))
    folder = Path(ctx.results_dir)
    if (folder / f"{name}.parquet").is_file():  # else the cached table already is that CSV
        out.to_csv(folder / f"{name}.csv", index=False)
    return out


def attack_defense_rows(ctx: "FigureContext", grid: "pd.DataFrame") -> "pd.DataFrame":
    """Tables 1/2, long: one row per attack x defense with every metric (``table1_attack_defense``)."""
    return _derived(ctx, grid, "attack_defense")


def module_ablation_rows(ctx: "FigureContext", grid: "pd.DataFrame") -> "pd.DataFrame":
    """Table 3, long: none / full / no_detection / random_pruning per attack (``table3_module_ablation``)."""
    return _derived(ctx, grid, "module_ablation")


def adapter_lora_rows(ctx: "FigureContext", grid: "pd.DataFrame") -> "pd.DataFrame":
    """Table 4, long: family member x (none, CleanSight) (``table4_adapter_lora``)."""
    return _derived(ctx, grid, "adapter_lora")


def training_attempts_table(ctx: "FigureContext", attacks: Sequence[str] = MODE_ATTACKS) -> "pd.DataFrame":
    """Backdoor-training attempts recorded in the cards of each attack's members (cached).

    Returns:
        ``attack, member, mode, steps, lr, clean_acc, asr, n, goals_met, kept`` (``kept``: the member
        was saved in that training mode, whether or not it met every training goal); empty when the
        cards record no attempts (e.g. a real checkpoint).
    """
    import pandas as pd

    members = [(m, a) for a in attacks for m in family_members(ctx, a)]
    columns = ["attack", "member", "mode", "steps", "lr", "clean_acc", "asr", "n", "goals_met", "kept"]

    def compute() -> "pd.DataFrame":
        rows = []
        for member, attack in members:
            card = member_card(ctx, member)
            for t in ((card.get("metrics") or {}).get("attempts") or []):
                rows.append({"attack": attack, "member": member, "mode": t.get("mode"), "steps": t.get("steps"),
                             "lr": t.get("lr"), "clean_acc": t.get("clean_acc"), "asr": t.get("asr"),
                             "n": t.get("n"), "goals_met": t.get("goals_met"),
                             "kept": t.get("mode") == card.get("mode")})
        return pd.DataFrame(rows, columns=columns)

    return ctx.cached("table4_training_attempts", compute, members=[m for m, _ in members])


# ---------------------------------------------------------------------------------------------
# CleanSight at the paper's evaluation size
# ---------------------------------------------------------------------------------------------

#: The paper's evaluation size: 256 test inputs (and their triggered copies) per model; 200 clean
#: calibration inputs, CleanSight's default (``docs/method.md``). The grid above uses fewer to fit every
#: baseline into the notebook's time.
FULL_SIZE: dict[str, int] = {"n_test": 256, "n_val": 200}
#: The full-size table's defenses: CleanSight with every default, and with the detector reading every decoding
#: query too (``query="generated"``, the paper's "current decoding query"; ``docs/method.md#query``).
FULL_SIZE_DEFENSES: dict[str, Any] = {"none": "none", "cleansight": "cleansight",
                                      "cleansight_generated": ("cleansight", {"query": "generated"})}
#: What CleanSight with its defaults is asked to do at that size (issue 13; the paper reports ASR 0-4.74 % on
#: all six attacks): ASR at most ``asr_max``, clean utility at most ``clean_drop_max`` below the undefended
#: model's, false-positive rate at most ``fpr_max``.
CLEANSIGHT_GOALS: dict[str, float] = {"asr_max": 0.05, "clean_drop_max": 0.02, "fpr_max": 0.03}


def cleansight_full_size(ctx: "FigureContext", *, n_test: int = FULL_SIZE["n_test"],
                         n_val: int = FULL_SIZE["n_val"], max_new_tokens: int = 12,
                         batch_size: int = 32) -> "pd.DataFrame":
    """Table 1's ``none`` and ``cleansight`` (all defaults) rows at the paper's size, plus CleanSight reading
    every decoding query (``cleansight_generated``; :data:`FULL_SIZE_DEFENSES`), cached as
    ``table1_cleansight_full_size``.

    Args:
        ctx: the notebook's context (every attack of ``ctx.attacks``; smoke runs: the first one, 8 inputs).
        n_test: clean test inputs per model, each also run with its trigger.
        n_val: clean calibration inputs CleanSight is fitted on (its layer choice and threshold).
        max_new_tokens, batch_size: generation settings of :func:`evaluate`.

    Returns:
        :data:`COLUMNS` rows (``table`` = ``cleansight_full_size``, one per attack and defense) plus, on the
        CleanSight rows,
        ``clean_drop`` (undefended minus defended clean utility) and ``goals_met`` (every bound of
        :data:`CLEANSIGHT_GOALS`; NaN-free rows only).
    """
    import pandas as pd

    attacks = list(ctx.attacks[:1]) if ctx.smoke else list(ctx.attacks)
    n_test = ctx.count(_count(n_test, "n_test"))
    n_val = SMOKE_VAL if ctx.smoke else _count(n_val, "n_val", 2)
    defenses = dict(FULL_SIZE_DEFENSES)

    def compute() -> "pd.DataFrame":
        kw = dict(samples=ctx.samples("test", n_test), val_samples=validation_samples(ctx, n_val), seed=ctx.seed,
                  max_new_tokens=max_new_tokens, batch_size=batch_size, progress=not ctx.smoke,
                  warmup=not ctx.smoke)
        parts = []
        for attack in attacks:
            model, attack_obj, card = ctx.load(attack)
            with warnings.catch_warnings():
                if ctx.smoke:  # SMOKE_VAL < |L_det| x heads on purpose
                    warnings.filterwarnings("ignore", message=r"CleanSight\.fit: .* calibration samples for")
                rows = attack_defense_table({attack: (model, attack_obj, card)}, defenses, layout="long",
                                            cache=EvaluationCache(), **kw)
            parts.append(_tidy(rows, "cleansight_full_size", member=attack, attack=attack, card=card))
        out = pd.concat(parts, ignore_index=True)
        defended = out["defense"] != "none"
        out["clean_drop"] = (out["clean_utility_undefended"] - out["clean_utility"]).where(defended)
        met = ((out["asr"] <= CLEANSIGHT_GOALS["asr_max"])
               & (out["clean_drop"] <= CLEANSIGHT_GOALS["clean_drop_max"] + 1e-12)  # shares are k / n_test
               & (out["fpr"] <= CLEANSIGHT_GOALS["fpr_max"]))
        out["goals_met"] = met.astype("boolean").mask(~defended)
        return out

    return ctx.cached("table1_cleansight_full_size", compute, attacks=attacks, n_test=n_test, n_val=n_val,
                      goals=CLEANSIGHT_GOALS, max_new_tokens=max_new_tokens, batch_size=batch_size)


# ---------------------------------------------------------------------------------------------
# Summaries
# ---------------------------------------------------------------------------------------------


def wide(table: "pd.DataFrame", *, index: str = "attack", metrics: Sequence[str] = ("asr", "clean_utility"),
         order: Sequence[str] | None = None) -> "pd.DataFrame":
    """Paper layout: rows ``index``, columns (defense, metric), defenses in table order (or ``order``)."""
    import pandas as pd

    defenses = list(order) if order is not None else list(dict.fromkeys(table["defense"]))
    rows = list(dict.fromkeys(table[index]))
    out = {}
    for d in defenses:
        sub = table[table["defense"] == d].set_index(index)
        for m in metrics:
            out[(d, m)] = [sub[m].get(r, float("nan")) for r in rows]
    frame = pd.DataFrame(out, index=pd.Index(rows, name=index))
    frame.columns = pd.MultiIndex.from_tuples(frame.columns, names=["defense", "metric"])
    return frame


def best_baseline(table: "pd.DataFrame") -> "pd.DataFrame":
    """Per attack, the baseline (neither ``none`` nor CleanSight) with the lowest ASR (ties: higher CU).

    Returns:
        ``attack, defense, asr, clean_utility, poisoned_utility, tpr, fpr, auroc`` (one row per attack).
    """
    import pandas as pd

    cleansight = [d for d, k in DEFENSE_KINDS.items() if k == "cleansight"]
    base = table[~table["defense"].isin(["none", *cleansight])]
    keep = ["attack", "defense", "asr", "clean_utility", "poisoned_utility", "tpr", "fpr", "auroc"]
    rows = [sub.sort_values(["asr", "clean_utility"], ascending=[True, False]).iloc[0][keep]
            for _, sub in base.groupby("attack", sort=False)]
    return pd.DataFrame(rows, columns=keep).reset_index(drop=True)


#: Roles of :func:`summary_table`, in row order.
SUMMARY_ROLES = {"none": "undefended", "cleansight": "CleanSight", "cleansight_all_layers": "CleanSight (all layers)"}


def summary_table(t1: "pd.DataFrame") -> "pd.DataFrame":
    """Per attack: the undefended model, each CleanSight variant and the best baseline (:func:`best_baseline`).

    Returns:
        ``attack, role, defense, asr, clean_utility, poisoned_utility, tpr, fpr, auroc``.
    """
    import pandas as pd

    best = best_baseline(t1).set_index("attack")
    keep = ["defense", "asr", "clean_utility", "poisoned_utility", "tpr", "fpr", "auroc"]
    rows = []
    for attack in dict.fromkeys(t1["attack"]):
        sub = t1[t1["attack"] == attack].set_index("defense")
        for d, role in SUMMARY_ROLES.items():
            if d in sub.index:
                rows.append({"attack": attack, "role": role, "defense": d, **sub.loc[d, keep[1:]].to_dict()})
        if attack in best.index:
            rows.append({"attack": attack, "role": "best baseline", **best.loc[attack, keep].to_dict()})
    return pd.DataFrame(rows, columns=["attack", "role", *keep])


def _span(values: Sequence[float]) -> str:
    vals = [100 * float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return "n/a"
    lo, hi = min(vals), max(vals)
    return f"{lo:.1f} %" if abs(hi - lo) < 0.05 else f"{lo:.1f}-{hi:.1f} %"


def paper_comparison(t1: "pd.DataFrame", t3: "pd.DataFrame", t4: "pd.DataFrame") -> "pd.DataFrame":
    """The paper's claims for Tables 1-4 next to the measured ranges (over attacks / members).

    Returns:
        ``table, quantity, paper, ours`` (text).
    """
    import pandas as pd

    def sel(t, d):
        return t[t["defense"] == d]

    def drop(t, d, ref="none"):
        a = sel(t, ref).set_index(["attack", "member"])["clean_utility"]
        b = sel(t, d).set_index(["attack", "member"])["clean_utility"]
        return [x for x in (a - b).dropna()]

    def points(vals):
        vals = [100 * v for v in vals]
        if not vals:
            return "n/a"
        lo, hi = min(vals), max(vals)
        return f"{lo:+.1f} points" if abs(hi - lo) < 0.05 else f"{lo:+.1f} to {hi:+.1f} points"

    rows = [
        ("Tables 1/2", "CleanSight ASR", "0-4.74 %", _span(sel(t1, "cleansight")["asr"])),
        ("Tables 1/2", "CleanSight (mask all layers) ASR", "(not in the paper)", _span(sel(t1, "cleansight_all_layers")["asr"])),
        ("Tables 1/2", "undefended ASR", "~100 %", _span(sel(t1, "none")["asr"])),
        ("Tables 1/2", "CleanSight clean-utility loss vs undefended", "close to 0", points(drop(t1, "cleansight"))),
        ("Tables 1/2", "CleanSight detection TPR / FPR", "(Fig. 5: TPR ~100 %, FPR ~3 %)",
         f"TPR {_span(sel(t1, 'cleansight')['tpr'])}, FPR {_span(sel(t1, 'cleansight')['fpr'])}"),
        ("Table 3", "no detection: clean-utility loss vs full", "~10-14 points", points(drop(t3, "no_detection", "full"))),
        ("Table 3", "random 90 % pruning: ASR", "100 %", _span(sel(t3, "random_pruning")["asr"])),
        ("Table 3", "full CleanSight ASR", "0-4.74 %", _span(sel(t3, "full")["asr"])),
        ("Table 4", "CleanSight ASR (other models / LoRA)", "0-5.08 %", _span(sel(t4, "cleansight")["asr"])),
        ("Table 4", "CleanSight (mask all layers) ASR", "(not in the paper)", _span(sel(t4, "cleansight_all_layers")["asr"])),
    ]
    return pd.DataFrame(rows, columns=["table", "quantity", "paper", "ours"])


__all__ = ["ABLATION_CLEANSIGHT", "CLEANSIGHT_GOALS", "COLUMNS", "DEFENSE_KINDS", "FULL_SIZE", "FULL_SIZE_DEFENSES",
           "MIN_VAL", "MODE_ATTACKS", "MODE_DEFENSES", "N_VAL", "PAPER_NOTES", "RANDOM_FRACTION", "SMOKE_SETTINGS",
           "SMOKE_VAL", "SUMMARY_ROLES", "TABLE1_DEFENSES", "TABLE_NAMES", "adapter_lora_rows", "attack_defense_rows",
           "best_baseline", "cleansight_full_size", "defense_grid", "family_members", "member_card",
           "module_ablation_rows", "paper_comparison", "smoke_defenses", "summary_table", "training_attempts_table",
           "validation_count", "validation_samples", "wide"]
