"""CleanSight's settings (:class:`CleanSightConfig`), what ``fit`` learns (:class:`Calibration`) and the
schema of saved calibration files (every check raises :class:`~cleansight_analysis.errors.CalibrationError`
with one line naming the file, the key, the bad value and what is accepted).

The detector's settings (``feature``, ``whitening``, ``threshold_fit``, ``folds``, ``quantile``,
``text_keys``, ``eps``, ``log_eps``, ``sigma_eps``) are checked by the same annotated types as
:class:`~cleansight_analysis.detection.DetectorSettings` (:mod:`cleansight_analysis.detection.detector`).
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Annotated, Any, Literal, Sequence, Union

import numpy as np
import torch
from pydantic import BeforeValidator

from ..detection.detector import (THRESHOLD_FITS, DetectorSettings, EpsSetting, FeatureSetting, FoldsSetting,
                                  LogEpsSetting, SigmaEpsSetting, TextKeysSetting, ThresholdFitSetting, WhiteningSetting)
from ..detection.features import FEATURE_WIDTH, FEATURES, TEXT_GROUPS
from ..detection.passes import MASK_SCOPES
from ..detection.whitening import WHITENINGS, Whitener
from ..errors import CalibrationError, InputError
from ..models.fingerprint import ALGORITHM
from ..settings import Field, PositiveInt, Unit01, settings

#: Query rows the detector reads: the last prompt token, or also every generated token.
QUERIES: tuple[str, ...] = ("last", "generated")
#: Format tag and version of saved calibration files.
FILE_FORMAT = "cleansight-calibration"
#: 2: calibration.model carries the weights fingerprint; 3: feature / whitening / threshold_fit (+ matrix).
FILE_VERSION = 3


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(float(x))


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


def _layers(value: Any) -> Any:
    """``layers``: ``"auto"``, or layer indices (an int, a list / tuple / tensor of ints) -> sorted unique list."""
    own = "CleanSightConfig"
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, str):
        if value != "auto":
            raise InputError(f"{own}: layers={value!r} must be 'auto' or a list of layer indices")
        return value
    if _is_int(value):
        return [int(value)]
    if not isinstance(value, (list, tuple)) or not value:
        raise InputError(f"{own}: layers={value!r} must be 'auto' or a non-empty list of ints")
    bad = [x for x in value if not _is_int(x)]
    if bad:
        raise InputError(f"{own}: layers must be ints, got {bad!r}")
    return sorted({int(x) for x in value})


@settings
class CleanSightConfig:
    """Every setting of CleanSight (checked on construction, see :mod:`cleansight_analysis.settings`;
    ``to_dict`` / ``from_dict`` for files).

    ``CleanSightConfig.paper()`` is the paper's detector (``feature="ratio"``, ``whitening="diagonal"``,
    ``threshold_fit="in_sample"``); the defaults differ where measurement showed the paper's choice breaks a
    promise (docs/detector.md).

    Attributes:
        layers: LM detection layers (0-indexed ints; negative count from the end and are resolved
            against the model in ``fit``), or ``"auto"``: :func:`select_detection_layers` with the
            fusion-onset rule on the clean calibration set and a window of ``window`` layers. The last
            (largest) layer is ``l_e``, where Omega is built.
        feature: the per-head feature (:mod:`cleansight_analysis.detection.features`): ``"ratio"`` (the
            paper's S = image mass / (text mass + eps)), ``"log_ratio"`` (log(image + log_eps) -
            log(text + log_eps)) or ``"masses"`` (image and text mass, two values per head).
        whitening: ``"diagonal"`` (per-dimension mu and sigma, the paper's) or ``"ledoit_wolf"``
            (Mahalanobis distance with a Ledoit-Wolf shrunk covariance of the standardised features).
        threshold_fit: ``"cross_fit"`` (``folds``-fold cross-fitting: gamma is the ``quantile`` of
            out-of-fold clean distances, so it holds on new clean inputs) or ``"in_sample"`` (the paper's:
            the calibration samples' distances to a whitening fitted on themselves, which are too small).
        folds: folds of ``"cross_fit"`` (``min(folds, n)`` are used).
        quantile: ``gamma`` is this quantile of the clean calibration distances (paper: 0.99).
        tau: Omega threshold on ``max_h alpha^{l_e,h}_{q,j}``: a float in (0, 1] (paper/code 1e-4,
            paper's suggested balance 1e-3, released package 0.02), or ``"auto"``: calibrated on the
            clean set as the ``tau_quantile`` quantile of the pooled per-image-token values
            ``max_h alpha^{l_e,h}_{q,j}`` over every clean calibration sample and image token, i.e.
            about ``1 - tau_quantile`` of clean image tokens would be pruned; tokens attended to
            more than clean inputs ever attend to an image token are the thieves. Default ``1e-4``, the
            value of the paper's implementation details and code: a flagged input keeps only the image
            tokens its last detection layer barely attends to. On the embedded family (Fig. 6, oracle
            detector) it is the largest swept value at which no attack keeps its backdoor; the paper's
            "balance" ``1e-3`` leaves part of TrojVLM's, and ``"auto"`` leaves more than half of the
            undefended ASR for five of the six attacks (``docs/method.md#tau``).
        tau_quantile: see ``tau="auto"``.
        text_keys: denominator of the ratio: ``"post_image"`` (every key after the image block:
            instruction + template tail; the authors' code) or ``"instruction"`` (the prompt
            tokens only; the paper's text).
        mask_scope: where Omega is masked for flagged samples. ``"reference"`` (default, the authors'
            code): prefill in ``l_e`` and every later layer, and every layer at every decode step.
            ``"from_detection"``: ``l_e`` and later layers, at prefill and at decode steps.
            ``"prefill_only"``: ``l_e`` and later layers at prefill; decode steps are unmasked.
            ``"all_layers"``: every layer at prefill and at decode steps. Omega is not known before
            ``l_e`` in a single pass, so this scope costs a second, partial forward pass (detection up
            to ``l_e``, then generation with the mask in place): the one documented exception to the
            one-pass design. With the other scopes, layers before ``l_e`` are never masked at prefill.
        query: ``"last"`` (default): the last prompt token (the query predicting the first answer token).
            ``"generated"``: also every decoding query (the paper's "current decoding query"): the detector
            scores the prefill row and each generated token's row; a sample is flagged at the first step
            whose distance exceeds ``gamma``, Omega comes from that step's ``l_e`` row, and the mask applies
            from there on (``l_e`` and later layers of that step, then every later step per ``mask_scope``).
            ``fit`` then generates ``calibration_tokens`` tokens per clean sample: the whitening pools every
            valid step's features, and ``gamma`` is the quantile of each sample's largest distance (so the
            per-sample false-positive rate stays ``1 - quantile``; cross-fitting keeps a sample's steps in one
            fold). Works with ``mask_scope`` ``"reference"`` and ``"from_detection"``; ``score``/``detect`` run
            an unmasked generation of ``calibration_tokens`` tokens and return each sample's largest distance.
        calibration_tokens: tokens generated per clean sample by ``fit`` with ``query="generated"``.
        eps: added to the ratio's denominator (paper: 1e-12).
        log_eps: added to both masses inside ``feature="log_ratio"``'s logarithms.
        sigma_eps: added to each ``sigma`` (paper: 1e-8): the floor that keeps zero-variance dims finite.
        window: number of layers chosen by ``layers="auto"``.
        batch_size: samples per forward pass in ``fit``.
    """

    layers: Annotated[Any, BeforeValidator(_layers)] = "auto"
    feature: FeatureSetting = DetectorSettings.feature
    whitening: WhiteningSetting = DetectorSettings.whitening
    threshold_fit: ThresholdFitSetting = DetectorSettings.threshold_fit
    folds: FoldsSetting = DetectorSettings.folds
    quantile: Unit01 = 0.99
    tau: Annotated[Union[Literal["auto"], Unit01], Field(description="must be a number in (0, 1] or 'auto'")] = 1e-4
    tau_quantile: Unit01 = 0.99
    text_keys: TextKeysSetting = "post_image"
    mask_scope: Annotated[Literal[MASK_SCOPES], Field(description=f"must be one of {MASK_SCOPES}")] = "reference"
    query: Annotated[Literal[QUERIES], Field(description=f"must be one of {QUERIES} ('last': the last prompt token; "
                                                         "'generated': also every decoding query)")] = "last"
    calibration_tokens: PositiveInt = 8
    eps: EpsSetting = DetectorSettings.eps
    log_eps: LogEpsSetting = DetectorSettings.log_eps
    sigma_eps: SigmaEpsSetting = DetectorSettings.sigma_eps
    window: PositiveInt = 3
    batch_size: PositiveInt = 16

    def __post_init__(self) -> None:
        if self.query == "generated" and self.mask_scope in ("prefill_only", "all_layers"):
            raise InputError(f"CleanSightConfig: query='generated' flags samples during decoding, which mask_scope="
                             f"{self.mask_scope!r} cannot act on; use mask_scope='reference' or 'from_detection'")

    @classmethod
    def paper(cls, **changes: Any) -> "CleanSightConfig":
        """The paper's detector: ``feature="ratio"``, ``whitening="diagonal"``, ``threshold_fit="in_sample"``
        (every other setting as given, else its default)."""
        return cls(**{"feature": "ratio", "whitening": "diagonal", "threshold_fit": "in_sample", **changes})

    @property
    def text_groups(self) -> tuple[str, ...]:
        return TEXT_GROUPS[self.text_keys]

    @property
    def detector(self) -> DetectorSettings:
        """The detector's settings as a :class:`~cleansight_analysis.detection.DetectorSettings`."""
        return DetectorSettings(**{f.name: getattr(self, f.name) for f in fields(DetectorSettings)})

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["layers"] = self.layers if isinstance(self.layers, str) else list(self.layers)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CleanSightConfig":
        if not isinstance(data, dict):
            raise InputError(f"CleanSightConfig.from_dict: expected a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"CleanSightConfig: unknown setting(s) {unknown}; settings: {sorted(known)}")
        return cls(**data)


@dataclass
class Calibration:
    """What ``fit`` learns (all saved by :meth:`CleanSight.save`).

    Attributes:
        model: ``{"name", "n_layers", "n_heads", "fingerprint"}`` of the calibrated model (``fingerprint``:
            :func:`~cleansight_analysis.models.fingerprint.weights_fingerprint` of its weights at ``fit``).
        layers: the detection layers (ascending); ``layers[-1]`` is ``l_e``.
        mu, sigma: ``[D]`` per-dimension mean and population std of the clean features (float64),
            ``D = |layers| x n_heads x`` the feature's values per head.
        gamma: the detection threshold (``quantile`` of ``clean_distances``).
        tau: the Omega threshold used; ``tau_source``: ``"fixed"`` or ``"auto"``.
        clean_distances: ``[N]`` the clean distances ``gamma`` came from: out-of-fold under
            ``threshold_fit="cross_fit"``, in-sample under ``"in_sample"``.
        layer_source: ``"given"`` or the selector rule used for ``layers="auto"``.
        feature, whitening, threshold_fit: the detector settings the numbers belong to.
        matrix: ``[D, D]`` whitening matrix of ``whitening="ledoit_wolf"`` (``None`` for ``"diagonal"``).
    """

    model: dict[str, Any]
    layers: list[int]
    mu: np.ndarray
    sigma: np.ndarray
    gamma: float
    tau: float
    tau_source: str
    clean_distances: np.ndarray
    layer_source: str = "given"
    extra: dict[str, Any] = field(default_factory=dict)
    feature: str = "ratio"
    whitening: str = "diagonal"
    threshold_fit: str = "in_sample"
    matrix: np.ndarray | None = None
    sigma_eps: float = DetectorSettings.sigma_eps

    @property
    def n_samples(self) -> int:
        return int(len(self.clean_distances))

    def whitener(self) -> Whitener:
        """The fitted :class:`~cleansight_analysis.detection.Whitener` these numbers describe."""
        return Whitener.from_params(self.whitening, self.mu, self.sigma, self.matrix, sigma_eps=self.sigma_eps)

    def to_dict(self) -> dict[str, Any]:
        out = {"model": dict(self.model), "layers": list(self.layers), "mu": self.mu.tolist(),
               "sigma": self.sigma.tolist(), "gamma": float(self.gamma), "tau": float(self.tau),
               "tau_source": self.tau_source, "clean_distances": self.clean_distances.tolist(),
               "feature": self.feature, "whitening": self.whitening, "threshold_fit": self.threshold_fit,
               "n_samples": self.n_samples, "layer_source": self.layer_source, "extra": dict(self.extra)}
        if self.matrix is not None:
            out["matrix"] = np.asarray(self.matrix).tolist()
        return out

    @classmethod
    def from_dict(cls, d: Any, *, where: str = "Calibration.from_dict", key: str = "calibration") -> "Calibration":
        """Validate and read the ``calibration`` section of a file (see :func:`_check_calibration`).

        Raises:
            CalibrationError: one line naming ``where``, the key, the bad value and what is accepted.
        """
        return _check_calibration(d, where, key)


# ---------------------------------------------------------------------------------------------
# Calibration file schema (every check raises CalibrationError, an InputError, with one line)
# ---------------------------------------------------------------------------------------------


#: Keys of the ``calibration`` section that must be present (``n_samples``, ``layer_source``, ``extra`` may be absent;
#: ``matrix`` is present exactly when ``whitening == "ledoit_wolf"``).
CALIBRATION_KEYS: tuple[str, ...] = ("model", "layers", "mu", "sigma", "gamma", "tau", "tau_source", "clean_distances",
                                     "feature", "whitening", "threshold_fit")
OPTIONAL_KEYS: tuple[str, ...] = ("n_samples", "layer_source", "extra", "matrix")
#: Keys of the model identity (``calibration.model``).
MODEL_KEYS: tuple[str, ...] = ("name", "n_layers", "n_heads", "fingerprint")
#: Keys of the file's top level that must be present (``model``: name/n_layers/n_heads, and ``layers`` are copies
#: that must agree with the calibration's if present).
FILE_KEYS: tuple[str, ...] = ("format", "version", "config", "calibration")
TAU_SOURCES: tuple[str, ...] = ("fixed", "auto")
_RECALIBRATE = "recalibrate: CleanSight(...).fit(model, clean_samples).save(path)"


def _fail(where: str, msg: str) -> CalibrationError:
    return CalibrationError(" ".join(f"{where}: {msg}".split()))  # always one line


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _need(d: dict, keys: Sequence[str], where: str, prefix: str) -> None:
    for k in keys:
        if k not in d:
            raise _fail(where, f"missing key '{prefix}{k}' (a file written by save() has it; {_RECALIBRATE})")


def _mapping(v: Any, where: str, key: str) -> dict:
    if not isinstance(v, dict):
        raise _fail(where, f"{key}={_show(v)} must be a mapping (an object of keys)")
    return v


def _int(v: Any, where: str, key: str, lo: int) -> int:
    if not _is_int(v) or v < lo:
        raise _fail(where, f"{key}={_show(v)} must be an int >= {lo}")
    return int(v)


def _number(v: Any, where: str, key: str, accepted: str, ok: Any) -> float:
    """A finite real number (not a bool) with ``ok(float(v))`` true."""
    if not _is_real(v) or not ok(float(v)):
        extra = " (NaN and Infinity are not accepted)" if isinstance(v, float) and not math.isfinite(v) else ""
        raise _fail(where, f"{key}={_show(v)} is not accepted: must be {accepted}{extra}")
    return float(v)


def _vector(v: Any, where: str, key: str, accepted: str, ok: Any) -> np.ndarray:
    """A flat list of finite reals, each with ``ok(x)`` true, as float64."""
    if not isinstance(v, (list, tuple)):
        raise _fail(where, f"{key} must be a list of numbers, got {type(v).__name__} {_show(v)}")
    for i, x in enumerate(v):
        if not _is_real(x) or not ok(float(x)):
            extra = " (NaN and Infinity are not accepted)" if isinstance(x, float) and not math.isfinite(x) else ""
            raise _fail(where, f"{key}[{i}]={_show(x)} is not accepted: every entry must be {accepted}{extra}")
    return np.asarray([float(x) for x in v], dtype=np.float64)


def _check_identity(m: Any, where: str, key: str) -> dict[str, Any]:
    m = _mapping(m, where, key)
    _need(m, MODEL_KEYS[:3], where, f"{key}.")
    if "fingerprint" not in m:
        raise _fail(where, f"missing key '{key}.fingerprint': the file has no fingerprint of the model weights "
                    f"(written before fingerprints, or edited), so it cannot be bound to a model; {_RECALIBRATE}")

    name, fp = m["name"], m["fingerprint"]
    if not isinstance(name, str) or not name:
        raise _fail(where, f"{key}.name={_show(name)} must be a non-empty string (the model's source)")
    if not isinstance(fp, str) or not re.fullmatch(rf"{re.escape(ALGORITHM)}:[0-9a-f]{{64}}", fp):
        raise _fail(where, f"{key}.fingerprint={_show(fp)} must be '{ALGORITHM}:' + 64 hex digits "
                    f"(from weights_fingerprint); {_RECALIBRATE}")
    out = {"name": name, "n_layers": _int(m["n_layers"], where, f"{key}.n_layers", 1),
           "n_heads": _int(m["n_heads"], where, f"{key}.n_heads", 1), "fingerprint": fp}
    unknown = sorted(set(m) - set(MODEL_KEYS))
    if unknown:
        raise _fail(where, f"{key} has unknown key(s) {unknown}; accepted: {list(MODEL_KEYS)}")
    return out


def _check_calibration(d: Any, where: str, key: str = "calibration") -> "Calibration":
    """Every check of the ``calibration`` section; returns the :class:`Calibration`."""
    d = _mapping(d, where, key)
    _need(d, CALIBRATION_KEYS, where, f"{key}.")
    model = _check_identity(d["model"], where, f"{key}.model")
    n_layers, n_heads = model["n_layers"], model["n_heads"]
    raw = d["layers"]
    if not isinstance(raw, (list, tuple)) or not raw:
        raise _fail(where, f"{key}.layers={_show(raw)} must be a non-empty list of layer indices")
    layers = []
    for i, x in enumerate(raw):
        if not _is_int(x) or not 0 <= x < n_layers:
            raise _fail(where, f"{key}.layers[{i}]={_show(x)} is not accepted: layers must be ints in "
                        f"[0, {n_layers - 1}] ({key}.model.n_layers={n_layers})")
        if layers and x <= layers[-1]:
            raise _fail(where, f"{key}.layers={_show(list(raw))} must be strictly ascending (unique; the last is "
                        "l_e, where Omega is built)")
        layers.append(int(x))
    for name, accepted in (("feature", FEATURES), ("whitening", WHITENINGS), ("threshold_fit", THRESHOLD_FITS)):
        if d[name] not in accepted:
            raise _fail(where, f"{key}.{name}={_show(d[name])} must be one of {accepted}")
    width = FEATURE_WIDTH[d["feature"]]
    dim = len(layers) * n_heads * width
    per_head = "" if width == 1 else f" x {width} values per head (feature {d['feature']!r})"
    vecs = {}
    for name, accepted, ok in (("mu", "a finite number", lambda x: True),
                               ("sigma", "a finite number > 0 (a population std; 0 means a clean feature never "
                                         "varied, so nearly every input would be flagged)", lambda x: x > 0)):
        v = d[name]
        if isinstance(v, (list, tuple)) and len(v) != dim:
            raise _fail(where, f"{key}.{name} has {len(v)} values; expected len({key}.layers) x {key}.model.n_heads "
                        f"{per_head} = {len(layers)} x {n_heads}{f' x {width}' if width > 1 else ''} = {dim}")
        vecs[name] = _vector(v, where, f"{key}.{name}", accepted, ok)
    matrix = None
    if (d["whitening"] == "ledoit_wolf") != ("matrix" in d):
        need = "needs" if d["whitening"] == "ledoit_wolf" else "takes no"
        raise _fail(where, f"{key}.whitening={d['whitening']!r} {need} key '{key}.matrix' (the [D, D] whitening matrix)")
    if "matrix" in d:
        raw_m = d["matrix"]
        if not isinstance(raw_m, (list, tuple)) or len(raw_m) != dim:
            raise _fail(where, f"{key}.matrix must be a list of {dim} rows of {dim} numbers")
        matrix = np.stack([_vector(r, where, f"{key}.matrix[{i}]", "a finite number", lambda x: True)
                           for i, r in enumerate(raw_m)])
        if matrix.shape != (dim, dim):
            raise _fail(where, f"{key}.matrix has shape {matrix.shape}; expected ({dim}, {dim})")
    gamma = _number(d["gamma"], where, f"{key}.gamma",
                    "a finite number >= 0 (the threshold on whitened distances, which are >= 0)", lambda x: x >= 0)
    tau = _number(d["tau"], where, f"{key}.tau",
                  "a number in (0, 1] (the threshold on an attention weight; >= 1 prunes nothing)",
                  lambda x: 0.0 < x <= 1.0)
    if d["tau_source"] not in TAU_SOURCES:
        raise _fail(where, f"{key}.tau_source={_show(d['tau_source'])} must be one of {TAU_SOURCES}")
    dist = _vector(d["clean_distances"], where, f"{key}.clean_distances", "a finite number >= 0", lambda x: x >= 0)
    if len(dist) < 2:
        raise _fail(where, f"{key}.clean_distances has {len(dist)} values; fit() needs at least 2 clean samples")
    if "n_samples" in d and (not _is_int(d["n_samples"]) or d["n_samples"] != len(dist)):
        raise _fail(where, f"{key}.n_samples={_show(d['n_samples'])} must equal len({key}.clean_distances) "
                    f"= {len(dist)}")
    layer_source = d.get("layer_source", "given")
    if not isinstance(layer_source, str):
        raise _fail(where, f"{key}.layer_source={_show(layer_source)} must be a string")
    extra = d.get("extra") or {}
    if not isinstance(extra, dict):
        raise _fail(where, f"{key}.extra={_show(extra)} must be a mapping")
    unknown = sorted(set(d) - set(CALIBRATION_KEYS) - set(OPTIONAL_KEYS))
    if unknown:
        raise _fail(where, f"{key} has unknown key(s) {unknown}; accepted: {[*CALIBRATION_KEYS, *OPTIONAL_KEYS]}")
    return Calibration(model=model, layers=layers, mu=vecs["mu"], sigma=vecs["sigma"], gamma=gamma, tau=tau,
                       tau_source=d["tau_source"], clean_distances=dist, layer_source=layer_source, extra=dict(extra),
                       feature=d["feature"], whitening=d["whitening"], threshold_fit=d["threshold_fit"], matrix=matrix)


def _check_record(record: Any, where: str) -> tuple["CleanSightConfig", "Calibration"]:
    """Every check of a whole file record (format, version, config, calibration and their agreement)."""
    if not isinstance(record, dict) or record.get("format") != FILE_FORMAT:
        raise _fail(where, f"not a CleanSight calibration file (no 'format': '{FILE_FORMAT}' tag)")
    version = record.get("version")
    if version != FILE_VERSION:
        why = {1: " (written before weight fingerprints)",
               2: " (written before the detector settings feature / whitening / threshold_fit)"}.get(
            version if _is_int(version) else None, "")
        raise _fail(where, f"version={_show(version)} is not accepted: this code reads version {FILE_VERSION}{why}; "
                    f"{_RECALIBRATE}")
    _need(record, FILE_KEYS, where, "")
    raw_cfg = _mapping(record["config"], where, "config")
    known = [f.name for f in fields(CleanSightConfig)]
    _need(raw_cfg, known, where, "config.")
    try:
        config = CleanSightConfig.from_dict(dict(raw_cfg))
    except InputError as exc:
        raise _fail(where, f"config: {exc}") from None
    cal = _check_calibration(record["calibration"], where)
    if config.layers != cal.layers:
        raise _fail(where, f"config.layers={_show(config.layers)} disagrees with calibration.layers={cal.layers}")
    for name in ("feature", "whitening", "threshold_fit"):
        if getattr(config, name) != getattr(cal, name):
            raise _fail(where, f"config.{name}={_show(getattr(config, name))} disagrees with "
                        f"calibration.{name}={getattr(cal, name)!r}")
    cal.sigma_eps = config.sigma_eps
    if cal.tau_source == "auto" and config.tau != "auto":
        raise _fail(where, f"calibration.tau_source='auto' but config.tau={_show(config.tau)}; they must agree")
    if cal.tau_source == "fixed" and config.tau != cal.tau:
        raise _fail(where, f"calibration.tau={cal.tau!r} (tau_source 'fixed') disagrees with "
                    f"config.tau={_show(config.tau)}; they must be equal")
    if "model" in record and record["model"] != {k: cal.model[k] for k in MODEL_KEYS[:3]}:
        raise _fail(where, f"model={_show(record['model'])} disagrees with calibration.model "
                    f"(name={cal.model['name']!r}, n_layers={cal.model['n_layers']}, n_heads={cal.model['n_heads']})")
    if "layers" in record and record["layers"] != cal.layers:
        raise _fail(where, f"layers={_show(record['layers'])} disagrees with calibration.layers={cal.layers}")
    unknown = sorted(set(record) - set(FILE_KEYS) - {"model", "layers"})
    if unknown:
        raise _fail(where, f"unknown top-level key(s) {unknown}; accepted: {[*FILE_KEYS, 'model', 'layers']}")
    return config, cal


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"key {k!r} appears twice in one object")
        out[k] = v
    return out

