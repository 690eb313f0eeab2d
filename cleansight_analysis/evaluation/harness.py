"""The defense evaluation harness: one protocol for every defense (``cleansight-method.md`` §4-6).

:func:`evaluate` is one row of Tables 1-4: it calibrates a :class:`~cleansight_analysis.defenses.Defense`
on clean validation samples, runs clean and triggered test inputs through ``defense.prepare`` +
``defense.generate`` and reports

- ``asr``: share of triggered answers containing the target phrase (case-insensitive, aliases counted);
- ``clean_utility``: exact match of clean answers, or the VQA score when samples carry 10 references;
- ``poisoned_utility``: triggered answers scored against the *clean* references;
- ``tpr`` / ``fpr`` / ``auroc``: detection quality from the defense's flags / scores (NaN when it does
  not detect);
- ``mean_pruned``: mean number of image tokens masked per flagged sample (NaN when nothing prunes);
- ``latency_ratio``: defended / undefended wall time (``prepare`` + ``generate``) on the clean test
  inputs, the undefended run (:class:`~cleansight_analysis.defenses.NoDefense`) made in the same call or
  shared by every row of the model (:class:`UndefendedRuns`).

Table builders (:func:`attack_defense_table`, :func:`module_ablation_table`, :func:`mode_table`) loop
:func:`evaluate` through :func:`evaluation_grid`, which loads each model once and shares work between the
rows of that model through an :class:`EvaluationCache`: the undefended runs (:class:`UndefendedRuns`: the
``none`` answers and the latency baseline are computed once per model and test set, not once per defense)
and fitted defenses (a CleanSight calibration fitted for the ``full`` row is reused by ``no_detection``).
Reuse changes no answer, flag or score; only the timing columns differ (one baseline timing per model).
The detection sweeps (:func:`layer_window_sweep`, :func:`quantile_sweep`, :func:`val_size_sweep`) work on
a stealing table (:func:`detection_table`) without any generation;
:func:`tau_sweep` runs the pruning rule with an oracle detector (every triggered input flagged).

The Table 3 ablations are small defenses defined here: :class:`AlwaysFlag` (no detection: the wrapped
detector prunes every input) and :class:`RandomPruning` (mask a random share of the image tokens).
"""

from __future__ import annotations

import copy
import json
import math
import numbers
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ..data.base import Sample
from ..defenses.base import Defense, DefenseOutput, NoDefense
from ..interventions.base import NoIntervention

_IDENTITY = NoIntervention()  # identity image transform: opens paths, converts to RGB
from ..errors import InputError
from .metrics import DEFAULT_TARGET, contains_target, exact_match, rate

#: Metrics of one :func:`evaluate` row.
METRICS: tuple[str, ...] = ("asr", "clean_utility", "poisoned_utility", "tpr", "fpr", "auroc", "mean_pruned",
                            "latency_ratio")
#: Number of references at which the VQA score (not exact match) is used.
VQA_REFERENCES = 10
#: |D_val| values of Fig. 5 (right).
VAL_SIZES: tuple[int, ...] = (1, 5, 10, 25, 50, 100, 200)
#: Quantiles of Fig. 5 (left).
QUANTILES: tuple[float, ...] = (0.8, 0.85, 0.9, 0.95, 0.97, 0.99, 1.0)
#: tau values of Fig. 6.
TAUS: tuple[float, ...] = (0.0, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


# ---------------------------------------------------------------------------------------------
# Small checks
# ---------------------------------------------------------------------------------------------


def _pos_int(value: Any, what: str, owner: str, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise InputError(f"{owner}: {what}={value!r} must be an int >= {minimum}")
    return int(value)


def _samples(samples: Any, what: str, owner: str) -> list[Sample]:
    from ..data.base import check_samples

    return check_samples(samples, f"{owner} ({what})")


def synthetic_samples(split: str, n: int, seed: int = 0) -> list[Sample]:
    """``n`` samples of the tiny family's synthetic world (``split``: train, calibration or test)."""
    from ..training.recipe import TinyRecipe

    return TinyRecipe(seed=seed).world().samples(split, n)


# ---------------------------------------------------------------------------------------------
# Scoring answers
# ---------------------------------------------------------------------------------------------


def answer_utility(prediction: str, sample: Sample) -> float:
    """Utility of one answer: the VQA score when ``sample`` has >= 10 references, else exact match.

    Captions are scored as a set by :func:`utilities` (CIDEr needs corpus statistics).
    """
    refs = sample.refs
    if len(refs) >= VQA_REFERENCES:
        from ..data.vqa_eval import vqa_score

        return float(vqa_score(prediction, refs))
    return exact_match(prediction, refs)


def utilities(predictions: Sequence[str], samples: Sequence[Sample]) -> list[float]:
    """Per-sample utility of a set of answers, as the paper scores each task.

    VQA samples: :func:`answer_utility` (VQA score with >= 10 references, else exact match). Caption
    samples (``task == "caption"``): CIDEr-D, whose IDF weights come from the caption references of this
    whole set, so each caption's score depends on the set it is scored in (at least two captions are
    needed; a lone caption falls back to exact match). Scores are on pycocoevalcap's scale (~0-10).
    """
    if len(predictions) != len(samples):
        raise InputError(f"utilities: {len(predictions)} predictions for {len(samples)} samples")
    out = [answer_utility(t, x) for t, x in zip(predictions, samples)]
    captions = [i for i, x in enumerate(samples) if x.task == "caption"]
    if len(captions) >= 2:
        from .captions import cider

        result = cider([predictions[i] for i in captions], [list(samples[i].refs) for i in captions])
        for i, value in zip(captions, result.per_sample):
            out[i] = float(value)
    return out


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


@dataclass
class ConditionRun:
    """Per-sample outputs of one defense on one list of samples.

    Attributes:
        texts: answers.
        flags: ``[n]`` bool or None (the defense does not detect).
        scores: ``[n]`` float or None.
        pruned: ``[n]`` number of masked image tokens per sample, or None (the defense never prunes).
        seconds: wall time of ``prepare`` + ``generate`` over every batch.
    """

    texts: list[str]
    flags: np.ndarray | None = None
    scores: np.ndarray | None = None
    pruned: np.ndarray | None = None
    seconds: float = 0.0


def score_runs(clean: ConditionRun, triggered: ConditionRun, samples: Sequence[Sample],
               target: str = DEFAULT_TARGET) -> dict[str, float]:
    """Every metric except latency from the clean and triggered runs over ``samples`` (same order).

    ``auroc`` uses the scores when the defense gives them, else the flags (as 0/1 scores); a defense
    that neither flags nor scores gets NaN for ``tpr``, ``fpr`` and ``auroc``. ``mean_pruned``
    averages over flagged samples (over every sample when the defense prunes without flagging).
    """
    n = len(samples)
    if len(clean.texts) != n or len(triggered.texts) != n:
        raise InputError(f"score_runs: {n} samples but {len(clean.texts)} clean and {len(triggered.texts)} "
                         "triggered answers")
    out = {
        "asr": rate(contains_target(t, target) for t in triggered.texts),
        "clean_utility": _mean(utilities(clean.texts, samples)),
        "poisoned_utility": _mean(utilities(triggered.texts, samples)),
        "false_trigger_rate": rate(contains_target(t, target) for t in clean.texts),
        "tpr": float("nan"), "fpr": float("nan"), "auroc": float("nan"), "mean_pruned": float("nan"),
    }
    if clean.flags is not None and triggered.flags is not None:
        out["tpr"] = float(np.mean(triggered.flags))
        out["fpr"] = float(np.mean(clean.flags))
    if clean.scores is not None and triggered.scores is not None:
        s = np.r_[clean.scores, triggered.scores].astype(np.float64)
    elif clean.flags is not None and triggered.flags is not None:
        s = np.r_[clean.flags, triggered.flags].astype(np.float64)
    else:
        s = None
    if s is not None and n > 0:
        from ..attention.separability import auroc

        s = np.where(np.isfinite(s), s, np.where(s > 0, np.finfo(np.float64).max, np.finfo(np.float64).min))
        out["auroc"] = auroc(s, np.r_[np.zeros(n), np.ones(n)])
    if clean.pruned is not None and triggered.pruned is not None:
        counts = np.r_[clean.pruned, triggered.pruned].astype(np.float64)
        if clean.flags is not None and triggered.flags is not None:
            sel = np.r_[clean.flags, triggered.flags].astype(bool)
            out["mean_pruned"] = float(counts[sel].mean()) if sel.any() else float("nan")
        else:
            out["mean_pruned"] = float(counts.mean()) if len(counts) else float("nan")
    return out


# ---------------------------------------------------------------------------------------------
# Running a defense
# ---------------------------------------------------------------------------------------------


def _image_of(sample: Sample) -> Any:
    """The sample's image(s) as RGB PIL image(s) (paths are opened)."""
    return _IDENTITY.transform(sample.image, where=f"sample {sample.sample_id!r} image")


def _as_array(value: Any, b: int, what: str, name: str, dtype: Any) -> np.ndarray | None:
    if value is None:
        return None
    arr = (value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)).reshape(-1)
    if len(arr) != b:
        raise InputError(f"defense {name!r} returned {len(arr)} {what} for a batch of {b}")
    return arr.astype(dtype)


def run_defense(model: Any, defense: Defense, samples: Sequence[Sample], *, batch_size: int = 32,
                max_new_tokens: int = 12, progress: bool = True, desc: str = "defense") -> ConditionRun:
    """``defense.prepare`` + ``defense.generate`` over ``samples`` in batches; per-sample outputs.

    Raises:
        InputError: the defense returns the wrong number of answers, flags, scores or pruned entries.
    """
    from tqdm.auto import tqdm

    name = getattr(defense, "name", type(defense).__name__)
    texts: list[str] = []
    flags: list[np.ndarray] = []
    scores: list[np.ndarray] = []
    pruned: list[np.ndarray] = []
    seen = {"flags": True, "scores": True, "pruned": True}
    seconds = 0.0
    starts = range(0, len(samples), batch_size)
    for s in tqdm(starts, desc=desc, disable=not progress, mininterval=2.0):
        chunk = samples[s:s + batch_size]
        images = [_image_of(x) for x in chunk]
        prompts = [x.prompt for x in chunk]
        t0 = time.perf_counter()
        batch = defense.prepare(model, images, prompts)
        out = defense.generate(model, batch, max_new_tokens=max_new_tokens)
        seconds += time.perf_counter() - t0
        if not isinstance(out, DefenseOutput):
            raise InputError(f"defense {name!r}: generate() must return a DefenseOutput, got {type(out).__name__}")
        b = len(chunk)
        if len(out.texts) != b:
            raise InputError(f"defense {name!r} returned {len(out.texts)} answers for a batch of {b}")
        texts += list(out.texts)
        f = _as_array(out.flags, b, "flags", name, bool)
        sc = _as_array(out.scores, b, "scores", name, np.float64)
        if out.pruned is not None and len(out.pruned) != b:
            raise InputError(f"defense {name!r} returned {len(out.pruned)} pruned entries for a batch of {b}")
        pr = None if out.pruned is None else np.array([int(torch.as_tensor(p).numel()) for p in out.pruned])
        for key, arr, acc in (("flags", f, flags), ("scores", sc, scores), ("pruned", pr, pruned)):
            seen[key] = seen[key] and arr is not None
            if arr is not None:
                acc.append(arr)
    return ConditionRun(
        texts=texts,
        flags=np.concatenate(flags) if seen["flags"] and flags else None,
        scores=np.concatenate(scores) if seen["scores"] and scores else None,
        pruned=np.concatenate(pruned) if seen["pruned"] and pruned else None,
        seconds=seconds,
    )


def _attack_target(attack: Any) -> str:
    return getattr(attack, "target", None) or DEFAULT_TARGET


def evaluate(model: Any, attack: Any, defense: Defense, *, n_test: int = 256, n_val: int = 200, seed: int = 0,
             samples: Sequence[Sample] | None = None, val_samples: Sequence[Sample] | None = None,
             max_new_tokens: int = 12, batch_size: int = 32, fit: bool = True, warmup: bool = True,
             progress: bool = True, undefended: "UndefendedRuns | None" = None,
             cache: "EvaluationCache | None" = None) -> dict[str, Any]:
    """One table row: calibrate ``defense``, run clean + triggered test inputs, report every metric.

    Args:
        model: a :class:`~cleansight_analysis.models.HookedLVLM`.
        attack: the attack whose trigger makes the triggered copies (``triggered_copy(..., seed=seed)``).
        defense: any :class:`~cleansight_analysis.defenses.Defense`; it is fitted (``fit=True``) on the
            clean validation samples.
        n_test / n_val: sizes of the default synthetic ``test`` and ``calibration`` splits (ignored for
            ``samples`` / ``val_samples`` given explicitly).
        seed: world seed of the default samples and trigger seed.
        fit: ``False`` keeps an already calibrated defense (e.g. one loaded from disk).
        warmup: one small untimed batch through both defenses before timing.
        undefended: the undefended runs of this model on these test samples (:func:`undefended_runs`),
            reused instead of running :class:`NoDefense` again (checked against ``samples``, ``attack``,
            ``seed``, ``batch_size`` and ``max_new_tokens``). For a plain :class:`NoDefense` row the
            defended runs *are* the undefended runs (its triggered run is made once and stored in
            ``undefended``), so its ``latency_ratio`` is exactly 1.
        cache: an :class:`EvaluationCache` shared by several calls: it supplies (and keeps) the
            undefended runs when ``undefended`` is None, and fitted defenses (see
            :meth:`EvaluationCache.fit`). Pass the *same* sample lists to every call, or nothing is shared.

    Returns:
        a flat dict: :data:`METRICS`, ``false_trigger_rate``, ``clean_utility_undefended``,
        ``seconds_defended`` / ``seconds_undefended``, ``fit_seconds``, ``undefended_reused`` /
        ``fit_reused`` (whether those came from earlier work) and the settings (``defense`` =
        ``defense.to_dict()``, ``attack``, ``model``, ``n``, ``n_val``, ``seed``, ...).
    """
    from ..attacks import triggered_copy

    owner = "evaluate"
    if not isinstance(defense, Defense):
        raise InputError(f"{owner}: defense must be a cleansight_analysis.defenses.Defense, "
                         f"got {type(defense).__name__}")
    if attack is None:
        raise InputError(f"{owner}: an attack is needed to make the triggered test inputs")
    batch_size = _pos_int(batch_size, "batch_size", owner)
    max_new_tokens = _pos_int(max_new_tokens, "max_new_tokens", owner)
    seed = _pos_int(seed, "seed", owner, minimum=0)
    test = _samples(samples if samples is not None else synthetic_samples("test", _pos_int(n_test, "n_test", owner),
                                                                          seed), "samples", owner)
    if cache is not None and not isinstance(cache, EvaluationCache):
        raise InputError(f"{owner}: cache must be an EvaluationCache, got {type(cache).__name__}")
    fit_seconds = 0.0
    fit_reused = False
    n_val_used = 0
    if fit:
        val = _samples(val_samples if val_samples is not None
                       else synthetic_samples("calibration", _pos_int(n_val, "n_val", owner), seed),
                       "val_samples", owner)
        n_val_used = len(val)
        if cache is not None:
            fit_seconds, fit_reused = cache.fit(model, defense, val)
        else:
            t0 = time.perf_counter()
            defense.fit(model, val)
            fit_seconds = time.perf_counter() - t0
    triggered = triggered_copy(test, attack, seed=seed)
    baseline = NoDefense()
    run = dict(batch_size=batch_size, max_new_tokens=max_new_tokens)
    settings = dict(attack=attack, seed=seed, **run)
    reused = undefended is not None or cache is not None
    if undefended is not None:
        if not isinstance(undefended, UndefendedRuns):
            raise InputError(f"{owner}: undefended must be an UndefendedRuns, got {type(undefended).__name__}")
        undefended.check(model, test, **settings)
    elif cache is not None:
        undefended, reused = cache.undefended(model, test, warmup=warmup, progress=progress, **settings)
    plain_none = type(defense) is NoDefense
    if undefended is None:  # stand-alone call: the undefended baseline is run here, next to the defense
        if warmup:
            warm = test[:min(2, len(test))]
            run_defense(model, baseline, warm, progress=False, **run)
            run_defense(model, defense, warm, progress=False, **run)
        base = run_defense(model, baseline, test, progress=progress, desc="undefended (clean)", **run)
        clean = run_defense(model, defense, test, progress=progress, desc=f"{defense.name} (clean)", **run)
        trig = run_defense(model, defense, triggered, progress=progress, desc=f"{defense.name} (triggered)", **run)
    elif plain_none:  # the undefended runs are this row's runs
        base = clean = undefended.clean
        if undefended.triggered is None:
            undefended.triggered = run_defense(model, baseline, triggered, progress=progress,
                                               desc="undefended (triggered)", **run)
        trig = undefended.triggered
    else:
        base = undefended.clean
        if warmup:
            run_defense(model, defense, test[:min(2, len(test))], progress=False, **run)
        clean = run_defense(model, defense, test, progress=progress, desc=f"{defense.name} (clean)", **run)
        trig = run_defense(model, defense, triggered, progress=progress, desc=f"{defense.name} (triggered)", **run)
    row: dict[str, Any] = score_runs(clean, trig, test, _attack_target(attack))
    row["latency_ratio"] = clean.seconds / base.seconds if base.seconds > 0 else float("nan")
    row["clean_utility_undefended"] = _mean(utilities(base.texts, test))
    row.update({
        "seconds_defended": round(clean.seconds, 4), "seconds_undefended": round(base.seconds, 4),
        "fit_seconds": round(fit_seconds, 4), "undefended_reused": bool(reused), "fit_reused": bool(fit_reused),
        "defense": defense.to_dict(), "defense_name": defense.name, "attack": attack.to_dict(),
        "target": _attack_target(attack), "model": getattr(model, "name", None), "n": len(test),
        "n_val": n_val_used, "seed": seed, "max_new_tokens": max_new_tokens, "batch_size": batch_size,
    })
    return row


def _defaults(fn: Callable[..., Any]) -> dict[str, Any]:
    import inspect

    return {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.default is not inspect.Parameter.empty}


_EVALUATE_DEFAULTS = _defaults(evaluate)


# ---------------------------------------------------------------------------------------------
# Work shared between rows: undefended runs and fitted defenses
# ---------------------------------------------------------------------------------------------


#: Defense settings that change only generation, never what ``fit`` learns (read from ``defense.config``).
GENERATION_ONLY_SETTINGS: frozenset[str] = frozenset({"mask_scope"})


def _generation_only(defense: Defense) -> dict[str, Any]:
    """``{name: value}`` of :data:`GENERATION_ONLY_SETTINGS` found on ``defense.config`` (a dataclass)."""
    from dataclasses import fields, is_dataclass

    cfg = getattr(defense, "config", None)
    if cfg is None or not is_dataclass(cfg):
        return {}
    names = {f.name for f in fields(cfg)} & GENERATION_ONLY_SETTINGS
    return {n: getattr(cfg, n) for n in names}


def _samples_signature(samples: Sequence[Sample]) -> tuple:
    """What identifies a test set when undefended runs are checked: ids and prompts, in order."""
    return tuple((s.sample_id, s.prompt) for s in samples)


def _attack_signature(attack: Any) -> str:
    to_dict = getattr(attack, "to_dict", None)
    return json.dumps(to_dict() if callable(to_dict) else repr(attack), sort_keys=True, default=str)


@dataclass
class UndefendedRuns:
    """The undefended model (:class:`NoDefense`) on one test set, shared by every defense evaluated on it.

    Attributes:
        clean: the run on the clean test samples; its ``seconds`` is the latency baseline of every row.
        triggered: the run on their triggered copies (made when a ``none`` row first needs it), or None.
        model_name: ``model.name`` of the model that answered.
        signature: ``(sample ids and prompts, attack settings, seed, batch_size, max_new_tokens)``: what
            :meth:`check` compares before a row reuses these runs.
    """

    clean: ConditionRun
    triggered: ConditionRun | None = None
    model_name: Any = None
    signature: tuple = ()

    @staticmethod
    def make_signature(samples: Sequence[Sample], attack: Any, seed: int, batch_size: int,
                       max_new_tokens: int) -> tuple:
        return (_samples_signature(samples), _attack_signature(attack), int(seed), int(batch_size),
                int(max_new_tokens))

    def check(self, model: Any, samples: Sequence[Sample], *, attack: Any, seed: int, batch_size: int,
              max_new_tokens: int) -> None:
        """Raise :class:`InputError` unless these runs were made by this model on these settings."""
        want = self.make_signature(samples, attack, seed, batch_size, max_new_tokens)
        if self.signature != want or len(self.clean.texts) != len(samples):
            raise InputError("evaluate: the undefended runs were made on other test samples or settings "
                             "(samples, attack, seed, batch_size, max_new_tokens must match)")
        if self.model_name != getattr(model, "name", None):
            raise InputError(f"evaluate: the undefended runs come from model {self.model_name!r}, not "
                             f"{getattr(model, 'name', None)!r}")


def undefended_runs(model: Any, attack: Any, samples: Sequence[Sample] | None = None, *, n_test: int = 256,
                    seed: int = 0, batch_size: int = 32, max_new_tokens: int = 12, triggered: bool = True,
                    warmup: bool = True, progress: bool = True) -> UndefendedRuns:
    """The undefended runs of ``model`` on ``samples`` (default: ``n_test`` synthetic test samples) and, with
    ``triggered=True``, on their triggered copies; pass the result to :func:`evaluate` as ``undefended``."""
    from ..attacks import triggered_copy

    owner = "undefended_runs"
    seed = _pos_int(seed, "seed", owner, minimum=0)
    batch_size = _pos_int(batch_size, "batch_size", owner)
    max_new_tokens = _pos_int(max_new_tokens, "max_new_tokens", owner)
    test = _samples(samples if samples is not None else synthetic_samples("test", _pos_int(n_test, "n_test", owner),
                                                                          seed), "samples", owner)
    run = dict(batch_size=batch_size, max_new_tokens=max_new_tokens)
    baseline = NoDefense()
    if warmup:
        run_defense(model, baseline, test[:min(2, len(test))], progress=False, **run)
    out = UndefendedRuns(run_defense(model, baseline, test, progress=progress, desc="undefended (clean)", **run),
                         model_name=getattr(model, "name", None),
                         signature=UndefendedRuns.make_signature(test, attack, seed, batch_size, max_new_tokens))
    if triggered:
        out.triggered = run_defense(model, baseline, triggered_copy(test, attack, seed=seed), progress=progress,
                                    desc="undefended (triggered)", **run)
    return out


class EvaluationCache:
    """Work that several :func:`evaluate` calls on the same model can share (:func:`evaluation_grid` makes
    one per call; pass your own as ``cache=`` to share across tables).

    - **Undefended runs**, one per (model object, test sample objects, attack, seed, batch size,
      ``max_new_tokens``): greedy decoding is deterministic, so every defense's ``none`` baseline is the
      same run.
    - **Fitted defenses**, one per (model object, defense class and settings before ``fit``, validation
      sample objects), for classes that override :meth:`Defense.fit`: a later row gets a deep copy of the
      calibrated state instead of refitting. This assumes ``fit`` is a deterministic function of those
      (true for every defense of this package). :class:`AlwaysFlag` shares its inner detector's fit.
      Settings named in :data:`GENERATION_ONLY_SETTINGS` (CleanSight's ``mask_scope``) are left out of
      the key and keep the later defense's own value, so two CleanSights that differ only in where they
      mask share one calibration.

    Entries keep references to their model and samples, so keys (object ids) stay valid.
    ``stats`` counts computed and reused entries.
    """

    def __init__(self) -> None:
        self._undefended: dict[tuple, tuple[UndefendedRuns, tuple]] = {}
        self._fitted: dict[tuple, tuple[Defense | None, float, tuple]] = {}
        self.stats = {"undefended_computed": 0, "undefended_reused": 0, "fit_computed": 0, "fit_reused": 0}

    def __len__(self) -> int:
        return len(self._undefended) + len(self._fitted)

    def undefended(self, model: Any, samples: Sequence[Sample], *, attack: Any, seed: int, batch_size: int,
                   max_new_tokens: int, warmup: bool = True, progress: bool = True) -> tuple[UndefendedRuns, bool]:
        """``(runs, reused)``: the stored undefended runs for these inputs, made now if missing (clean run
        only; the triggered run is added by the first ``none`` row)."""
        samples = list(samples)
        key = (id(model), tuple(map(id, samples)), _attack_signature(attack), int(seed), int(batch_size),
               int(max_new_tokens))
        if key in self._undefended:
            self.stats["undefended_reused"] += 1
            return self._undefended[key][0], True
        runs = undefended_runs(model, attack, samples, seed=seed, batch_size=batch_size,
                               max_new_tokens=max_new_tokens, triggered=False, warmup=warmup, progress=progress)
        self._undefended[key] = (runs, (model, samples))
        self.stats["undefended_computed"] += 1
        return runs, False

    def fit(self, model: Any, defense: Defense, val: Sequence[Sample]) -> tuple[float, bool]:
        """Fit ``defense`` on ``val`` in place, or give it the calibrated state of an identical earlier fit.

        Returns:
            ``(fit seconds, reused)``; for a reused fit the seconds are those of the original fit.
        """
        if isinstance(defense, AlwaysFlag):
            return self.fit(model, defense.inner, val)
        val = list(val)
        if type(defense).fit is Defense.fit:  # nothing to calibrate
            t0 = time.perf_counter()
            defense.fit(model, val)
            return time.perf_counter() - t0, False
        try:
            settings = json.dumps({k: v for k, v in defense.to_dict().items() if k not in GENERATION_ONLY_SETTINGS},
                                  sort_keys=True, default=str)
        except Exception:  # noqa: BLE001 - an unserialisable defense is simply not shared
            settings = None
        key = (id(model), f"{type(defense).__module__}.{type(defense).__qualname__}", settings,
               tuple(map(id, val)))
        hit = self._fitted.get(key) if settings is not None else None
        if hit is not None and hit[0] is not None:
            own = _generation_only(defense)
            defense.__dict__.update(copy.deepcopy(hit[0]).__dict__)
            if own:  # keep this defense's own generation-only settings
                from dataclasses import replace

                defense.config = replace(defense.config, **own)
            self.stats["fit_reused"] += 1
            return hit[1], True
        t0 = time.perf_counter()
        defense.fit(model, val)
        seconds = time.perf_counter() - t0
        if settings is not None:
            try:
                snapshot = copy.deepcopy(defense)
            except Exception:  # noqa: BLE001 - not copyable: fit again next time
                snapshot = None
            self._fitted[key] = (snapshot, seconds, (model, val))
        self.stats["fit_computed"] += 1
        return seconds, False


# ---------------------------------------------------------------------------------------------
# Attention-key masking (the pruning mechanism of the ablations and the oracle tau sweep)
# ---------------------------------------------------------------------------------------------


def key_mask_hooks(model: Any, positions: Sequence[torch.Tensor], from_layer: int = 0) -> list:
    """``hook_attn_scores`` hooks that mask key ``positions[i]`` of sample ``i`` in layers >= ``from_layer``.

    The pre-softmax scores of those keys are set to the dtype's most negative finite value at prefill
    and at every decode step (keys never move in the KV cache), so every query of those layers gives
    them (numerically) zero attention. Samples with an empty position tensor run unchanged.
    """
    n_layers = int(model.n_layers)
    if not 0 <= int(from_layer) < n_layers:
        raise InputError(f"key_mask_hooks: from_layer={from_layer} is outside 0..{n_layers - 1}")
    pos = [torch.as_tensor(p, dtype=torch.long).reshape(-1) for p in positions]
    if not any(len(p) for p in pos):
        return []

    def fn(scores: torch.Tensor, hook: Any = None) -> torch.Tensor:
        if scores.shape[0] != len(pos):
            raise InputError(f"key_mask_hooks: built for {len(pos)} samples, saw scores of shape "
                             f"{tuple(scores.shape)}")
        low = torch.finfo(scores.dtype).min
        for i, p in enumerate(pos):
            if len(p):
                scores[i, :, :, p.to(scores.device)] = low
        return scores

    return model.lm_hooks("attn_scores", fn, layers=list(range(int(from_layer), n_layers)))


def attention_pruning_positions(model: Any, batch: Any, layer: int, tau: float) -> list[torch.Tensor]:
    """The pruning rule of ``cleansight-method.md`` §5: image keys whose attention from the last prompt
    token exceeds ``tau`` in any head of ``layer`` (``Omega = {j in I_vis : max_h alpha_{q,j} > tau}``)."""
    rows = model.attention_rows(batch, layers=[layer], query="last")
    values = rows.values[:, 0]  # [B, H, K]
    out = []
    for i, g in enumerate(batch.groups):
        img = g.image
        peak = values[i][:, img].amax(0)  # [n_vis]
        out.append(img[peak > tau].cpu())
    return out


class RandomPruning(Defense):
    """Table 3 ablation: mask a random ``fraction`` of every input's image tokens (no detection).

    Args:
        fraction: share of each sample's image tokens masked (the paper: 0.9).
        from_layer: first LM layer whose attention ignores them (default 0: every layer).
        seed: seed of the per-batch draws.
    """

    name = "random_pruning"
    kind = "purifier"

    def __init__(self, fraction: float = 0.9, from_layer: int = 0, seed: int = 0):
        if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0.0 <= fraction <= 1.0:
            raise InputError(f"RandomPruning: fraction={fraction!r} must be a number in [0, 1]")
        self.fraction = float(fraction)
        self.from_layer = _pos_int(from_layer, "from_layer", "RandomPruning", minimum=0)
        self.seed = _pos_int(seed, "seed", "RandomPruning", minimum=0)
        self._gen = torch.Generator().manual_seed(self.seed)

    def generate(self, model: Any, batch: Any, max_new_tokens: int = 12) -> DefenseOutput:
        pruned = []
        for g in batch.groups:
            img = g.image
            k = int(round(self.fraction * len(img)))
            pruned.append(img[torch.randperm(len(img), generator=self._gen)[:k]].sort().values)
        hooks = key_mask_hooks(model, pruned, self.from_layer)
        texts = model.generate(batch, max_new_tokens=max_new_tokens, hooks=hooks).texts
        return DefenseOutput(texts=texts, pruned=pruned, info={"fraction": self.fraction})

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "fraction": self.fraction, "from_layer": self.from_layer,
                "seed": self.seed}


def with_calibration(defense: Defense, **changes: Any) -> Defense:
    """A shallow copy of a fitted CleanSight-like defense whose ``calibration`` dataclass has ``changes``
    (e.g. ``gamma=-inf``: flag every input; ``tau=1e-3``: another pruning threshold)."""
    from dataclasses import is_dataclass, replace

    cal = getattr(defense, "calibration", None)
    if cal is None or not is_dataclass(cal):
        raise InputError(f"with_calibration: {defense!r} has no fitted calibration (call fit first)")
    out = copy.copy(defense)
    out.calibration = replace(cal, **changes)
    return out


class AlwaysFlag(Defense):
    """Table 3 ablation "no detection": the wrapped detector purifies every input, flagged or not.

    For CleanSight (a fitted ``calibration`` with ``gamma``) each call runs a copy with ``gamma = -inf``,
    so every input is flagged and pruned inside its one-pass hooks. Any other detector must decide what
    to purify by calling its own ``detect(model, batch)``: for the duration of each call that method is
    replaced by one that flags every sample. Scores are left untouched.

    Raises:
        InputError: the inner defense does not detect, or ignored the forced flags.
    """

    kind = "detector"

    def __init__(self, inner: Defense):
        if not isinstance(inner, Defense) or getattr(inner, "kind", None) != "detector":
            raise InputError(f"AlwaysFlag: needs a detector defense, got {inner!r}")
        self.inner = inner
        self.name = f"{inner.name}_no_detection"

    def fit(self, model: Any, clean_samples: Sequence[Any]) -> "AlwaysFlag":
        self.inner.fit(model, clean_samples)
        return self

    def prepare(self, model: Any, images: Sequence[Any], prompts: Sequence[str] | str) -> Any:
        return self.inner.prepare(model, images, prompts)

    def score(self, model: Any, batch: Any) -> torch.Tensor:
        return self.inner.score(model, batch)

    def detect(self, model: Any, batch: Any) -> torch.Tensor:
        return torch.ones(len(batch), dtype=torch.bool)

    def generate(self, model: Any, batch: Any, max_new_tokens: int = 12) -> DefenseOutput:
        cal = getattr(self.inner, "calibration", None)
        if cal is not None and hasattr(cal, "gamma"):  # CleanSight: detection runs inside its hooks
            out = with_calibration(self.inner, gamma=float("-inf")).generate(model, batch,
                                                                            max_new_tokens=max_new_tokens)
            return self._checked(out)
        had = "detect" in vars(self.inner)
        old = vars(self.inner).get("detect")
        self.inner.detect = self.detect  # type: ignore[method-assign]
        try:
            out = self.inner.generate(model, batch, max_new_tokens=max_new_tokens)
        finally:
            if had:
                self.inner.detect = old  # type: ignore[method-assign]
            else:
                del self.inner.detect
        return self._checked(out)

    def _checked(self, out: DefenseOutput) -> DefenseOutput:
        if out.flags is not None and not bool(torch.as_tensor(out.flags).all()):
            raise InputError(f"AlwaysFlag: {self.inner.name!r}.generate did not use detect(); cannot force "
                             "purification of every input")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "inner": self.inner.to_dict()}


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------

DefenseSpec = Any  # name | (name, settings) | Defense | () -> Defense
ModelSpec = Any  # registry name / folder | (model, attack) | (model, attack, card)


def make_defense(spec: DefenseSpec) -> Defense:
    """A fresh :class:`Defense` from a name, ``(name, settings)``, a factory or an instance (deep-copied)."""
    from ..defenses.registry import get_defense

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
    from .. import load_lvlm
    from ..attacks import attack_from_dict
    from ..models.registry import model_card

    card = model_card(spec)
    if not card or not card.get("attack"):
        raise InputError(f"model {spec!r} has no attack in its card; pass (model, attack) instead")
    return load_lvlm(spec, device=device), attack_from_dict(card["attack"]), card


def _defense_label(label: Any, defense: Defense) -> str:
    return label if isinstance(label, str) else defense.name


def _evaluate_default(name: str) -> Any:
    """Default of :func:`evaluate`'s keyword ``name`` (read once, when the module is imported)."""
    return _EVALUATE_DEFAULTS[name]


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
    seed = kwargs.get("seed", _evaluate_default("seed"))
    if kwargs.get("samples") is None:  # one sample list for every row, so the cache can match it
        n_test = _pos_int(kwargs.get("n_test", _evaluate_default("n_test")), "n_test", owner)
        kwargs["samples"] = synthetic_samples("test", n_test, _pos_int(seed, "seed", owner, minimum=0))
    if kwargs.get("val_samples") is None and kwargs.get("fit", True):
        n_val = _pos_int(kwargs.get("n_val", _evaluate_default("n_val")), "n_val", owner)
        kwargs["val_samples"] = synthetic_samples("calibration", n_val, _pos_int(seed, "seed", owner, minimum=0))
    kwargs["samples"] = _samples(kwargs["samples"], "samples", owner)
    if kwargs.get("val_samples") is not None:
        kwargs["val_samples"] = _samples(kwargs["val_samples"], "val_samples", owner)
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
    """Table 3: full CleanSight, no detection (:class:`AlwaysFlag`: prune every input) and random pruning
    of ``random_fraction`` of the image tokens (:class:`RandomPruning`), plus the undefended row.

    ``variants`` picks rows of :data:`ABLATION_VARIANTS` (e.g. leave out ``none`` / ``full`` when an
    attack x defense table already holds them)."""
    unknown = [v for v in variants if v not in ABLATION_VARIANTS]
    if unknown or not variants:
        raise InputError(f"module_ablation_table: variants {list(variants)!r} must be a non-empty subset of "
                         f"{ABLATION_VARIANTS}")
    every = {
        "none": "none",
        "full": cleansight,
        "no_detection": lambda: AlwaysFlag(make_defense(cleansight)),
        "random_pruning": lambda: RandomPruning(random_fraction, seed=int(kwargs.get("seed", 0))),
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


# ---------------------------------------------------------------------------------------------
# Detection sweeps from stealing features (no generation)
# ---------------------------------------------------------------------------------------------

#: ``condition`` labels of :func:`detection_table`.
DETECTION_CONDITIONS = ("calibration", "clean", "triggered")


def detection_table(model: Any, attack: Any, *, n_val: int = 200, n_test: int = 256, seed: int = 0,
                    samples: Sequence[Sample] | None = None, val_samples: Sequence[Sample] | None = None,
                    settings: Any = None, progress: bool = True) -> "pd.DataFrame":
    """Stealing rows (``sample_id, condition, layer, head, ratio, ...``) of the clean validation set
    (condition ``"calibration"``), the clean test set (``"clean"``) and its triggered copies
    (``"triggered"``): the input of every detection sweep."""
    import pandas as pd

    from ..attacks import triggered_copy
    from ..attention.stealing import stealing_table

    test = list(samples) if samples is not None else synthetic_samples("test", n_test, seed)
    val = list(val_samples) if val_samples is not None else synthetic_samples("calibration", n_val, seed)
    parts = [stealing_table(model, val, condition="calibration", settings=settings, progress=progress),
             stealing_table(model, test, condition="clean", settings=settings, progress=progress),
             stealing_table(model, triggered_copy(test, attack, seed=seed), condition="triggered",
                            settings=settings, progress=progress)]
    frame = pd.concat(parts, ignore_index=True)
    frame.attrs["stealing"] = {**parts[0].attrs.get("stealing", {}), "attack": attack.to_dict(), "seed": seed}
    return frame


def _feature_matrix(table: "pd.DataFrame", condition: str, layers: Sequence[int] | None, owner: str) -> np.ndarray:
    """``[n, |layers| * H]`` ratio vectors of ``condition`` (samples in first-seen order)."""
    for col in ("sample_id", "condition", "layer", "head", "ratio"):
        if col not in table.columns:
            raise InputError(f"{owner}: the table lacks column {col!r}; build it with detection_table")
    sub = table[table["condition"] == condition]
    if sub.empty:
        raise InputError(f"{owner}: no {condition!r} rows; conditions: {sorted(map(str, table['condition'].unique()))}")
    if layers is not None:
        layers = [int(x) for x in layers]
        unknown = sorted(set(layers) - set(sub["layer"].unique().tolist()))
        if unknown:
            raise InputError(f"{owner}: layer(s) {unknown} are not in the table")
        sub = sub[sub["layer"].isin(layers)]
    wide = sub.pivot_table(index="sample_id", columns=["layer", "head"], values="ratio", aggfunc="first",
                           sort=False)
    if wide.isna().any().any():
        raise InputError(f"{owner}: the {condition!r} rows miss some (layer, head) cells")
    order = list(dict.fromkeys(sub["sample_id"]))
    return wide.loc[order].to_numpy(dtype=np.float64)


def _diag_fit(x: np.ndarray, eps: float = 1e-8) -> tuple[np.ndarray, np.ndarray]:
    """Mean and ``1 / (population std + eps)`` (works for a single sample: std 0)."""
    return x.mean(0), 1.0 / (x.std(0) + eps)


def _diag_score(x: np.ndarray, fit: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    mu, inv = fit
    return np.sqrt((((x - mu) * inv) ** 2).sum(1))


def _check_quantile(q: Any, owner: str) -> float:
    if isinstance(q, bool) or not isinstance(q, numbers.Real) or not 0.0 <= float(q) <= 1.0:
        raise InputError(f"{owner}: quantile {q!r} must be a number in [0, 1]")
    return float(q)


def _rates(cal: np.ndarray, clean: np.ndarray, trig: np.ndarray, quantile: float) -> dict[str, float]:
    fit = _diag_fit(cal)
    gamma = float(np.quantile(_diag_score(cal, fit), quantile))
    return {"threshold": gamma, "tpr": float((_diag_score(trig, fit) > gamma).mean()),
            "fpr": float((_diag_score(clean, fit) > gamma).mean())}


def layer_window_sweep(table: "pd.DataFrame", *, starts: Sequence[int] | None = None,
                       lengths: Sequence[int] = (1, 2, 3, 4, 5)) -> "pd.DataFrame":
    """Fig. 4: AUROC of the diagonal-whitened detector vs start layer and window length.

    Fitted on the ``"calibration"`` rows, scored on ``"clean"`` (negatives) and ``"triggered"``
    (positives). Windows running past the last layer of the table are skipped.

    Returns:
        ``start, length, layers, auroc`` (one row per valid window).
    """
    import pandas as pd

    from ..attention.separability import auroc

    owner = "layer_window_sweep"
    all_layers = sorted(int(x) for x in table["layer"].unique())
    starts = all_layers if starts is None else [int(s) for s in starts]
    rows = []
    for s in starts:
        for n in lengths:
            n = _pos_int(n, "window length", owner)
            window = list(range(s, s + n))
            if not set(window) <= set(all_layers):
                continue
            cal, clean, trig = (_feature_matrix(table, c, window, owner) for c in DETECTION_CONDITIONS)
            fit = _diag_fit(cal)
            scores = np.r_[_diag_score(clean, fit), _diag_score(trig, fit)]
            rows.append({"start": s, "length": n, "layers": ",".join(map(str, window)),
                         "auroc": auroc(scores, np.r_[np.zeros(len(clean)), np.ones(len(trig))])})
    return pd.DataFrame(rows, columns=["start", "length", "layers", "auroc"])


def quantile_sweep(table: "pd.DataFrame", *, layers: Sequence[int] | None = None,
                   quantiles: Sequence[float] = QUANTILES) -> "pd.DataFrame":
    """Fig. 5 (left): TPR / FPR vs the threshold quantile ``q`` over the calibration distances.

    Scores are computed once; only the threshold moves, so FPR and TPR are non-increasing in ``q``.

    Returns:
        ``quantile, threshold, tpr, fpr, n_val``.
    """
    import pandas as pd

    owner = "quantile_sweep"
    cal, clean, trig = (_feature_matrix(table, c, layers, owner) for c in DETECTION_CONDITIONS)
    rows = [{"quantile": q, **_rates(cal, clean, trig, _check_quantile(q, owner)), "n_val": len(cal)}
            for q in quantiles]
    return pd.DataFrame(rows)


def val_size_sweep(table: "pd.DataFrame", *, layers: Sequence[int] | None = None, sizes: Sequence[int] = VAL_SIZES,
                   quantile: float = 0.99, repeats: int = 5, seed: int = 0) -> "pd.DataFrame":
    """Fig. 5 (right): TPR / FPR vs |D_val|: ``repeats`` random subsets of each size of the calibration rows
    (sizes above the available calibration samples are skipped).

    Returns:
        ``n_val, repeat, threshold, tpr, fpr`` (aggregate with ``groupby("n_val").mean()``).
    """
    import pandas as pd

    owner = "val_size_sweep"
    quantile = _check_quantile(quantile, owner)
    repeats = _pos_int(repeats, "repeats", owner)
    cal, clean, trig = (_feature_matrix(table, c, layers, owner) for c in DETECTION_CONDITIONS)
    rng = np.random.default_rng(seed)
    rows = []
    for size in sizes:
        size = _pos_int(size, "size", owner)
        if size > len(cal):
            continue
        for r in range(repeats if size < len(cal) else 1):
            idx = rng.choice(len(cal), size=size, replace=False)
            rows.append({"n_val": size, "repeat": r, **_rates(cal[idx], clean, trig, quantile)})
    return pd.DataFrame(rows, columns=["n_val", "repeat", "threshold", "tpr", "fpr"])


# ---------------------------------------------------------------------------------------------
# Oracle tau sweep (Fig. 6)
# ---------------------------------------------------------------------------------------------


def tau_sweep(model: Any, attack: Any, *, layer: int | None = None, taus: Sequence[float] = TAUS, n_test: int = 64, seed: int = 0,
              samples: Sequence[Sample] | None = None, batch_size: int = 32, max_new_tokens: int = 12,
              pruning: Callable[[Any, Any, int, float], list[torch.Tensor]] | None = None,
              defense: Defense | None = None, progress: bool = True) -> "pd.DataFrame":
    """Fig. 6: ASR and poisoned utility vs ``tau`` with an oracle detector (every triggered input flagged).

    Each triggered input is pruned with ``pruning(model, batch, layer, tau)`` (default
    :func:`attention_pruning_positions`, the §5 rule at the last detection layer ``layer``) and the
    keys are masked from ``layer`` on (:func:`key_mask_hooks`). With a fitted CleanSight ``defense``
    its own pruning runs instead (a copy with ``gamma = -inf`` and each ``tau``; ``layer`` is then
    its last detection layer, whatever is passed) so its ``mask_scope`` applies.

    Returns:
        ``tau, asr, poisoned_utility, mean_pruned, layer, n``.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    from ..attacks import triggered_copy

    owner = "tau_sweep"
    if defense is not None:
        layer = list(getattr(defense.calibration, "layers", [layer]))[-1]
    if layer is None:
        raise InputError(f"{owner}: give the pruning layer (the last detection layer) or a fitted CleanSight")
    layer = model.check_layers([layer])[0]
    pruning = pruning or attention_pruning_positions
    test = _samples(samples if samples is not None else synthetic_samples("test", _pos_int(n_test, "n_test", owner),
                                                                          seed), "samples", owner)
    trig = triggered_copy(test, attack, seed=seed)
    target = _attack_target(attack)
    texts: dict[float, list[str]] = {float(t): [] for t in taus}
    counts: dict[float, list[int]] = {float(t): [] for t in taus}
    for s in tqdm(range(0, len(trig), batch_size), desc="tau sweep", disable=not progress, mininterval=2.0):
        chunk = trig[s:s + batch_size]
        batch = model.prepare([_image_of(x) for x in chunk], [x.prompt for x in chunk])
        for tau in texts:
            if defense is not None:
                out = with_calibration(defense, gamma=float("-inf"), tau=tau).generate(
                    model, batch, max_new_tokens=max_new_tokens)
                texts[tau] += list(out.texts)
                counts[tau] += [int(torch.as_tensor(p).numel()) for p in (out.pruned or [])]
                continue
            pos = pruning(model, batch, layer, tau)
            hooks = key_mask_hooks(model, pos, layer)
            texts[tau] += model.generate(batch, max_new_tokens=max_new_tokens, hooks=hooks).texts
            counts[tau] += [len(p) for p in pos]
    rows = [{"tau": tau, "asr": rate(contains_target(t, target) for t in texts[tau]),
             "poisoned_utility": _mean(utilities(texts[tau], test)),
             "mean_pruned": float(np.mean(counts[tau])), "layer": layer, "n": len(test)} for tau in texts]
    return pd.DataFrame(rows)


def _nan_to_none(row: Mapping[str, Any]) -> dict[str, Any]:
    """JSON-safe copy of a result row (NaN -> None)."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}


__all__ = ["ABLATION_VARIANTS", "AlwaysFlag", "ConditionRun", "EvaluationCache", "GENERATION_ONLY_SETTINGS", "METRICS", "UndefendedRuns", "undefended_runs", "QUANTILES", "RandomPruning", "TAUS", "VAL_SIZES",
           "answer_utility", "utilities", "attack_defense_table", "attention_pruning_positions", "detection_table", "evaluate",
           "evaluation_grid", "key_mask_hooks", "layer_window_sweep", "make_defense", "mode_table",
           "module_ablation_table", "quantile_sweep", "resolve_model", "run_defense", "score_runs",
           "synthetic_samples", "tau_sweep", "val_size_sweep", "wide_table", "with_calibration"]
