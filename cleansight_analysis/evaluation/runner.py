"""Running defenses: one protocol for every defense (``docs/method.md#detection`` to ``#metrics``).

:func:`evaluate` is one row of Tables 1-4: it calibrates a :class:`~cleansight_analysis.defenses.Defense`
on clean validation samples, runs clean and triggered test inputs through ``defense.prepare`` +
``defense.generate`` (:func:`run_defense`) and scores them with the one scorer
(:func:`~cleansight_analysis.evaluation.scoring.score_runs`):

- ``asr``: share of triggered answers containing the target phrase (case-insensitive, aliases counted);
- ``clean_utility``: the task's utility of the clean answers (exact match, the VQA score when samples carry
  10 references, CIDEr-D for captions), the same quantity as Fig. 1 / 9's clean accuracy;
- ``poisoned_utility``: triggered answers scored against the *clean* references;
- ``tpr`` / ``fpr`` / ``auroc``: detection quality from the defense's flags / scores (NaN when it does
  not detect);
- ``mean_pruned``: mean number of image tokens masked per flagged sample (NaN when nothing prunes);
- ``latency_ratio``: defended / undefended wall time (``prepare`` + ``generate``) on the clean test
  inputs, the undefended run (:class:`~cleansight_analysis.defenses.NoDefense`) made in the same call or
  shared by every row of the model (:class:`UndefendedRuns`).

Work several rows of one model can share lives in an explicit :class:`EvaluationCache`: the undefended
runs (computed once per model and test set) and fitted defenses (a calibration fitted for one row is
handed, as a fitted copy, to every later row with the same fit settings). Reuse changes no answer, flag or
score; only the timing columns differ.

Under ``accelerate launch`` (:mod:`~cleansight_analysis.distributed`) every process makes the same
calls; :func:`run_defense` runs this process's share of the batches and gathers every share, so each
process holds the full runs and computes the same row.
"""

from __future__ import annotations

import copy
import json
import numbers
import time
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import distributed
from ..attacks import triggered_copy
from ..data.base import Sample, check_samples
from ..data.synthetic import synthetic_samples as world_samples
from ..defenses.ablations import AlwaysFlag
from ..defenses.base import Defense, DefenseOutput, NoDefense
from ..errors import InputError
from ..models.intervention import NoIntervention
from .scoring import mean_utility, score_runs, target_of

#: Metrics of one :func:`evaluate` row.
METRICS: tuple[str, ...] = ("asr", "clean_utility", "poisoned_utility", "tpr", "fpr", "auroc", "mean_pruned",
                            "latency_ratio")

_IDENTITY = NoIntervention()  # identity image transform: opens paths, converts to RGB


# ---------------------------------------------------------------------------------------------
# Small checks and default samples
# ---------------------------------------------------------------------------------------------


def check_int(value: Any, what: str, owner: str, *, minimum: int = 1) -> int:
    """``value`` as an int after checking it is an integer >= ``minimum`` (:class:`InputError` otherwise)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise InputError(f"{owner}: {what}={value!r} must be an int >= {minimum}")
    return int(value)


def sample_list(samples: Any, what: str, owner: str) -> list[Sample]:
    """A checked, non-empty list of :class:`Sample`."""
    return check_samples(samples, f"{owner} ({what})")


def synthetic_samples(split: str, n: int, seed: int = 0) -> list[Sample]:
    """``n`` samples of the tiny family's synthetic world (``split``: train, calibration or test)."""
    return world_samples(split, n, seed)


def image_of(sample: Sample) -> Any:
    """The sample's image(s) as RGB PIL image(s) (paths are opened)."""
    return _IDENTITY.transform(sample.image, where=f"sample {sample.sample_id!r} image")


# ---------------------------------------------------------------------------------------------
# Running a defense
# ---------------------------------------------------------------------------------------------


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


def _as_array(value: Any, b: int, what: str, name: str, dtype: Any) -> np.ndarray | None:
    if value is None:
        return None
    arr = (value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)).reshape(-1)
    if len(arr) != b:
        raise InputError(f"defense {name!r} returned {len(arr)} {what} for a batch of {b}")
    return arr.astype(dtype)


def run_defense(model: Any, defense: Defense, samples: Sequence[Sample], *, batch_size: int = 32,
                max_new_tokens: int = 12, progress: bool = True, desc: str = "defense",
                distribute: bool = True) -> ConditionRun:
    """``defense.prepare`` + ``defense.generate`` over ``samples`` in batches; per-sample outputs.

    Under ``accelerate launch`` (:mod:`~cleansight_analysis.distributed`) and with ``distribute``,
    each process runs its share of the batches and the shares are gathered back in sample order: every
    process returns the full run (``seconds``: the sum over processes, the same quantity as one process's
    total). Every process must make the same call. ``distribute=False`` runs every batch here (warm-up).

    Raises:
        InputError: the defense returns the wrong number of answers, flags, scores or pruned entries.
    """
    if distribute and distributed.launched():
        starts = distributed.my_batches(len(samples), batch_size)
        mine = [x for s in starts for x in samples[s:s + batch_size]]
        local = (_run_batches(model, defense, mine, batch_size=batch_size, max_new_tokens=max_new_tokens,
                              progress=progress and distributed.is_main(), desc=desc) if mine else None)
        return _merge(distributed.gather(local))
    return _run_batches(model, defense, samples, batch_size=batch_size, max_new_tokens=max_new_tokens,
                        progress=progress, desc=desc)


def _merge(parts: Sequence[ConditionRun | None]) -> ConditionRun:
    """One run from the processes' shares, in process (= sample) order; a process without samples gives None."""
    runs = [p for p in parts if p is not None]

    def cat(key: str) -> np.ndarray | None:
        arrs = [getattr(r, key) for r in runs]
        return np.concatenate(arrs) if runs and all(a is not None for a in arrs) else None

    return ConditionRun(texts=[t for r in runs for t in r.texts], flags=cat("flags"), scores=cat("scores"),
                        pruned=cat("pruned"), seconds=float(sum(r.seconds for r in runs)))


def _run_batches(model: Any, defense: Defense, samples: Sequence[Sample], *, batch_size: int,
                 max_new_tokens: int, progress: bool, desc: str) -> ConditionRun:
    """:func:`run_defense` in this process: every batch of ``samples``."""
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
        images = [image_of(x) for x in chunk]
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
            clean validation samples (in place, unless ``cache`` hands this row a fitted copy of an
            identical earlier fit: see :meth:`EvaluationCache.fit`).
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
            undefended runs when ``undefended`` is None, and fitted defenses. Pass the *same* sample lists
            to every call, or nothing is shared.

    Returns:
        a flat dict: :data:`METRICS`, ``false_trigger_rate``, ``clean_utility_undefended``,
        ``seconds_defended`` / ``seconds_undefended``, ``fit_seconds``, ``undefended_reused`` /
        ``fit_reused`` (whether those came from earlier work) and the settings (``defense`` =
        ``defense.to_dict()``, ``attack``, ``model``, ``n``, ``n_val``, ``seed``, ...).
    """
    owner = "evaluate"
    if not isinstance(defense, Defense):
        raise InputError(f"{owner}: defense must be a cleansight_analysis.defenses.Defense, "
                         f"got {type(defense).__name__}")
    if attack is None:
        raise InputError(f"{owner}: an attack is needed to make the triggered test inputs")
    batch_size = check_int(batch_size, "batch_size", owner)
    max_new_tokens = check_int(max_new_tokens, "max_new_tokens", owner)
    seed = check_int(seed, "seed", owner, minimum=0)
    test = sample_list(samples if samples is not None else synthetic_samples("test", check_int(n_test, "n_test", owner),
                                                                             seed), "samples", owner)
    if cache is not None and not isinstance(cache, EvaluationCache):
        raise InputError(f"{owner}: cache must be an EvaluationCache, got {type(cache).__name__}")
    fit_seconds = 0.0
    fit_reused = False
    n_val_used = 0
    if fit:
        val = sample_list(val_samples if val_samples is not None
                          else synthetic_samples("calibration", check_int(n_val, "n_val", owner), seed),
                          "val_samples", owner)
        n_val_used = len(val)
        with distributed.shared_work():  # launched: the calibration batches are shared out, the fit is one
            if cache is not None:
                fitted = cache.fit(model, defense, val)
                defense, fit_seconds, fit_reused = fitted.defense, fitted.seconds, fitted.reused
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
            run_defense(model, baseline, warm, progress=False, distribute=False, **run)
            run_defense(model, defense, warm, progress=False, distribute=False, **run)
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
            run_defense(model, defense, test[:min(2, len(test))], progress=False, distribute=False, **run)
        clean = run_defense(model, defense, test, progress=progress, desc=f"{defense.name} (clean)", **run)
        trig = run_defense(model, defense, triggered, progress=progress, desc=f"{defense.name} (triggered)", **run)
    target = target_of(attack)
    row: dict[str, Any] = score_runs(clean, trig, test, target)
    row["latency_ratio"] = clean.seconds / base.seconds if base.seconds > 0 else float("nan")
    row["clean_utility_undefended"] = mean_utility(base.texts, test)
    row.update({
        "seconds_defended": round(clean.seconds, 4), "seconds_undefended": round(base.seconds, 4),
        "fit_seconds": round(fit_seconds, 4), "undefended_reused": bool(reused), "fit_reused": bool(fit_reused),
        "defense": defense.to_dict(), "defense_name": defense.name, "attack": attack.to_dict(),
        "target": target, "model": getattr(model, "name", None), "n": len(test),
        "n_val": n_val_used, "seed": seed, "max_new_tokens": max_new_tokens, "batch_size": batch_size,
    })
    return row


# ---------------------------------------------------------------------------------------------
# Undefended runs, shared by every defense evaluated on one test set
# ---------------------------------------------------------------------------------------------


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
    owner = "undefended_runs"
    seed = check_int(seed, "seed", owner, minimum=0)
    batch_size = check_int(batch_size, "batch_size", owner)
    max_new_tokens = check_int(max_new_tokens, "max_new_tokens", owner)
    test = sample_list(samples if samples is not None else synthetic_samples("test", check_int(n_test, "n_test", owner),
                                                                             seed), "samples", owner)
    run = dict(batch_size=batch_size, max_new_tokens=max_new_tokens)
    baseline = NoDefense()
    if warmup:
        run_defense(model, baseline, test[:min(2, len(test))], progress=False, distribute=False, **run)
    out = UndefendedRuns(run_defense(model, baseline, test, progress=progress, desc="undefended (clean)", **run),
                         model_name=getattr(model, "name", None),
                         signature=UndefendedRuns.make_signature(test, attack, seed, batch_size, max_new_tokens))
    if triggered:
        out.triggered = run_defense(model, baseline, triggered_copy(test, attack, seed=seed), progress=progress,
                                    desc="undefended (triggered)", **run)
    return out


# ---------------------------------------------------------------------------------------------
# The evaluation cache: undefended runs and fitted defenses, shared between rows
# ---------------------------------------------------------------------------------------------


#: Defense settings that change only generation, never what ``fit`` learns (read from ``defense.config``).
GENERATION_ONLY_SETTINGS: frozenset[str] = frozenset({"mask_scope"})


def _generation_only(defense: Defense) -> dict[str, Any]:
    """``{name: value}`` of :data:`GENERATION_ONLY_SETTINGS` found on ``defense.config`` (a dataclass)."""
    cfg = getattr(defense, "config", None)
    if cfg is None or not is_dataclass(cfg):
        return {}
    names = {f.name for f in fields(cfg)} & GENERATION_ONLY_SETTINGS
    return {n: getattr(cfg, n) for n in names}


def _fit_settings(defense: Defense) -> str | None:
    """The defense's settings that ``fit`` depends on, as JSON (None: not serialisable, never shared)."""
    try:
        return json.dumps({k: v for k, v in defense.to_dict().items() if k not in GENERATION_ONLY_SETTINGS},
                          sort_keys=True, default=str)
    except Exception:  # noqa: BLE001 - an unserialisable defense is simply not shared
        return None


@dataclass
class FitResult:
    """What :meth:`EvaluationCache.fit` returns.

    Attributes:
        defense: the fitted defense to evaluate: the one passed in (fitted in place now), or a fitted copy
            of an identical earlier fit carrying the passed defense's generation-only settings.
        seconds: fit time (for a reused fit, that of the original fit).
        reused: whether the calibration came from an earlier fit.
    """

    defense: Defense
    seconds: float
    reused: bool


@dataclass
class _UndefendedEntry:
    runs: UndefendedRuns
    keep: tuple  # the model and samples whose ids make the key: kept alive so the ids stay valid


@dataclass
class _FitEntry:
    snapshot: Defense | None  # a deep copy of the defense right after fit (None: not copyable)
    seconds: float
    keep: tuple  # the model and validation samples whose ids make the key


@dataclass(eq=False, repr=False)
class EvaluationCache:
    """Work that several :func:`evaluate` calls on the same model can share (:func:`evaluation_grid` makes
    one per call; pass your own as ``cache=`` to share across tables).

    - **Undefended runs** (:meth:`undefended`), one per (model object, test sample objects, attack, seed,
      batch size, ``max_new_tokens``): greedy decoding is deterministic, so every defense's ``none``
      baseline is the same run.
    - **Fitted defenses** (:meth:`fit`), one per (model object, defense class and settings before ``fit``,
      validation sample objects), for classes that override :meth:`Defense.fit`: a later row gets a fitted
      deep copy of the stored defense instead of refitting. This assumes ``fit`` is a deterministic function
      of those (true for every defense of this package). :class:`AlwaysFlag` shares its inner detector's
      fit. Settings named in :data:`GENERATION_ONLY_SETTINGS` (CleanSight's ``mask_scope``) are left out of
      the key and the copy gets the later defense's own value, so two CleanSights that differ only in where
      they mask share one calibration.

    Entries keep references to their model and samples, so keys (object ids) stay valid.
    ``stats`` counts computed and reused entries.
    """

    undefended_entries: dict[tuple, _UndefendedEntry] = field(default_factory=dict)
    fit_entries: dict[tuple, _FitEntry] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=lambda: {"undefended_computed": 0, "undefended_reused": 0,
                                                           "fit_computed": 0, "fit_reused": 0})

    def __len__(self) -> int:
        return len(self.undefended_entries) + len(self.fit_entries)

    def __repr__(self) -> str:
        return (f"EvaluationCache({len(self.undefended_entries)} undefended, {len(self.fit_entries)} fitted, "
                f"{self.stats})")

    def undefended(self, model: Any, samples: Sequence[Sample], *, attack: Any, seed: int, batch_size: int,
                   max_new_tokens: int, warmup: bool = True, progress: bool = True) -> tuple[UndefendedRuns, bool]:
        """``(runs, reused)``: the stored undefended runs for these inputs, made now if missing (clean run
        only; the triggered run is added by the first ``none`` row)."""
        samples = list(samples)
        key = (id(model), tuple(map(id, samples)), _attack_signature(attack), int(seed), int(batch_size),
               int(max_new_tokens))
        entry = self.undefended_entries.get(key)
        if entry is not None:
            self.stats["undefended_reused"] += 1
            return entry.runs, True
        runs = undefended_runs(model, attack, samples, seed=seed, batch_size=batch_size,
                               max_new_tokens=max_new_tokens, triggered=False, warmup=warmup, progress=progress)
        self.undefended_entries[key] = _UndefendedEntry(runs, (model, samples))
        self.stats["undefended_computed"] += 1
        return runs, False

    def fit(self, model: Any, defense: Defense, val: Sequence[Sample]) -> FitResult:
        """``defense`` fitted on ``val``: fitted in place now, or a fitted copy of an identical earlier fit.

        Evaluate the returned :attr:`FitResult.defense`: when the fit is reused, the object passed in stays
        as it was.
        """
        if isinstance(defense, AlwaysFlag):
            inner = self.fit(model, defense.inner, val)
            wrapped = defense if inner.defense is defense.inner else AlwaysFlag(inner.defense)
            return FitResult(wrapped, inner.seconds, inner.reused)
        val = list(val)
        if type(defense).fit is Defense.fit:  # nothing to calibrate
            t0 = time.perf_counter()
            defense.fit(model, val)
            return FitResult(defense, time.perf_counter() - t0, False)
        settings = _fit_settings(defense)
        key = (id(model), f"{type(defense).__module__}.{type(defense).__qualname__}", settings,
               tuple(map(id, val)))
        entry = self.fit_entries.get(key) if settings is not None else None
        if entry is not None and entry.snapshot is not None:
            self.stats["fit_reused"] += 1
            return FitResult(self._fitted_copy(entry.snapshot, defense), entry.seconds, True)
        t0 = time.perf_counter()
        defense.fit(model, val)
        seconds = time.perf_counter() - t0
        if settings is not None:
            try:
                snapshot = copy.deepcopy(defense)
            except Exception:  # noqa: BLE001 - not copyable: fit again next time
                snapshot = None
            self.fit_entries[key] = _FitEntry(snapshot, seconds, (model, val))
        self.stats["fit_computed"] += 1
        return FitResult(defense, seconds, False)

    @staticmethod
    def _fitted_copy(snapshot: Defense, defense: Defense) -> Defense:
        """A deep copy of the stored fitted ``snapshot`` with ``defense``'s own generation-only settings."""
        out = copy.deepcopy(snapshot)
        own = _generation_only(defense)
        if own:
            out.config = replace(out.config, **own)
        return out


__all__ = ["ConditionRun", "EvaluationCache", "FitResult", "GENERATION_ONLY_SETTINGS", "METRICS", "UndefendedRuns",
           "check_int", "evaluate", "image_of", "run_defense", "sample_list", "synthetic_samples",
           "undefended_runs"]
