"""Reading the answer query's rows inside a forward / generate call: features, detection and Omega in flight.

:class:`QueryPass` holds the hooks of one call. On ``hook_pattern`` of each detection layer it reads only the
query row ``[B, H, K]`` (a :class:`~cleansight_analysis.models.attention_hooks.RowsHook`: computed from q and
k under SDPA attention) and its group masses (:func:`~.features.group_masses`); at the last detection layer
``l_e`` it builds the feature vectors, and with an :class:`Armed` detector it computes distances, flags and
Omega (:func:`~.pruning.omega`), then (``mask=True``) hides Omega from flagged samples: ``l_e`` itself by
dropping Omega from that layer once its row is read (eager: renormalising the post-softmax pattern,
:func:`~cleansight_analysis.models.attention_hooks.drop_keys`; SDPA: the attention mask), later layers and
decode steps before the softmax (:func:`~.masking.key_mask_hook`), per ``mask_scope``.

Public entry points for scoring without generation (what CleanSight's ``fit`` / ``score`` / ``features``,
the layer selector and the detection sweeps all use, so their features agree bit for bit on the same
batches):

- :func:`scoring_pass`: one forward pass over a batch that stops after ``l_e``;
- :func:`batch_masses`: its group masses ``[B, L, H, G]``;
- :func:`sample_masses`: the same over a list of samples in batches (left padding, as for generation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .. import distributed
from ..data.base import Sample
from ..errors import InputError
from ..inputs.batch import Batch, sample_batch
from ..models.attention_hooks import RowsHook
from ..models.hooked import HookedLVLM
from ..models.hooknames import hook_attn_scores, hook_pattern
from ..models.rows import StopForward
from .detector import DetectorSettings
from .features import group_masses, membership
from .masking import key_mask_hook
from .pruning import image_mask, image_token_peaks, omega
from .whitening import Whitener

#: Where the Omega mask applies (see ``CleanSightConfig.mask_scope``).
MASK_SCOPES: tuple[str, ...] = ("reference", "from_detection", "prefill_only", "all_layers")


@dataclass
class Armed:
    """What a pass needs to detect and prune in flight: the fitted whitening, ``gamma`` and ``tau``."""

    whitener: Whitener
    gamma: float
    tau: float


class QueryPass:
    """Hooks of one forward / generate call (see the module docstring).

    Args:
        batch: the batch (token groups); ``T = batch.seq_len``.
        layers: detection layers (ascending); ``l_e = layers[-1]``.
        n_layers: LM layers of the model (for the masks).
        settings: the feature settings (:class:`~.detector.DetectorSettings`).
        armed: when given, ``l_e`` computes distances, flags and Omega.
        mask: hide Omega from flagged samples (per ``mask_scope``).
        token_rows: keep ``max_h alpha^{l_e,h}_{q,j}`` ``[B, T]`` (for ``tau="auto"``).
        stop: raise :class:`StopForward` after ``l_e`` (scoring only).
        decode: also read every decoding query (``query="generated"``): features per step in
            ``step_features``, distances in ``step_scores``, first flag step in ``flag_step``.
    """

    def __init__(self, batch: "Batch", layers: Sequence[int], n_layers: int, settings: DetectorSettings, *,
                 armed: Armed | None = None, mask: bool = False, mask_scope: str = "reference",
                 token_rows: bool = False, stop: bool = False, decode: bool = False):
        if mask_scope not in MASK_SCOPES:
            raise InputError(f"mask_scope={mask_scope!r} must be one of {MASK_SCOPES}")
        self.t, self.b = batch.seq_len, len(batch)
        self.layers = list(layers)
        self.l_e = self.layers[-1]
        self.n_layers = n_layers
        self.settings = settings
        self.armed = armed
        self.mask, self.token_rows, self.stop, self.decode = mask, token_rows, stop, decode
        self.img = image_mask(batch)
        self.member = membership(batch)                # [B, T, G] float64
        self.qpos = batch.query_positions
        self.masses: dict[int, torch.Tensor] = {}      # layer -> [B, H, G] float64 (prefill)
        self.token_max: torch.Tensor | None = None     # [B, T] max over heads at l_e (query row)
        self.scores: np.ndarray | None = None          # [B]
        self.flags: torch.Tensor | None = None         # [B] bool
        self.key_mask: torch.Tensor | None = None      # [B, T] bool: Omega of flagged samples
        self.done = False
        self.step = 0                                  # decode steps seen at l_e
        self._decode_masses: dict[int, torch.Tensor] = {}
        self.step_features: list[np.ndarray] = []      # per step [B, D]; step 0 = prefill
        self.step_scores: list[np.ndarray] = []        # per step [B] (armed)
        self.flag_step: torch.Tensor | None = None     # [B] long: step of the first flag, -1 never
        # first layer masked at prefill on hook_attn_scores (l_e is masked in its pattern hook) and at decode
        self.prefill_from = 0 if mask_scope == "all_layers" else self.l_e + 1
        self.decode_from = {"reference": 0, "all_layers": 0, "from_detection": self.l_e,
                            "prefill_only": None}[mask_scope]

    # -- features ----------------------------------------------------------------------------
    def mass(self) -> torch.Tensor:
        """``[B, L, H, G]`` float64 group masses of the prefill query over the detection layers."""
        return torch.stack([self.masses[layer] for layer in self.layers], dim=1)

    def features(self) -> np.ndarray:
        """``[B, D]`` float64 feature vectors (layer-major)."""
        return self.settings.features(self.mass())

    def _prefill_rows(self, layer: int, rows: torch.Tensor) -> torch.Tensor | None:
        """The prefill query row ``[B, H, T]`` of ``layer``; at ``l_e`` detection and Omega. Returns the keys to
        drop from ``l_e`` (Omega of flagged samples, when masking) or ``None``."""
        self.masses[layer] = group_masses(rows, self.member)
        if layer != self.l_e:
            return None
        self.done = True
        if self.token_rows:
            self.token_max = image_token_peaks(rows, self.t)
        feats = self.features() if (self.decode or self.armed is not None) else None
        if self.decode:
            self.step_features.append(feats)
        drop = None
        if self.armed is not None:
            self.scores = self.armed.whitener.distance(feats)
            self.flags = torch.as_tensor(self.scores > self.armed.gamma)
            self.key_mask = omega(rows, self.img, self.armed.tau) & self.flags[:, None]
            if self.decode:
                self.step_scores.append(self.scores)
                self.flag_step = torch.where(self.flags, 0, -1)
            if self.mask and bool(self.key_mask.any()):
                drop = self.key_mask
        if self.stop:
            raise StopForward
        return drop

    def _decode_step(self, layer: int, rows: torch.Tensor) -> torch.Tensor | None:
        """Score one decoding query (``query="generated"``; ``rows`` ``[B, H, K]``, ``K = T`` + steps so far);
        flag and mask samples crossing ``gamma``. Returns the keys to drop from this step's ``l_e`` or ``None``."""
        extra = rows.shape[-1] - self.t
        gen = torch.zeros(self.b, extra, self.member.shape[-1], dtype=self.member.dtype)
        gen[..., -1] = 1.0                                 # generated tokens: the last group (text keys)
        self._decode_masses[layer] = group_masses(rows, torch.cat([self.member, gen], 1))
        if layer != self.l_e:
            return None
        self.step += 1
        feats = self.settings.features(torch.stack([self._decode_masses[x] for x in self.layers], dim=1))
        self.step_features.append(feats)
        if self.armed is None or self.flags is None or self.key_mask is None:
            return None
        dist = self.armed.whitener.distance(feats)
        self.step_scores.append(dist)
        new = torch.as_tensor(dist > self.armed.gamma) & ~self.flags
        if not bool(new.any()):
            return None
        self.key_mask = torch.where(new[:, None], omega(rows, self.img, self.armed.tau), self.key_mask)
        self.flags = self.flags | new
        self.flag_step = torch.where(new, self.step, self.flag_step)
        if self.mask:  # this step's l_e row of the newly flagged samples (earlier layers ran unmasked)
            return self.key_mask & new[:, None]
        return None

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

    # -- hooks -------------------------------------------------------------------------------
    def hooks(self) -> list:
        out: list = [(hook_pattern(layer), _QueryRows(self, layer)) for layer in self.layers]
        if self.mask:
            for layer in range(self.n_layers):
                pre = layer >= self.prefill_from
                dec = self.decode_from is not None and layer >= self.decode_from
                if pre or dec:
                    fn = key_mask_hook(lambda: self.key_mask, seq_len=self.t, prefill=pre, decode=dec)
                    out.append((hook_attn_scores(layer), fn))
        return out


class _QueryRows(RowsHook):
    """The answer query's row of one detection layer: at prefill (``Q = K = T``, until ``l_e`` is done) and,
    with ``decode``, the single query of every decode step after it."""

    def __init__(self, run: QueryPass, layer: int):
        self.run, self.layer = run, layer

    def queries(self, batch: int, q_len: int, k_len: int) -> torch.Tensor | None:
        run = self.run
        if q_len == run.t and k_len == run.t:
            return None if run.done else run.qpos[:, None]
        if run.decode and run.done and q_len == 1:
            return torch.zeros(batch, 1, dtype=torch.long)
        return None

    def read(self, rows: torch.Tensor) -> torch.Tensor | None:
        rows = rows[:, :, 0].detach().float().cpu()  # [B, H, K]
        if rows.shape[-1] == self.run.t:
            return self.run._prefill_rows(self.layer, rows)
        return self.run._decode_step(self.layer, rows)


def scoring_pass(model: "HookedLVLM", batch: "Batch", layers: Sequence[int], settings: DetectorSettings, *,
                 armed: Armed | None = None, token_rows: bool = False) -> QueryPass:
    """One forward pass over ``batch`` that reads the detection layers and stops after ``l_e``."""
    run = QueryPass(batch, layers, model.n_layers, settings, armed=armed, token_rows=token_rows, stop=True)
    inputs = batch.to(model.device, model.dtype).model_inputs()
    try:
        with torch.no_grad(), model.hooks(run.hooks()):
            model.hf_model(**inputs, use_cache=False, logits_to_keep=1)
    except StopForward:
        pass
    if not run.done:
        raise InputError("the detection layers' attention hooks never fired; is this a bridge-wrapped model whose "
                         "attention is editable?")
    return run


def batch_masses(model: "HookedLVLM", batch: "Batch", layers: Sequence[int]) -> torch.Tensor:
    """``[B, L, H, G]`` float64 group masses of the answer query (:data:`~.features.MASS_GROUPS`)."""
    layers = sorted(set(model.check_layers(layers)))
    return scoring_pass(model, batch, layers, DetectorSettings()).mass()


def sample_masses(model: "HookedLVLM", samples: Sequence["Sample"], layers: Sequence[int], *, batch_size: int = 16,
                  token_rows: bool = False, progress: bool = False,
                  desc: str = "detection features") -> tuple[np.ndarray, list[torch.Tensor]]:
    """Group masses of ``samples`` in consecutive batches of ``batch_size`` (``model.prepare``, left padding).

    Returns:
        ``(mass [N, L, H, G] float64, peaks)``; ``peaks``: with ``token_rows``, per batch the pooled
        ``max_h alpha^{l_e,h}_{q,j}`` over every image token ``[n_image_tokens]``, else empty.

    Inside :func:`cleansight_analysis.distributed.shared_work` under ``accelerate launch`` the batches are
    shared out between the processes and every process gets the same result.
    """

    layers = sorted(set(model.check_layers(layers)))

    def one(start: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        run = scoring_pass(model, sample_batch(model, samples, start, batch_size), layers, DetectorSettings(),
                           token_rows=token_rows)
        return run.mass(), (run.token_max[run.img] if token_rows and run.token_max is not None else None)

    # inside distributed.shared_work() (a launched calibration) each process computes its share of the batches
    done = distributed.map_batches(one, len(samples), batch_size, progress=progress, desc=desc)
    return torch.cat([m for m, _ in done]).numpy(), [p for _, p in done if p is not None]


__all__ = ["Armed", "MASK_SCOPES", "QueryPass", "batch_masses", "sample_masses", "scoring_pass"]
