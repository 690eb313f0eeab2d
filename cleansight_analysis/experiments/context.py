"""What every figure notebook shares: its parameters, model loading, samples, result caching, figure saving.

A notebook's ``parameters`` cell sets plain values (``model``, ``attacks``, ``n_samples``, ``seed``,
``device``, ``results_dir``, ``figures_dir``, ``smoke``, ``data``, ``recompute``) and builds one
:class:`FigureContext` from them::
    ctx = FigureContext(model=model, attacks=attacks, n_samples=n_samples, seed=seed, device=device,
                        results_dir=results_dir, figures_dir=figures_dir, smoke=smoke)
    table = ctx.cached("perturbation_sweep", lambda: perturbation_sweep(...), kinds=kinds, n=n)

``model`` is either a *family* (a folder under ``data/models`` such as ``"tiny-llava"``, with one member
per attack: ``tiny-llava/badnet``), a registry name or folder of one backdoored model whose card names
its attack, or a local folder holding one sub-folder per attack (``/models/llava-backdoors/badnet``).

Cached tables are keyed by their parameters, the code that computed them and the model files they came
from (see :meth:`FigureContext.cached`). Environment variables: ``CLEANSIGHT_RECOMPUTE=1`` recomputes every
table; ``CLEANSIGHT_CACHE_IGNORE_CODE=1`` reuses tables computed by other code (for changes that cannot
alter a number, e.g. a notebook's plotting cell or a docstring).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from datetime import datetime
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from filelock import FileLock

from .. import manifest as provenance
from ..attacks import attack_from_dict
from ..data.real import load_dataset_folder
from ..data.synthetic import synthetic_samples
from ..errors import CleanSightError, InputError
from ..evaluation.grid import resolve_model
from ..manifest import model_files_fingerprint, short
from ..models.registry import base_chain, lookup, model_card
from ..results import load_manifest, load_table, manifest_path, save_figure, save_table, verify_table

#: Sample counts used in smoke runs (``smoke=True``) whatever the notebook asks for.
SMOKE_SAMPLES = 8
#: Environment variable: reuse cached tables whatever code computed them (``1``).
IGNORE_CODE_ENV = "CLEANSIGHT_CACHE_IGNORE_CODE"


def _jsonable(value: Any) -> Any:
    """``value`` normalised the way it is stored in a manifest (tuples -> lists, numpy -> python)."""
    return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


@dataclass
class FigureContext:
    """Validated parameters of one figure notebook, plus helpers that use them.

    Attributes:
        model: family, single backdoored model or folder of per-attack folders (see module docstring).
        attacks: attack names, in the order figures show them (e.g. ``["badnet", "blended"]``).
        n_samples: test samples per condition in a full run (smoke runs use :data:`SMOKE_SAMPLES`).
        seed: seed of sample selection, calibration splits and random baselines.
        device: ``"cpu"`` or ``"cuda"``; dtype follows :func:`cleansight_analysis.load_lvlm`'s default.
        results_dir: where tables and their manifests are cached (one folder per notebook).
        figures_dir: where figures go as PNG + PDF.
        smoke: tiny sample counts, for tests (``make figures-smoke``).
        data: ``None`` for the synthetic world (the tiny family's data), or ``"<dataset>:<folder>"`` with a
            dataset of :func:`cleansight_analysis.data.load_dataset_folder` (``"vqav2:/data/vqav2"``).
        recompute: ignore cached tables (also set by the environment variable ``CLEANSIGHT_RECOMPUTE=1``).
            An ISO timestamp instead recomputes only tables created before it: ``cleansight figures
            --recompute`` passes its start time, so a table shared by several notebooks is computed once.
    """

    model: str = "tiny-llava"
    attacks: Sequence[str] = ("badnet",)
    n_samples: int = 256
    seed: int = 0
    device: str = "cpu"
    results_dir: str | os.PathLike = "../build/results"
    figures_dir: str | os.PathLike = "../figures"
    smoke: bool = False
    data: str | None = None
    recompute: bool | str = False
    log: Callable[[str], Any] = field(default=print, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise InputError(f"model must be a registry name, a family or a folder, got {self.model!r}")
        if isinstance(self.attacks, str):
            self.attacks = [self.attacks]
        self.attacks = [str(a) for a in self.attacks]
        if not self.attacks:
            raise InputError("attacks is empty: name at least one attack (e.g. ['badnet'])")
        if isinstance(self.n_samples, bool) or not isinstance(self.n_samples, int) or self.n_samples < 1:
            raise InputError(f"n_samples must be a positive integer, got {self.n_samples!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise InputError(f"seed must be an integer, got {self.seed!r}")
        if self.device not in ("cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise InputError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.data is not None and (not isinstance(self.data, str) or ":" not in self.data):
            raise InputError(f"data must be None (synthetic) or '<dataset>:<folder>', got {self.data!r}")
        self.results_dir = Path(self.results_dir)
        self.figures_dir = Path(self.figures_dir)
        self.smoke = bool(self.smoke)
        if isinstance(self.recompute, str):
            try:
                self._recompute_before = datetime.fromisoformat(self.recompute)
            except ValueError:
                raise InputError(f"recompute must be True/False or an ISO timestamp, got {self.recompute!r}") from None
            self.recompute = False
        else:
            self._recompute_before = None
            self.recompute = bool(self.recompute) or os.environ.get("CLEANSIGHT_RECOMPUTE", "") not in ("", "0")
        self._loaded: dict[str, tuple[Any, Any, dict]] = {}

    # ------------------------------------------------------------------ sizes
    def count(self, n: int | None = None) -> int:
        """Sample count to use: ``n`` (default ``n_samples``), or at most :data:`SMOKE_SAMPLES` when smoking."""
        n = self.n_samples if n is None else int(n)
        return min(n, SMOKE_SAMPLES) if self.smoke else n

    def settings(self) -> dict[str, Any]:
        """The notebook-level parameters, as stored in every manifest."""
        return {"model": self.model, "attacks": list(self.attacks), "n_samples": self.n_samples,
                "seed": self.seed, "device": self.device, "smoke": self.smoke, "data": self.data}

    # ------------------------------------------------------------------ models
    def model_spec(self, attack: str) -> str:
        """Registry name or folder of the model backdoored with ``attack``."""

        if lookup(f"{self.model}/{attack}") is not None:
            return f"{self.model}/{attack}"
        path = Path(self.model)
        if path.is_dir() and (path / attack).is_dir():
            return str(path / attack)
        card = self._card(self.model)
        if card is not None:
            named = (card.get("attack") or {}).get("name")
            if named is not None and named != attack:
                raise InputError(f"model {self.model!r} is backdoored with {named!r}, not {attack!r}; "
                                 f"set attacks=[{named!r}] or point model at a family folder")
            return self.model
        raise InputError(f"no model for attack {attack!r}: {self.model!r} is neither a family with a member "
                         f"{self.model}/{attack}, a folder with a sub-folder {attack!r}, nor a model with a card")

    def single_model_spec(self) -> str:
        """``model`` itself when it names one loadable model (registry entry, or a folder with a
        ``config.json``), else the member for the first attack (a family or a folder of per-attack folders)."""

        if lookup(self.model) is not None or (Path(self.model) / "config.json").is_file():
            return self.model
        return self.model_spec(self.attacks[0])

    @staticmethod
    def _card(spec: str) -> dict | None:
        return model_card(spec)

    def load(self, attack: str) -> tuple[Any, Any, dict]:
        """``(model, attack object, card)`` for ``attack``; the last loaded model is kept, others freed."""
        if attack not in self._loaded:
            self._loaded.clear()
            self._loaded[attack] = resolve_model(self.model_spec(attack), self.device)
        return self._loaded[attack]

    def attack_object(self, attack: str) -> Any:
        """The :class:`~cleansight_analysis.attacks.Attack` in the card of ``attack``'s model (no model load)."""

        spec = self.model_spec(attack)
        card = self._card(spec)
        if not card or not card.get("attack"):
            raise InputError(f"model {spec!r} has no attack in its card")
        return attack_from_dict(card["attack"])

    def model_fingerprints(self) -> dict[str, str | None]:
        """Per attack, the fingerprint of the model files on disk (its folder and the ``base`` folders of a
        delta model, :func:`~cleansight_analysis.manifest.model_files_fingerprint`), without loading a model.

        ``None`` for a model built by code (a registry builder such as ``tiny-random-llava``: the code
        fingerprint covers it) or one that cannot be resolved (loading it reports why).
        """

        def folder(spec: str) -> Path | None:
            entry = lookup(spec)
            if entry is not None:
                return entry.path
            return Path(spec) if Path(spec).is_dir() else None

        out: dict[str, str | None] = {}
        for attack in self.attacks:
            try:
                top = folder(self.model_spec(attack))
                if top is None:
                    out[attack] = None
                    continue
                try:
                    chain = [folder(link) for link in base_chain(top)]
                except CleanSightError:
                    chain = [top]
                prints = [model_files_fingerprint(f) for f in chain if f is not None]
            except (CleanSightError, OSError):
                out[attack] = None
                continue
            if len(prints) == 1:
                out[attack] = prints[0]
            else:
                out[attack] = "sha256:" + hashlib.sha256("\n".join(prints).encode()).hexdigest()
        return out

    # ------------------------------------------------------------------ samples
    def samples(self, split: str = "test", n: int | None = None, *, at_least: int = 0) -> list[Any]:
        """``count(n)`` samples of ``split`` (synthetic world, or the ``data`` folder's samples); never fewer than
        ``at_least``, smoke runs included (for a statistic that needs a minimum, such as a fitted probe)."""
        n = max(self.count(n), int(at_least))
        if self.data is None:
            return synthetic_samples(split, n, seed=self.seed)

        name, root = self.data.split(":", 1)
        offset = {"test": 0, "calibration": 1, "val": 1, "train": 2}.get(split, 0)
        items = load_dataset_folder(name, root, limit=n * 3, seed=self.seed)
        return list(items[offset::3])[:n]

    # ------------------------------------------------------------------ caching
    @property
    def shared_dir(self) -> Path:
        """Folder of tables several notebooks use (``<results_dir>/../shared``)."""
        return Path(self.results_dir).parent / "shared"

    def cached(self, name: str, compute: Callable[[], Any], *, model: Any = None, attack: Any = None,
               shared: bool = False, **params: Any) -> Any:
        """Load table ``name`` from ``results_dir`` if it was computed with the same parameters, else compute it.

        The cache key is ``params`` plus :meth:`settings` (model, attacks, sample count, seed, device, ...),
        compared as JSON with the ``params`` stored in the table's manifest (repository paths in it stored
        relative to the repository root, so a clone elsewhere reuses the shipped tables), plus two
        fingerprints stored next to them: ``code_fingerprint``, the package source
        (:func:`~cleansight_analysis.manifest.code_fingerprint`: every ``cleansight_analysis`` module but
        ``plotting``), and ``model_fingerprint``, the files of each attack's model folder
        (:meth:`model_fingerprints`). Editing any such module, or retraining a model, therefore recomputes
        the tables on their next use, each with one line saying so. Setting the environment variable
        ``CLEANSIGHT_CACHE_IGNORE_CODE=1`` reuses tables whatever code computed them (for a change that
        cannot alter a number); model files are always compared. ``compute()`` must
        return a pandas DataFrame. Prints whether the table was reused or computed. A cached table is used only
        when :func:`~cleansight_analysis.results.verify_table` accepts it (a manifest next to it whose sha256
        and row count match); anything else (missing, truncated, empty or edited table or manifest) is
        reported in one line and recomputed. ``shared=True`` keeps the table
        in :attr:`shared_dir` instead, so every notebook asking for it with the same parameters reuses one
        copy (e.g. the stealing rows behind Figs. 3-5), whichever notebook ran first (a table of one ``attack``
        is keyed without the notebook's attack list and with that attack's model files only); notebooks running at
        the same time (``cleansight figures --jobs 2``) take turns on it (a file lock), so it is computed once.
        """

        settings, models = self.settings(), self.model_fingerprints()
        if shared and isinstance(attack, str) and attack in models:
            # a shared per-attack table (e.g. one attack's stealing rows) depends on that attack's model, not on
            # which other attacks a notebook runs: notebooks with other attack lists reuse one copy
            settings = {k: v for k, v in settings.items() if k != "attacks"}
            models = {attack: models[attack]}
        key = provenance.portable(_jsonable({**settings, **params}))
        prints = {"code_fingerprint": provenance.code_fingerprint(), "model_fingerprint": models}
        out = self.shared_dir if shared else Path(self.results_dir)
        with _table_lock(out, name) if shared else contextlib.nullcontext():
            return self._cached(out, name, key, prints, compute, model=model, attack=attack, params=params)

    def _cached(self, out: Path, name: str, key: Any, prints: dict[str, Any], compute: Callable[[], Any], *,
                model: Any, attack: Any, params: dict[str, Any]) -> Any:
        if not self.recompute:
            table = self._reuse(out, name, key, prints)
            if table is not None:
                return table
        start = time.perf_counter()
        table = compute()
        seconds = time.perf_counter() - start
        path = save_table(table, out, name, model=model, attack=attack, seed=self.seed, settings=params,
                          params=key, seconds=round(seconds, 1), **prints)
        self.log(f"{name}: computed in {seconds:.1f} s -> {path}")
        return table

    def _reuse(self, out: Path, name: str, key: Any, prints: dict[str, Any]) -> Any:
        """The cached table ``name`` in ``out`` when it is valid and was made with ``key`` by the code and
        model files of ``prints``, else None (after logging one line that says why, unless nothing was
        cached)."""

        candidates = [out / f"{name}.{fmt}" for fmt in ("parquet", "csv")]
        mpath = manifest_path(candidates[0])
        present = [p for p in candidates if p.is_file()]
        if not present and not mpath.is_file():
            return None                                       # nothing cached: a first run
        path = present[0] if present else candidates[0]
        try:                                                  # the table the manifest names, if it is there
            named = out / str(load_manifest(path).get("table"))
            if named in present:
                path = named
        except InputError:
            pass                                              # verify_table reports it
        reason = verify_table(path)
        if reason is not None:
            self.log(f"{name}: cached {reason}; recomputing")
            return None
        manifest = load_manifest(path)
        if manifest.get("params") != key:
            self.log(f"{name}: cached results in {path} have other parameters; recomputing")
            return None
        note = ""
        stored_code, code = manifest.get("code_fingerprint"), prints["code_fingerprint"]
        if stored_code != code:
            if os.environ.get(IGNORE_CODE_ENV, "") in ("", "0"):
                self.log(f"{name}: cached table was computed by other code (package fingerprint "
                         f"{_short(stored_code)} != {_short(code)}; {IGNORE_CODE_ENV}=1 reuses it); recomputing")
                return None
            note = f"; computed by other code ({_short(stored_code)} != {_short(code)}), reused as {IGNORE_CODE_ENV}=1"
        stored_models, models = manifest.get("model_fingerprint"), prints["model_fingerprint"]
        if stored_models != models:
            self.log(f"{name}: cached table was computed from other model files ({_model_change(stored_models, models)})"
                     f"; recomputing")
            return None
        if self._recompute_before is not None:
            try:
                created = datetime.fromisoformat(str(manifest.get("created")))
                older = created < self._recompute_before
            except (TypeError, ValueError):
                older = True
            if older:
                self.log(f"{name}: cached before this run started; recomputing")
                return None
        try:
            table = load_table(path)
        except InputError as exc:
            self.log(f"{name}: cached {exc}; recomputing")
            return None
        self.log(f"{name}: reusing cached results {path} (computed {manifest.get('created')}, "
                 f"same parameters{note}; set recompute=True to redo)")
        return table

    # ------------------------------------------------------------------ figures
    def save_figure(self, fig: Any, name: str) -> list[Path]:
        """Save ``fig`` as ``<figures_dir>/<name>.png`` and ``.pdf``; prints and returns both paths."""

        paths = save_figure(fig, self.figures_dir / name)
        self.log("wrote " + ", ".join(str(p) for p in paths))
        return paths


def _short(fingerprint: Any) -> str:
    return short(fingerprint) if fingerprint is not None else "none recorded"


def _model_change(stored: Any, current: dict[str, Any]) -> str:
    """``"badnet: abc != def"`` for the first attack whose model files differ (or a summary)."""
    if not isinstance(stored, dict):
        return "no model fingerprint recorded"
    for attack in list(current) + [a for a in stored if a not in current]:
        if stored.get(attack) != current.get(attack):
            return f"{attack}: {_short(stored.get(attack))} != {_short(current.get(attack))}"
    return "attacks differ"  # pragma: no cover - dicts differ, so some attack does


def _table_lock(folder: Path, name: str):
    """An exclusive lock on ``<folder>/.<name>.lock`` (:class:`filelock.FileLock`: ``flock`` on POSIX,
    ``msvcrt`` locking on Windows), held by a ``with`` block."""

    folder.mkdir(parents=True, exist_ok=True)
    return FileLock(folder / f".{name}.lock")


def fmt_pct(value: float, digits: int = 1) -> str:
    """``0.123 -> '12.3 %'`` (NaN -> ``'n/a'``), for tables that put the paper's numbers next to ours."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * float(value):.{digits}f} %"


__all__ = ["FigureContext", "IGNORE_CODE_ENV", "SMOKE_SAMPLES", "fmt_pct"]
