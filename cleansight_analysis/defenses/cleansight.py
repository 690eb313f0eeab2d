"""CleanSight: detect triggered inputs by attention stealing, then prune the thief image tokens.

The method (``cleansight-method.md`` §3-5), as implemented here:

1. **Feature.** For each detection layer ``l`` and head ``h`` the stealing ratio of the answer query
   ``q`` (the last prompt token)::

       S^{l,h} = sum_{j in I_vis} alpha^{l,h}_{q,j} / (sum_{j in text keys} alpha^{l,h}_{q,j} + eps)

   ``text keys`` follows :attr:`CleanSightConfig.text_keys` (same meaning as
   :class:`cleansight_analysis.attention.stealing.StealingSettings`). The feature vector of a sample is
   ``s = (S^{l,h})`` over the detection layers (ascending) and heads, layer-major: ``[D = |L_det| * H]``.
2. **Detector.** ``mu`` and the population ``sigma`` per dimension on the clean calibration set;
   ``d(s) = || (s - mu) / (sigma + sigma_eps) ||_2`` (diagonal whitening; ``sigma_eps`` keeps a
   zero-variance dimension finite); ``gamma`` = the ``quantile`` of the calibration distances
   (``numpy.quantile``, linear interpolation, in-sample as in the paper); flag ``d > gamma``.
3. **Pruning set.** At the last detection layer ``l_e``:
   ``Omega = {j in I_vis : max_h alpha^{l_e,h}_{q,j} > tau}`` (union over heads, absolute threshold).
4. **Mask.** For flagged samples only, Omega's key columns get the dtype's most negative finite
   value before the softmax (every query row), in the layers named by ``mask_scope``. Tokens stay in
   the sequence and the KV cache. Unflagged samples run unchanged.

**One pass.** (Every ``mask_scope`` but ``"all_layers"``.) :meth:`CleanSight.generate` runs the model's greedy ``generate`` once. Hooks on
``hook_pattern`` of the detection layers read only the query rows at prefill; the hook of ``l_e``
computes the distances, flags and Omega in flight. ``l_e`` itself is masked right there by
renormalising its post-softmax pattern with Omega's columns zeroed (identical to the pre-softmax
mask up to rounding, since the bridge's ``hook_attn_scores`` of ``l_e`` fires before its pattern
exists); later layers, and decode steps, are masked on ``hook_attn_scores``.
"""

from __future__ import annotations

import json
import math
import numbers
import re
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from ..attention.rows import HookSpec, StopForward
from ..attention.stealing import TEXT_GROUPS, TEXT_KEYS
from ..errors import CalibrationError, InputError
from .base import Defense, DefenseOutput

if TYPE_CHECKING:  # pragma: no cover
    from ..data.base import Sample
    from ..inputs.batch import Batch
    from ..models.hooked import HookedLVLM

#: Where the Omega mask applies (see :attr:`CleanSightConfig.mask_scope`).
MASK_SCOPES: tuple[str, ...] = ("reference", "from_detection", "prefill_only", "all_layers")
#: Query rows the detector reads: the last prompt token, or also every generated token.
QUERIES: tuple[str, ...] = ("last", "generated")
#: Format tag and version of saved calibration files.
FILE_FORMAT = "cleansight-calibration"
FILE_VERSION = 2  # 2: calibration.model carries the weights fingerprint


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(float(x))


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CleanSightConfig:
    """Every setting of CleanSight (validated on construction; ``to_dict`` / ``from_dict`` for files).

    Attributes:
        layers: LM detection layers (0-indexed ints; negative count from the end and are resolved
            against the model in ``fit``), or ``"auto"``: :func:`select_detection_layers` with the
            fusion-onset rule on the clean calibration set and a window of ``window`` layers. The last
            (largest) layer is ``l_e``, where Omega is built.
        quantile: ``gamma`` is this quantile of the clean calibration distances (paper: 0.99).
        tau: Omega threshold on ``max_h alpha^{l_e,h}_{q,j}``: a float in (0, 1] (paper/code 1e-4,
            paper's suggested balance 1e-3, released package 0.02), or ``"auto"``: calibrated on the
            clean set as the ``tau_quantile`` quantile of the pooled per-image-token values
            ``max_h alpha^{l_e,h}_{q,j}`` over every clean calibration sample and image token, i.e.
            about ``1 - tau_quantile`` of clean image tokens would be pruned; tokens attended to
            more than clean inputs ever attend to an image token are the thieves. Default ``"auto"``,
            because an absolute tau depends on the number of image tokens and on the model.
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
            ``fit`` then generates ``calibration_tokens`` tokens per clean sample: ``mu``/``sigma`` pool every
            valid step's features, and ``gamma`` is the quantile of each sample's largest distance (so the
            per-sample false-positive rate stays ``1 - quantile``). Works with ``mask_scope`` ``"reference"``
            and ``"from_detection"``; ``score``/``detect`` run an unmasked generation of
            ``calibration_tokens`` tokens and return each sample's largest distance.
        calibration_tokens: tokens generated per clean sample by ``fit`` with ``query="generated"``.
        eps: added to the ratio's denominator (paper: 1e-12).
        sigma_eps: added to each ``sigma`` (paper: 1e-8): the floor that keeps zero-variance dims finite.
        window: number of layers chosen by ``layers="auto"``.
        batch_size: samples per forward pass in ``fit``.
    """

    layers: Any = "auto"
    quantile: float = 0.99
    tau: Any = "auto"
    tau_quantile: float = 0.99
    text_keys: str = "post_image"
    mask_scope: str = "reference"
    query: str = "last"
    calibration_tokens: int = 8
    eps: float = 1e-12
    sigma_eps: float = 1e-8
    window: int = 3
    batch_size: int = 16

    def __post_init__(self) -> None:
        own = "CleanSightConfig"
        layers = self.layers
        if isinstance(layers, torch.Tensor):
            layers = layers.tolist()
        if isinstance(layers, str):
            if layers != "auto":
                raise InputError(f"{own}: layers={layers!r} must be 'auto' or a list of layer indices")
        elif _is_int(layers):
            layers = [int(layers)]
        else:
            if not isinstance(layers, (list, tuple)) or not layers:
                raise InputError(f"{own}: layers={layers!r} must be 'auto' or a non-empty list of ints")
            bad = [x for x in layers if not _is_int(x)]
            if bad:
                raise InputError(f"{own}: layers must be ints, got {bad!r}")
            layers = sorted({int(x) for x in layers})
        object.__setattr__(self, "layers", layers)
        for name in ("quantile", "tau_quantile"):
            v = getattr(self, name)
            if not _is_real(v) or not 0.0 < float(v) <= 1.0:
                raise InputError(f"{own}: {name}={v!r} must be a number in (0, 1]")
            object.__setattr__(self, name, float(v))
        if isinstance(self.tau, str):
            if self.tau != "auto":
                raise InputError(f"{own}: tau={self.tau!r} must be a number in (0, 1] or 'auto'")
        elif not _is_real(self.tau) or not 0.0 < float(self.tau) <= 1.0:
            raise InputError(f"{own}: tau={self.tau!r} must be a number in (0, 1] or 'auto'")
        else:
            object.__setattr__(self, "tau", float(self.tau))
        if self.text_keys not in TEXT_KEYS:
            raise InputError(f"{own}: text_keys={self.text_keys!r} must be one of {TEXT_KEYS} "
                             "('post_image': instruction + template tail; 'instruction': prompt only)")
        if self.mask_scope not in MASK_SCOPES:
            raise InputError(f"{own}: mask_scope={self.mask_scope!r} must be one of {MASK_SCOPES}")
        if self.query not in QUERIES:
            raise InputError(f"{own}: query={self.query!r} must be one of {QUERIES} ('last': the last prompt "
                             "token; 'generated': also every decoding query)")
        if self.query == "generated" and self.mask_scope in ("prefill_only", "all_layers"):
            raise InputError(f"{own}: query='generated' flags samples during decoding, which mask_scope="
                             f"{self.mask_scope!r} cannot act on; use mask_scope='reference' or 'from_detection'")
        if not _is_real(self.eps) or self.eps < 0:
            raise InputError(f"{own}: eps={self.eps!r} must be a finite number >= 0")
        if not _is_real(self.sigma_eps) or self.sigma_eps <= 0:
            raise InputError(f"{own}: sigma_eps={self.sigma_eps!r} must be a finite number > 0 "
                             "(it keeps zero-variance dimensions from dividing by zero)")
        object.__setattr__(self, "eps", float(self.eps))
        object.__setattr__(self, "sigma_eps", float(self.sigma_eps))
        for name in ("window", "batch_size", "calibration_tokens"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise InputError(f"{own}: {name}={v!r} must be an int >= 1")

    @property
    def text_groups(self) -> tuple[str, ...]:
        return TEXT_GROUPS[self.text_keys]

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
        mu, sigma: ``[D]`` per-dimension mean and population std of the clean features (float64).
        gamma: the detection threshold (``quantile`` of ``clean_distances``).
        tau: the Omega threshold used; ``tau_source``: ``"fixed"`` or ``"auto"``.
        clean_distances: ``[N]`` in-sample distances of the calibration samples.
        layer_source: ``"given"`` or the selector rule used for ``layers="auto"``.
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

    @property
    def n_samples(self) -> int:
        return int(len(self.clean_distances))

    def to_dict(self) -> dict[str, Any]:
        return {"model": dict(self.model), "layers": list(self.layers), "mu": self.mu.tolist(),
                "sigma": self.sigma.tolist(), "gamma": float(self.gamma), "tau": float(self.tau),
                "tau_source": self.tau_source, "clean_distances": self.clean_distances.tolist(),
                "n_samples": self.n_samples, "layer_source": self.layer_source, "extra": dict(self.extra)}

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


#: Keys of the ``calibration`` section that must be present (``n_samples``, ``layer_source``, ``extra`` may be absent).
CALIBRATION_KEYS: tuple[str, ...] = ("model", "layers", "mu", "sigma", "gamma", "tau", "tau_source", "clean_distances")
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
    from ..models.fingerprint import ALGORITHM

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
    dim = len(layers) * n_heads
    vecs = {}
    for name, accepted, ok in (("mu", "a finite number", lambda x: True),
                               ("sigma", "a finite number > 0 (a population std; 0 means a clean feature never "
                                         "varied, so nearly every input would be flagged)", lambda x: x > 0)):
        v = d[name]
        if isinstance(v, (list, tuple)) and len(v) != dim:
            raise _fail(where, f"{key}.{name} has {len(v)} values; expected len({key}.layers) x {key}.model.n_heads "
                        f"= {len(layers)} x {n_heads} = {dim}")
        vecs[name] = _vector(v, where, f"{key}.{name}", accepted, ok)
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
    unknown = sorted(set(d) - set(CALIBRATION_KEYS) - {"n_samples", "layer_source", "extra"})
    if unknown:
        raise _fail(where, f"{key} has unknown key(s) {unknown}; accepted: "
                    f"{[*CALIBRATION_KEYS, 'n_samples', 'layer_source', 'extra']}")
    return Calibration(model=model, layers=layers, mu=vecs["mu"], sigma=vecs["sigma"], gamma=gamma, tau=tau,
                       tau_source=d["tau_source"], clean_distances=dist, layer_source=layer_source, extra=dict(extra))


def _check_record(record: Any, where: str) -> tuple["CleanSightConfig", "Calibration"]:
    """Every check of a whole file record (format, version, config, calibration and their agreement)."""
    if not isinstance(record, dict) or record.get("format") != FILE_FORMAT:
        raise _fail(where, f"not a CleanSight calibration file (no 'format': '{FILE_FORMAT}' tag)")
    version = record.get("version")
    if version != FILE_VERSION:
        why = (" (written before weight fingerprints)" if _is_int(version) and version < FILE_VERSION else "")
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


# ---------------------------------------------------------------------------------------------
# Feature extraction (shared by the detector, the selector and generation)
# ---------------------------------------------------------------------------------------------


def group_masks(batch: "Batch", text_keys: str = "post_image") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Key masks of a batch: image ``[B, T]`` bool, text (per ``text_keys``) ``[B, T]`` bool, query ``[B]`` long."""
    if text_keys not in TEXT_KEYS:
        raise InputError(f"text_keys={text_keys!r} must be one of {TEXT_KEYS}")
    b, t = len(batch), batch.seq_len
    img = torch.zeros(b, t, dtype=torch.bool)
    txt = torch.zeros(b, t, dtype=torch.bool)
    for i, g in enumerate(batch.groups):
        img[i, g.image] = True
        for name in TEXT_GROUPS[text_keys]:
            txt[i, g.positions(name)] = True
    return img, txt, batch.query_positions


def stealing_ratio(rows: torch.Tensor, img: torch.Tensor, txt: torch.Tensor, eps: float) -> torch.Tensor:
    """``S`` ``[B, H]`` (float64) from query rows ``[B, H, K]`` and key masks ``[B, K]`` (``K >= T`` cut to T)."""
    k = img.shape[-1]
    rows = rows[..., :k].double()
    im = (rows * img[:, None, :].to(rows)).sum(-1)
    tx = (rows * txt[:, None, :].to(rows)).sum(-1)
    return im / (tx + eps)


def whitened_distance(x: torch.Tensor | np.ndarray, mu: np.ndarray, sigma: np.ndarray, sigma_eps: float) -> np.ndarray:
    """``|| (x - mu) / (sigma + sigma_eps) ||_2`` per row: ``x`` ``[N, D]`` -> ``[N]`` (float64)."""
    x = np.asarray(x, dtype=np.float64)
    z = (x - mu[None, :]) / (sigma[None, :] + sigma_eps)
    return np.sqrt((z ** 2).sum(1))


def _drop_keys(pattern: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """Post-softmax ``pattern`` ``[B, H, Q, K]`` with the keys in ``key_mask`` ``[B, K']`` (``K' <= K``) zeroed
    and each row renormalised; samples with no masked key are returned bit-identical."""
    km = torch.zeros(pattern.shape[0], pattern.shape[-1], dtype=torch.bool)
    km[:, : key_mask.shape[-1]] = key_mask
    km = km.to(pattern.device)
    edited = pattern.masked_fill(km[:, None, None, :], 0.0)
    edited = edited / edited.sum(-1, keepdim=True).clamp_min(torch.finfo(pattern.dtype).tiny)
    return torch.where(km.any(1)[:, None, None, None], edited, pattern)


class _Pass:
    """Hooks of one forward / generate call: record features at prefill, optionally detect and mask.

    Args:
        batch: the batch (positions of token groups); ``T = batch.seq_len``.
        layers: detection layers (ascending), ``l_e = layers[-1]``.
        n_layers: LM layers of the model (for the decode-step mask).
        calibration: when given, the ``l_e`` hook computes distances, flags and Omega.
        mask: apply the Omega mask to flagged samples (per ``scope``).
        token_rows: keep ``max_h alpha^{l_e,h}_{q,j}`` over image tokens (for ``tau="auto"``).
        stop: raise :class:`StopForward` after ``l_e`` (scoring only).
        decode: also score every decoding query (``query="generated"``): features per step in
            ``step_features``, distances in ``step_scores``, first flag step in ``flag_step``.
    """

    def __init__(self, batch: "Batch", layers: Sequence[int], n_layers: int, config: CleanSightConfig, *,
                 calibration: Calibration | None = None, mask: bool = False, token_rows: bool = False,
                 stop: bool = False, decode: bool = False):
        self.t = batch.seq_len
        self.b = len(batch)
        self.layers = list(layers)
        self.l_e = self.layers[-1]
        self.n_layers = n_layers
        self.config = config
        self.calibration = calibration
        self.mask = mask
        self.token_rows = token_rows
        self.stop = stop
        self.img, self.txt, self.qpos = group_masks(batch, config.text_keys)
        self.ratios: dict[int, torch.Tensor] = {}
        self.token_max: torch.Tensor | None = None    # [B, T] max over heads at l_e (query row)
        self.scores: np.ndarray | None = None          # [B]
        self.flags: torch.Tensor | None = None         # [B] bool
        self.key_mask: torch.Tensor | None = None      # [B, T] bool: Omega of flagged samples
        self.done = False
        # query="generated": also read every decoding query's row (``decode``)
        self.decode = decode
        self.step = 0                                  # decode steps seen at l_e
        self._decode_ratios: dict[int, torch.Tensor] = {}
        self.step_features: list[torch.Tensor] = []    # per step [B, D]; step 0 = prefill
        self.step_scores: list[np.ndarray] = []        # per step [B] (with a calibration)
        self.flag_step: torch.Tensor | None = None     # [B] long: step of the first flag, -1 never
        # first layer masked at prefill via hook_attn_scores (l_e is masked in its pattern hook), and
        # first layer masked at decode steps (None: decode steps unmasked)
        scope = config.mask_scope
        self.prefill_from = 0 if scope == "all_layers" else self.l_e + 1
        self.decode_from = {"reference": 0, "all_layers": 0, "from_detection": self.l_e, "prefill_only": None}[scope]

    # -- detection ---------------------------------------------------------------------------
    def features(self) -> torch.Tensor:
        """``[B, D]`` float64, layer-major."""
        return torch.cat([self.ratios[layer] for layer in self.layers], dim=1)

    def _pattern_hook(self, layer: int):
        def hook(pattern: torch.Tensor, hook: Any) -> torch.Tensor:
            # pattern: [B, H, Q, K]; prefill has Q = K = T, decode steps Q = 1, K > T.
            if pattern.shape[-1] != self.t or pattern.shape[-2] != self.t:
                if self.decode and self.done and pattern.shape[-2] == 1:
                    return self._decode_step(layer, pattern)
                return pattern
            if self.done:
                return pattern
            bi = torch.arange(self.b, device=pattern.device)
            rows = pattern[bi, :, self.qpos.to(pattern.device), :].detach().float().cpu()  # [B, H, T]
            self.ratios[layer] = stealing_ratio(rows, self.img, self.txt, self.config.eps)
            if layer != self.l_e:
                return pattern
            self.done = True
            tok = rows.amax(1)  # [B, T]
            if self.token_rows:
                self.token_max = tok
            if self.decode:
                self.step_features.append(self.features())
            if self.calibration is not None:
                cal = self.calibration
                self.scores = whitened_distance(self.features(), cal.mu, cal.sigma, self.config.sigma_eps)
                self.flags = torch.as_tensor(self.scores > cal.gamma)
                omega = self.img & (tok > cal.tau)
                self.key_mask = omega & self.flags[:, None]
                if self.decode:
                    self.step_scores.append(self.scores)
                    self.flag_step = torch.where(self.flags, 0, -1)
                if self.mask and bool(self.key_mask.any()):
                    pattern = _drop_keys(pattern, self.key_mask)
            if self.stop:
                raise StopForward
            return pattern

        return hook

    def _decode_step(self, layer: int, pattern: torch.Tensor) -> torch.Tensor:
        """Score one decoding query (``query="generated"``); flag and mask samples crossing ``gamma``."""
        rows = pattern[:, :, 0, :].detach().float().cpu()  # [B, H, K], K = T + steps so far
        extra = rows.shape[-1] - self.t
        img = torch.nn.functional.pad(self.img, (0, extra), value=False)
        txt = torch.nn.functional.pad(self.txt, (0, extra), value=True)   # generated tokens are text keys
        self._decode_ratios[layer] = stealing_ratio(rows, img, txt, self.config.eps)
        if layer != self.l_e:
            return pattern
        self.step += 1
        feats = torch.cat([self._decode_ratios[x] for x in self.layers], dim=1)
        self.step_features.append(feats)
        if self.calibration is None or self.flags is None or self.key_mask is None:
            return pattern
        cal = self.calibration
        dist = whitened_distance(feats, cal.mu, cal.sigma, self.config.sigma_eps)
        self.step_scores.append(dist)
        new = torch.as_tensor(dist > cal.gamma) & ~self.flags
        if not bool(new.any()):
            return pattern
        omega = self.img & (rows[..., : self.t].amax(1) > cal.tau)
        self.key_mask = torch.where(new[:, None], omega, self.key_mask)
        self.flags = self.flags | new
        self.flag_step = torch.where(new, self.step, self.flag_step)
        if self.mask:  # this step's l_e row of the newly flagged samples (earlier layers ran unmasked)
            km = torch.zeros(self.b, rows.shape[-1], dtype=torch.bool)
            km[:, : self.t] = self.key_mask & new[:, None]
            pattern = _drop_keys(pattern, km)
        return pattern

    def decode_summary(self, n_tokens: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
        """Per-sample largest distance over the steps that fed the answer, and flags restricted to them.

        A decoding query at step ``s`` reads generated token ``s - 1``; it shaped the answer only when
        ``s < n_tokens`` (``n_tokens`` counts up to and including EOS). Returns ``(scores [B], flags [B])``.
        """
        steps = np.stack(self.step_scores, 1)                              # [B, S]
        valid = np.arange(steps.shape[1])[None, :] < n_tokens.cpu().numpy()[:, None]
        scores = np.where(valid, steps, -np.inf).max(1)
        flags = (self.flag_step >= 0) & (self.flag_step < n_tokens.cpu())
        return scores, flags

    # -- masking -----------------------------------------------------------------------------
    def _scores_hook(self, layer: int):
        def hook(scores: torch.Tensor, hook: Any) -> torch.Tensor:
            if self.key_mask is None or not bool(self.key_mask.any()):
                return scores
            k = scores.shape[-1]
            prefill = k == self.t and scores.shape[-2] == self.t
            if prefill:
                if layer < self.prefill_from:
                    return scores
            elif self.decode_from is None or layer < self.decode_from:
                return scores
            m = torch.zeros(self.b, k, dtype=torch.bool)
            m[:, : self.t] = self.key_mask
            return scores.masked_fill(m.to(scores.device)[:, None, None, :], torch.finfo(scores.dtype).min)

        return hook

    def hooks(self) -> list[HookSpec]:
        out: list[HookSpec] = [(f"blocks.{layer}.attn.hook_pattern", self._pattern_hook(layer)) for layer in self.layers]
        if self.mask:
            out += [(f"blocks.{layer}.attn.hook_attn_scores", self._scores_hook(layer))
                    for layer in range(self.n_layers)]
        return out


# ---------------------------------------------------------------------------------------------
# The defense
# ---------------------------------------------------------------------------------------------


class CleanSight(Defense):
    """The CleanSight test-time defense (detector + selective attention pruning).

    Build with settings (``CleanSight(quantile=0.99, layers=[7])``) or a config
    (``CleanSight(config=CleanSightConfig(...))``), not both. Then ``fit(model, clean_samples)``.

    Attributes:
        config: :class:`CleanSightConfig` (after ``fit`` with ``layers="auto"``, ``config.layers`` holds
            the selected layers).
        calibration: :class:`Calibration` once fitted, else ``None``.
    """

    name = "cleansight"
    kind = "detector"

    def __init__(self, config: CleanSightConfig | None = None, **settings: Any):
        if config is not None:
            if not isinstance(config, CleanSightConfig):
                raise InputError(f"CleanSight: config must be a CleanSightConfig, got {type(config).__name__}")
            if settings:
                raise InputError(f"CleanSight: give config= or individual settings, not both (got {sorted(settings)})")
            self.config = config
        else:
            self.config = CleanSightConfig.from_dict(dict(settings))
        self.calibration: Calibration | None = None

    # ------------------------------------------------------------------ helpers
    @property
    def fitted(self) -> bool:
        return self.calibration is not None

    @property
    def gamma(self) -> float:
        return self._cal("gamma").gamma

    @property
    def layers(self) -> list[int]:
        return list(self._cal("layers").layers)

    def _cal(self, what: str) -> Calibration:
        if self.calibration is None:
            raise InputError(f"CleanSight.{what}: not calibrated; call fit(model, clean_samples) or CleanSight.load(path)")
        return self.calibration

    @staticmethod
    def _identity(model: "HookedLVLM", fingerprint: bool = True) -> dict[str, Any]:
        out = {"name": str(getattr(model, "name", "<unknown>")), "n_layers": int(model.n_layers),
               "n_heads": int(model.n_heads)}
        if fingerprint:
            from ..models.fingerprint import weights_fingerprint

            out["fingerprint"] = weights_fingerprint(model)
        return out

    def _check_model(self, model: "HookedLVLM", what: str, where: str | None = None) -> Calibration:
        """Refuse a model other than the calibrated one: name and shape, then the weights fingerprint
        (:func:`~cleansight_analysis.models.fingerprint.weights_fingerprint`, cached on the model)."""
        cal = self._cal(what)
        where = where or f"CleanSight.{what}"
        ident = self._identity(model, fingerprint=False)
        if ident != {k: cal.model.get(k) for k in ("name", "n_layers", "n_heads")}:
            raise _fail(where,
                        f"calibrated on {cal.model.get('name')!r} ({cal.model.get('n_layers')} layers x "
                        f"{cal.model.get('n_heads')} heads), but got {ident['name']!r} ({ident['n_layers']} layers x "
                        f"{ident['n_heads']} heads); calibrate on this model with fit()")
        from ..models.fingerprint import short, weights_fingerprint

        stored = cal.model.get("fingerprint")
        if stored is None:
            raise _fail(where, f"calibration.model has no weights fingerprint, so it cannot be bound to "
                        f"{ident['name']!r}; calibrate on this model with fit()")
        actual = weights_fingerprint(model)
        if actual != stored:
            raise _fail(where, f"the weights of {ident['name']!r} (fingerprint {short(actual)}...) are not the ones "
                        f"this calibration was fitted on (calibration.model.fingerprint {short(stored)}...): "
                        "same name and shape, other weights; calibrate on this model with fit()")
        return cal

    @staticmethod
    def _check_batch(batch: Any, what: str) -> None:
        from ..inputs.batch import Batch

        if not isinstance(batch, Batch):
            raise InputError(f"CleanSight.{what}: expected a Batch from model.prepare(), got {type(batch).__name__}")

    def _run(self, model: "HookedLVLM", batch: "Batch", layers: Sequence[int], *, calibration: Calibration | None,
             token_rows: bool = False) -> _Pass:
        """One scoring forward pass (stops after ``l_e``)."""
        run = _Pass(batch, layers, model.n_layers, self.config, calibration=calibration, token_rows=token_rows,
                    stop=True)
        inputs = batch.to(model.device, model.dtype).model_inputs()
        try:
            with torch.no_grad(), model.hooks(run.hooks()):
                model.hf_model(**inputs, use_cache=False, logits_to_keep=1)
        except StopForward:
            pass
        if not run.done:
            raise InputError("CleanSight: the detection layers' attention hooks never fired; is this a bridge-wrapped "
                             "model whose attention is editable?")
        return run

    # ------------------------------------------------------------------ calibration
    def fit(self, model: "HookedLVLM", clean_samples: Sequence["Sample"]) -> "CleanSight":
        """Calibrate ``mu``, ``sigma``, ``gamma`` (and ``tau`` when ``"auto"``) on clean samples.

        Args:
            model: the hooked LVLM.
            clean_samples: clean :class:`~cleansight_analysis.data.base.Sample` list (at least 2).

        Warns:
            UserWarning: fewer samples than feature dimensions ``D = |L_det| * H``.
        """
        from ..data.base import check_samples

        samples = check_samples(clean_samples, "CleanSight.fit")
        if len(samples) < 2:
            raise InputError(f"CleanSight.fit: needs at least 2 clean samples to estimate sigma, got {len(samples)}")
        cfg = self.config
        if cfg.layers == "auto":
            from .layers import select_detection_layers

            layers = select_detection_layers(model, samples, method="fusion_onset", window=cfg.window,
                                             batch_size=cfg.batch_size, text_keys=cfg.text_keys)
            source = "fusion_onset"
        else:
            layers = sorted(set(model.check_layers(cfg.layers)))
            source = "given"
        feats, tok_vals, groups = [], [], []
        for start in range(0, len(samples), cfg.batch_size):
            chunk = samples[start:start + cfg.batch_size]
            batch = model.prepare([s.image for s in chunk], [s.prompt for s in chunk])
            if cfg.query == "generated":
                run = _Pass(batch, layers, model.n_layers, cfg, token_rows=cfg.tau == "auto", decode=True)
                gen = model.generate(batch, max_new_tokens=cfg.calibration_tokens, hooks=run.hooks())
                steps = torch.stack(run.step_features, 1)                       # [B, S, D]
                valid = torch.arange(steps.shape[1])[None, :] < gen.n_tokens.cpu()[:, None]
                feats.append(steps[valid])
                groups.append(torch.arange(start, start + len(chunk))[:, None].expand_as(valid)[valid])
            else:
                run = self._run(model, batch, layers, calibration=None, token_rows=cfg.tau == "auto")
                feats.append(run.features())
            if run.token_max is not None:
                tok_vals.append(run.token_max[run.img])
        x = torch.cat(feats).numpy()  # [N, D] (query="generated": one row per sample and valid step)
        n, d = x.shape
        if n < d:
            warnings.warn(
                f"CleanSight.fit: {n} calibration samples for {d} feature dimensions ({len(layers)} layers x "
                f"{model.n_heads} heads): each dimension's sigma comes from only {n} values, so it is noisy and "
                f"may be near zero (floored at sigma_eps={cfg.sigma_eps:g}); distances and the threshold are "
                "unreliable and the false-positive rate may exceed 1 - quantile. Use more clean samples.",
                UserWarning, stacklevel=2)
        if not np.isfinite(x).all():
            raise InputError("CleanSight.fit: clean features contain NaN or infinite values")
        mu, sigma = x.mean(0), x.std(0)
        dist = whitened_distance(x, mu, sigma, cfg.sigma_eps)
        if groups:  # each sample's largest distance over its steps
            owner = torch.cat(groups).numpy()
            dist = np.array([dist[owner == i].max() for i in range(len(samples))])
        gamma = float(np.quantile(dist, cfg.quantile))
        if cfg.tau == "auto":
            pooled = torch.cat(tok_vals).double().numpy()
            tau, tau_source = float(np.quantile(pooled, cfg.tau_quantile)), "auto"
        else:
            tau, tau_source = float(cfg.tau), "fixed"
        self.config = replace(cfg, layers=list(layers))
        self.calibration = Calibration(self._identity(model), list(layers), mu, sigma, gamma, tau, tau_source,
                                       dist, layer_source=source,
                                       extra={"config_layers": cfg.layers if isinstance(cfg.layers, str) else None,
                                              "feature_rows": int(n)})
        return self

    # ------------------------------------------------------------------ detection
    def score(self, model: "HookedLVLM", batch: "Batch") -> torch.Tensor:
        """``[B]`` whitened distances (float64; higher = more suspicious). One forward pass up to ``l_e``."""
        self._check_batch(batch, "score")
        cal = self._check_model(model, "score")
        if self.config.query == "generated":
            run = _Pass(batch, cal.layers, model.n_layers, self.config, calibration=cal, decode=True)
            gen = model.generate(batch, max_new_tokens=self.config.calibration_tokens, hooks=run.hooks())
            return torch.as_tensor(run.decode_summary(gen.n_tokens)[0])
        run = self._run(model, batch, cal.layers, calibration=cal)
        return torch.as_tensor(run.scores)

    def detect(self, model: "HookedLVLM", batch: "Batch") -> torch.Tensor:
        """``[B]`` bool: ``score > gamma``."""
        return self.score(model, batch) > self._cal("detect").gamma

    def features(self, model: "HookedLVLM", batch: "Batch") -> torch.Tensor:
        """``[B, D]`` float64 stealing ratios over the fitted detection layers (layer-major)."""
        self._check_batch(batch, "features")
        cal = self._check_model(model, "features")
        return self._run(model, batch, cal.layers, calibration=None).features()

    # ------------------------------------------------------------------ generation
    def generate(self, model: "HookedLVLM", batch: "Batch", max_new_tokens: int = 12, *,
                 extra_hooks: Sequence[HookSpec] = ()) -> DefenseOutput:
        """Defended greedy decoding in one pass (detect at prefill, mask Omega for flagged samples).

        ``extra_hooks`` run after the defense's own hooks at the same hook points (e.g. to record the
        attention as the model really used it).

        Returns:
            :class:`DefenseOutput` with ``texts``, ``flags`` ``[B]`` bool, ``scores`` ``[B]`` float64,
            ``pruned`` (per sample the absolute positions masked; empty when not flagged) and ``info``
            (``gamma``, ``tau``, ``tau_source``, ``layers``, ``mask_scope``, ``passes``, ``n_pruned``,
            ``tokens`` ``[B, n]`` new token ids, ``n_tokens`` ``[B]``).
        """
        self._check_batch(batch, "generate")
        cal = self._check_model(model, "generate")
        run = _Pass(batch, cal.layers, model.n_layers, self.config, calibration=cal, mask=True,
                    decode=self.config.query == "generated")
        passes = 1
        if self.config.mask_scope == "all_layers":  # detect first (stops at l_e), then mask every layer
            first = self._run(model, batch, cal.layers, calibration=cal)
            run.scores, run.flags, run.key_mask, run.done = first.scores, first.flags, first.key_mask, True
            passes = 2
        gen = model.generate(batch, max_new_tokens=max_new_tokens, hooks=[*run.hooks(), *extra_hooks])
        if run.scores is None or run.flags is None or run.key_mask is None:
            raise InputError("CleanSight.generate: detection did not run during prefill (hooks never fired)")
        scores, flags = run.scores, run.flags
        if run.decode:  # flags raised after a sample's answer ended changed nothing: drop them
            scores, flags = run.decode_summary(gen.n_tokens)
            run.key_mask = run.key_mask & flags[:, None]
        pruned = [run.key_mask[i].nonzero().squeeze(-1) for i in range(len(batch))]
        info = {"gamma": cal.gamma, "tau": cal.tau, "tau_source": cal.tau_source, "layers": list(cal.layers),
                "mask_scope": self.config.mask_scope, "passes": passes, "n_pruned": [int(p.numel()) for p in pruned],
                "tokens": gen.tokens, "n_tokens": gen.n_tokens, "query": self.config.query}
        if run.decode:
            info["flag_step"] = torch.where(flags, run.flag_step, -1)
        return DefenseOutput(texts=gen.texts, flags=flags.clone(), scores=torch.as_tensor(scores),
                             pruned=pruned, info=info)

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict[str, Any]:
        out = {"name": self.name, "kind": self.kind, **self.config.to_dict()}
        if self.calibration is not None:
            out.update(gamma=self.calibration.gamma, tau_used=self.calibration.tau,
                       tau_source=self.calibration.tau_source, fitted_layers=list(self.calibration.layers))
        return out

    def _record(self, where: str) -> dict[str, Any]:
        cal = self._cal("save")
        summary = {k: cal.model.get(k) for k in MODEL_KEYS[:3]}  # top-level copy, for readers; no fingerprint
        record = {"format": FILE_FORMAT, "version": FILE_VERSION, "model": summary,
                  "layers": list(cal.layers), "config": self.config.to_dict(), "calibration": cal.to_dict()}
        _check_record(record, where)  # never write a file that load() refuses
        return record

    def save(self, path: str | Path) -> Path:
        """Write config + calibration to ``path`` (``.json``, or ``.yaml`` / ``.yml`` when pyyaml is installed).

        The record passes the same checks as :meth:`load` first (``CalibrationError`` otherwise, e.g. a
        calibration whose ``sigma`` is 0 in some dimension, or with no weights fingerprint).
        """
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in (".json", ".yaml", ".yml"):
            raise InputError(f"CleanSight.save: {path} must end with .json, .yaml or .yml")
        record = self._record(f"CleanSight.save: {path}")
        if suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise InputError(f"CleanSight.save: {path} asks for YAML but pyyaml is not installed; use .json") from None
            text = yaml.safe_dump(record, sort_keys=False)
        else:
            text = json.dumps(record, indent=1, allow_nan=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    @classmethod
    def load(cls, path: str | Path, *, model: "HookedLVLM | None" = None,
             layers: Sequence[int] | None = None) -> "CleanSight":
        """Read a file written by :meth:`save`, checking every key (schema below).

        Schema (version ``FILE_VERSION``): ``format``, ``version``, ``config`` (every
        :class:`CleanSightConfig` setting, validated as on construction), ``calibration`` with ``model``
        (``name``, ``n_layers`` >= 1, ``n_heads`` >= 1, ``fingerprint`` of the weights), ``layers``
        (strictly ascending ints in ``[0, n_layers)``), ``mu`` (finite) and ``sigma`` (finite, > 0), each of
        length ``len(layers) * n_heads``, ``gamma`` (finite, >= 0), ``tau`` (in ``(0, 1]``), ``tau_source``
        (``"fixed"``: equal to ``config.tau``; ``"auto"``: ``config.tau == "auto"``), ``clean_distances``
        (>= 2 finite values >= 0); ``config.layers`` and the top-level ``model`` / ``layers`` copies must
        agree with it. JSON ``NaN`` / ``Infinity`` tokens and duplicate keys are refused.

        Args:
            model: when given, refuse a file calibrated on another model: name, layers or heads differ,
                or the weights fingerprint differs (same name and shape, other weights).
            layers: when given, refuse a file calibrated on other detection layers.

        Raises:
            CalibrationError: (an ``InputError``) one line naming
                the file, the key, the bad value and what is accepted.
        """
        path = Path(path)
        where = f"CleanSight.load: {path}"
        if not path.is_file():
            raise _fail(where, "no such file")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise _fail(where, f"cannot be read as text: {exc}") from None
        try:
            if path.suffix.lower() in (".yaml", ".yml"):
                import yaml

                record = yaml.safe_load(text)
            else:
                record = json.loads(text, object_pairs_hook=_no_duplicates)
        except ImportError:
            raise _fail(where, "is YAML but pyyaml is not installed") from None
        except Exception as exc:  # noqa: BLE001 - any parse error is a bad file
            raise _fail(where, f"is not valid {'YAML' if path.suffix.lower() in ('.yaml', '.yml') else 'JSON'} "
                        f"(truncated or hand-edited?): {exc}") from None
        config, cal = _check_record(record, where)
        obj = cls(config=config)
        obj.calibration = cal
        if model is not None:
            obj._check_model(model, "load", where)
        if layers is not None:
            wanted = sorted({int(x) for x in (model.check_layers(layers) if model is not None else layers)})
            if wanted != list(cal.layers):
                raise _fail(where, f"calibrated on layers {cal.layers}, not {wanted}; recalibrate with fit() for "
                            "other layers")
        return obj
