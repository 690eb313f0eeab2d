"""CleanSight: detect triggered inputs by attention stealing, then prune the thief image tokens.

The method (``docs/method.md#score`` to ``#mask-scope``), as implemented here (every piece lives in the detector core
:mod:`cleansight_analysis.detection`; this module wires it into a :class:`~.base.Defense`):

1. **Feature** (:mod:`~cleansight_analysis.detection.features`). For each detection layer ``l`` and head
   ``h`` the answer query's (the last prompt token's) attention mass on the image and on the text keys
   (:attr:`CleanSightConfig.text_keys`); ``feature="ratio"`` gives the paper's
   ``S^{l,h} = image / (text + eps)``, ``"log_ratio"`` and ``"masses"`` the alternatives. The vector of a
   sample concatenates the detection layers (ascending) and heads, layer-major.
2. **Detector** (:mod:`~cleansight_analysis.detection.detector`, :mod:`~cleansight_analysis.detection.whitening`).
   A whitening (``"diagonal"``: the paper's per-dimension ``mu``, ``sigma``; or ``"ledoit_wolf"``) fitted on
   the clean calibration set; ``gamma`` = the ``quantile`` of clean distances, out-of-fold
   (``threshold_fit="cross_fit"``, default) or in-sample (the paper's); flag ``d > gamma``.
3. **Pruning set** (:mod:`~cleansight_analysis.detection.pruning`). At the last detection layer ``l_e``:
   ``Omega = {j in I_vis : max_h alpha^{l_e,h}_{q,j} > tau}``.
4. **Mask** (:mod:`~cleansight_analysis.detection.masking`). For flagged samples only, Omega's key columns get
   the dtype's most negative finite value before the softmax (every query row), in the layers named by
   ``mask_scope``. Tokens stay in the sequence and the KV cache. Unflagged samples run unchanged.

**One pass.** (Every ``mask_scope`` but ``"all_layers"``.) :meth:`CleanSight.generate` runs the model's greedy
``generate`` once with the hooks of a :class:`~cleansight_analysis.detection.passes.QueryPass`: the detection
layers' ``hook_pattern`` read only the query rows at prefill; the hook of ``l_e`` computes the distances,
flags and Omega in flight. ``l_e`` itself is masked right there by renormalising its post-softmax pattern
with Omega's columns zeroed (identical to the pre-softmax mask up to rounding, since the bridge's
``hook_attn_scores`` of ``l_e`` fires before its pattern exists); later layers, and decode steps, are masked
on ``hook_attn_scores``.

Settings, the calibration and the file schema: :mod:`.cleansight_config`.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..data.base import Sample, check_samples
from ..detection.detector import fit_detector
from ..detection.passes import MASK_SCOPES, Armed, QueryPass, sample_masses, scoring_pass
from ..detection.pruning import auto_tau
from ..detection.whitening import whitened_distance
from ..errors import CalibrationError, InputError
from ..inputs.batch import Batch
from ..models.fingerprint import short, weights_fingerprint
from ..models.hooked import HookedLVLM
from ..models.hooknames import HookSpec
from .base import Defense, DefenseOutput
from .cleansight_config import (CALIBRATION_KEYS, FILE_FORMAT, FILE_KEYS, FILE_VERSION, MODEL_KEYS, QUERIES,
                                TAU_SOURCES, Calibration, CleanSightConfig, _check_record, _fail, _no_duplicates)
from .layers import select_detection_layers


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
        progress: progress bars in ``fit`` (the fusion-onset scan and the calibration features); not a
            setting: no result depends on it, and it is neither saved nor compared.
    """

    name = "cleansight"
    kind = "detector"
    progress: bool = False

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
        if not isinstance(batch, Batch):
            raise InputError(f"CleanSight.{what}: expected a Batch from model.prepare(), got {type(batch).__name__}")

    @staticmethod
    def _armed(cal: Calibration) -> Armed:
        return Armed(cal.whitener(), cal.gamma, cal.tau)

    def _pass(self, batch: "Batch", layers: Sequence[int], model: "HookedLVLM", **kwargs: Any) -> QueryPass:
        return QueryPass(batch, layers, model.n_layers, self.config.detector, mask_scope=self.config.mask_scope,
                         **kwargs)

    def scoring_pass(self, model: "HookedLVLM", batch: "Batch", layers: Sequence[int] | None = None, *,
                     armed: bool = False, token_rows: bool = False) -> QueryPass:
        """One forward pass up to ``l_e`` with this defense's feature settings (the public way to read its
        features or masses on any layers, e.g. for layer selection): ``.features()`` ``[B, D]``,
        ``.mass()`` ``[B, L, H, G]``; with ``armed`` (fitted only) also ``.scores``, ``.flags``, ``.key_mask``.

        Args:
            layers: detection layers (default: the fitted ones).
        """
        self._check_batch(batch, "scoring_pass")
        cal = self._check_model(model, "scoring_pass") if (armed or layers is None) else None
        use = cal.layers if layers is None else sorted(set(model.check_layers(layers)))
        return scoring_pass(model, batch, use, self.config.detector, armed=self._armed(cal) if armed else None,
                            token_rows=token_rows)

    # ------------------------------------------------------------------ calibration
    def choose_layers(self, model: "HookedLVLM", clean_samples: Sequence["Sample"]) -> tuple[list[int], str]:
        """The detection layers ``fit`` uses on these clean samples, and how they were chosen.

        ``config.layers == "auto"``: :func:`~cleansight_analysis.defenses.layers.select_detection_layers`
        (fusion onset, ``config.window`` layers) on ``clean_samples``, source ``"fusion_onset"``; otherwise the
        configured layers (normalised, ascending), source ``"given"``. Other code that needs "the layers
        CleanSight would detect in" (e.g. Fig. 1's detection-layer flattening) calls this, so both agree.

        Returns:
            ``(layers, source)``: ascending 0-indexed LM layers and ``"fusion_onset"`` / ``"given"``.
        """
        cfg = self.config
        if cfg.layers == "auto":
            samples = check_samples(clean_samples, "CleanSight.choose_layers")
            return (select_detection_layers(model, samples, method="fusion_onset", window=cfg.window,
                                            batch_size=cfg.batch_size, text_keys=cfg.text_keys,
                                            progress=self.progress), "fusion_onset")
        return sorted(set(model.check_layers(cfg.layers))), "given"

    def fit(self, model: "HookedLVLM", clean_samples: Sequence["Sample"]) -> "CleanSight":
        """Calibrate the whitening, ``gamma`` (per ``threshold_fit``) and ``tau`` (when ``"auto"``) on clean samples.

        Args:
            model: the hooked LVLM.
            clean_samples: clean :class:`~cleansight_analysis.data.base.Sample` list (at least 2; at least 3
                with ``threshold_fit="cross_fit"``).

        Warns:
            UserWarning: fewer samples than feature dimensions ``D = |L_det| * H * F``.
        """

        samples = check_samples(clean_samples, "CleanSight.fit")
        if len(samples) < 2:
            raise InputError(f"CleanSight.fit: needs at least 2 clean samples to estimate sigma, got {len(samples)}")
        cfg = self.config
        if cfg.threshold_fit == "cross_fit" and len(samples) < 3:
            raise InputError(f"CleanSight.fit: threshold_fit='cross_fit' needs at least 3 clean samples, got "
                             f"{len(samples)}; use threshold_fit='in_sample'")
        layers, source = self.choose_layers(model, samples)
        settings = cfg.detector
        owner = None
        if cfg.query == "generated":
            feats, tok_vals, groups = [], [], []
            for start in range(0, len(samples), cfg.batch_size):
                chunk = samples[start:start + cfg.batch_size]
                batch = model.prepare([s.image for s in chunk], [s.prompt for s in chunk])
                run = self._pass(batch, layers, model, token_rows=cfg.tau == "auto", decode=True)
                gen = model.generate(batch, max_new_tokens=cfg.calibration_tokens, hooks=run.hooks())
                steps = np.stack(run.step_features, 1)                          # [B, S, D]
                valid = np.arange(steps.shape[1])[None, :] < gen.n_tokens.cpu().numpy()[:, None]
                feats.append(steps[valid])
                groups.append(np.broadcast_to(np.arange(start, start + len(chunk))[:, None], valid.shape)[valid])
                if run.token_max is not None:
                    tok_vals.append(run.token_max[run.img])
            x, owner = np.concatenate(feats), np.concatenate(groups)
        else:
            mass, tok_vals = sample_masses(model, samples, layers, batch_size=cfg.batch_size,
                                           token_rows=cfg.tau == "auto", progress=self.progress,
                                           desc="calibration features")
            x = settings.features(mass)  # [N, D]
        n, d = x.shape
        if n < d:
            warnings.warn(
                f"CleanSight.fit: {n} calibration samples for {d} feature dimensions ({len(layers)} layers x "
                f"{model.n_heads} heads x {settings.width}): each dimension's sigma comes from only {n} values, so "
                f"it is noisy and may be near zero (floored at sigma_eps={cfg.sigma_eps:g}); distances and the "
                "threshold are unreliable and the false-positive rate may exceed 1 - quantile. Use more clean samples.",
                UserWarning, stacklevel=2)
        if not np.isfinite(x).all():
            raise InputError("CleanSight.fit: clean features contain NaN or infinite values")
        det = fit_detector(x, settings, groups=owner, owner="CleanSight.fit")
        if cfg.tau == "auto":
            tau, tau_source = auto_tau(tok_vals, cfg.tau_quantile), "auto"
        else:
            tau, tau_source = float(cfg.tau), "fixed"
        self.config = replace(cfg, layers=list(layers))
        w = det.whitener
        self.calibration = Calibration(
            self._identity(model), list(layers), w.mu, w.sigma, det.gamma, tau, tau_source, det.distances,
            layer_source=source, feature=cfg.feature, whitening=cfg.whitening, threshold_fit=cfg.threshold_fit,
            matrix=w.matrix, sigma_eps=cfg.sigma_eps,
            extra={"config_layers": cfg.layers if isinstance(cfg.layers, str) else None, "feature_rows": int(n),
                   "shrinkage": det.info["shrinkage"]})
        return self

    # ------------------------------------------------------------------ detection
    def score(self, model: "HookedLVLM", batch: "Batch") -> torch.Tensor:
        """``[B]`` whitened distances (float64; higher = more suspicious). One forward pass up to ``l_e``."""
        self._check_batch(batch, "score")
        cal = self._check_model(model, "score")
        if self.config.query == "generated":
            run = self._pass(batch, cal.layers, model, armed=self._armed(cal), decode=True)
            gen = model.generate(batch, max_new_tokens=self.config.calibration_tokens, hooks=run.hooks())
            return torch.as_tensor(run.decode_summary(gen.n_tokens)[0])
        return torch.as_tensor(self.scoring_pass(model, batch, armed=True).scores)

    def detect(self, model: "HookedLVLM", batch: "Batch") -> torch.Tensor:
        """``[B]`` bool: ``score > gamma``."""
        return self.score(model, batch) > self._cal("detect").gamma

    def features(self, model: "HookedLVLM", batch: "Batch") -> torch.Tensor:
        """``[B, D]`` float64 feature vectors over the fitted detection layers (layer-major)."""
        return torch.as_tensor(self.scoring_pass(model, batch).features())

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
        run = self._pass(batch, cal.layers, model, armed=self._armed(cal), mask=True,
                         decode=self.config.query == "generated")
        passes = 1
        if self.config.mask_scope == "all_layers":  # detect first (stops at l_e), then mask every layer
            first = self.scoring_pass(model, batch, armed=True)
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
                import yaml  # lazy: pyyaml is optional (YAML calibration files only)
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
        (strictly ascending ints in ``[0, n_layers)``), ``feature`` / ``whitening`` / ``threshold_fit`` (as in
        the config, which must agree), ``mu`` (finite) and ``sigma`` (finite, > 0), each of length
        ``D = len(layers) * n_heads * F`` (``F = 2`` for ``feature="masses"``, else 1), ``matrix`` (``D x D``
        finite; present exactly when ``whitening="ledoit_wolf"``), ``gamma`` (finite, >= 0), ``tau`` (in
        ``(0, 1]``), ``tau_source`` (``"fixed"``: equal to ``config.tau``; ``"auto"``: ``config.tau == "auto"``),
        ``clean_distances`` (>= 2 finite values >= 0: the distances ``gamma`` came from); ``config.layers`` and
        the top-level ``model`` / ``layers`` copies must agree with it. JSON ``NaN`` / ``Infinity`` tokens and
        duplicate keys are refused. Version 2 files (before feature / whitening / threshold_fit) are refused
        with a request to recalibrate.

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
                import yaml  # lazy: pyyaml is optional (YAML calibration files only)

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


#: Kept for callers of the old names (the definitions live in :mod:`cleansight_analysis.detection`).
__all__ = ["CALIBRATION_KEYS", "FILE_FORMAT", "FILE_KEYS", "FILE_VERSION", "MASK_SCOPES", "MODEL_KEYS", "QUERIES",
           "TAU_SOURCES", "Calibration", "CalibrationError", "CleanSight", "CleanSightConfig", "whitened_distance"]
