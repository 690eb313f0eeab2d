"""Choosing CleanSight's detection layers ``L_det`` from data (``docs/method.md#detection-layers``).

Two rules, both returning a contiguous window of ``window`` LM layers (ascending, 0-indexed):

- ``method="fusion_onset"`` (clean samples only). For every layer ``l`` separately, the answer
  query (last prompt token) is cut off from the image in that layer alone: its pre-softmax scores on
  the image keys get the dtype's most negative finite value (:func:`fusion_onset_profile`). The
  effect ``e_l`` is the mean KL divergence ``KL(p || p_blocked_l)`` of the next-token distribution at
  the query (or the L2 distance of the logits, ``divergence="l2"``). Rule ``"onset"`` (default): the
  window starts at the **first layer whose effect reaches ``onset_fraction`` (0.5) of the largest
  effect** -- the layer where the answer starts to read the image, i.e. where fusion sets in.
  Rule ``"peak"``: the window starts at the layer with the largest effect. A window that would run
  past the last layer is shifted down so that it fits.
- ``method="auroc"`` (needs triggered samples). Stealing features of every layer on clean and
  triggered samples (:func:`cleansight_analysis.detection.sample_masses`, the features CleanSight
  computes); for every window the whitened distance (``settings``, default the detector's defaults) is
  fitted on the clean samples of even index and scored on the clean samples of odd index (label 0) and on
  every triggered sample (label 1); the window with the highest AUROC wins (ties: the earliest).
"""

from __future__ import annotations

import numbers
from typing import Any, Sequence

import numpy as np
import torch

from .. import distributed
from ..data.base import Sample, check_samples
from ..detection.detector import DetectorSettings
from ..detection.masking import key_mask_hooks
from ..detection.passes import sample_masses
from ..detection.pruning import image_mask
from ..detection.whitening import Whitener
from ..errors import InputError
from ..inputs.batch import sample_batch
from ..models.hooked import HookedLVLM

METHODS: tuple[str, ...] = ("fusion_onset", "auroc")
ONSET_RULES: tuple[str, ...] = ("onset", "peak")
DIVERGENCES: tuple[str, ...] = ("kl", "l2")


def _query_logits(model: "HookedLVLM", batch: Any, hooks: list) -> torch.Tensor:
    """``[B, V]`` float64 logits at each sample's last prompt token."""
    q = batch.query_positions
    left = bool((q == batch.seq_len - 1).all())
    logits = model.forward(batch, hooks=hooks, logits_to_keep=1 if left else 0)
    if left:
        return logits[:, -1].double().cpu()
    return logits[torch.arange(len(batch)), q.to(logits.device)].double().cpu()


def fusion_onset_profile(model: "HookedLVLM", samples: Sequence["Sample"], *, batch_size: int = 16,
                         divergence: str = "kl", progress: bool = False) -> np.ndarray:
    """Effect of blocking image -> answer-query attention in each single layer: ``[n_layers]``.

    Args:
        model: the hooked LVLM.
        samples: clean samples.
        divergence: ``"kl"``: mean ``KL(p || p_blocked)`` of the next-token distributions at the query;
            ``"l2"``: mean L2 distance of the query's logits.
        progress: a progress bar over the batches.

    Returns:
        ``[n_layers]`` float64, the mean effect per layer. A left-padded batch (the query is every sample's
        last token) runs its prompt once and each blocked layer as one decode step of the last token
        (:meth:`~cleansight_analysis.models.hooked.HookedLVLM.last_token_logits`); otherwise ``n_layers + 1``
        forward passes. Batches are shared out between launched processes inside
        :func:`cleansight_analysis.distributed.shared_work`.
    """

    samples = check_samples(samples, "fusion_onset_profile")
    if divergence not in DIVERGENCES:
        raise InputError(f"fusion_onset_profile: divergence={divergence!r} must be one of {DIVERGENCES}")
    n_layers = model.n_layers

    def one(start: int) -> np.ndarray:
        """``[n_layers]``: the batch's summed effect per layer."""
        batch = sample_batch(model, samples, start, batch_size)
        # only the answer query's row loses the image keys, in one layer per variant
        variants = [key_mask_hooks(model, image_mask(batch), layers=[layer], query=batch.query_positions)
                    for layer in range(n_layers)]
        if model.decodes_last_token(batch):
            # the query is every sample's last token and only its row changes: the prompt before it runs
            # once (KV cache), each variant is one decode step
            logits = model.last_token_logits(batch, [[], *variants]).double().cpu()
        else:
            logits = torch.stack([_query_logits(model, batch, hooks) for hooks in [[], *variants]])
        base = logits[0]
        sums = np.zeros(n_layers)
        for layer in range(n_layers):
            blocked = logits[layer + 1]
            if divergence == "kl":
                lp, lq = base.log_softmax(-1), blocked.log_softmax(-1)
                eff = (lp.exp() * (lp - lq)).sum(-1)
            else:
                eff = (base - blocked).norm(dim=-1)
            sums[layer] = float(eff.sum())
        return sums

    total = np.zeros(n_layers)
    # inside distributed.shared_work() each launched process computes its share of the batches; the sums are
    # added in batch order either way, so the profile is the same bits as in one process
    for sums in distributed.map_batches(one, len(samples), batch_size, progress=progress, desc="fusion-onset scan"):
        total += sums
    return total / len(samples)


def _window_start(effect: np.ndarray, window: int, rule: str, onset_fraction: float) -> int:
    n = len(effect)
    if rule == "peak":
        start = int(np.argmax(effect))
    else:
        peak = float(effect.max())
        start = int(np.flatnonzero(effect >= onset_fraction * peak)[0]) if peak > 0 else 0
    return max(0, min(start, n - window))


def window_aurocs(model: "HookedLVLM", clean_samples: Sequence["Sample"], poisoned_samples: Sequence["Sample"], *,
                  window: int = 3, text_keys: str = "post_image", batch_size: int = 16,
                  eps: float = 1e-12, settings: DetectorSettings | None = None) -> dict[int, float]:
    """AUROC of the concatenated head vectors of every window ``[s, s + window)``: ``{start: auroc}``.

    Calibration: clean samples of even index; scored: clean of odd index (0) and every poisoned (1).
    ``settings``: feature and whitening (default :class:`~cleansight_analysis.detection.DetectorSettings`
    with ``text_keys`` and ``eps``).
    """
    from sklearn.metrics import roc_auc_score


    clean = check_samples(clean_samples, "window_aurocs")
    poisoned = check_samples(poisoned_samples, "window_aurocs")
    if len(clean) < 4:
        raise InputError(f"window_aurocs: needs at least 4 clean samples (half calibrate, half are scored), got {len(clean)}")
    settings = settings or DetectorSettings(text_keys=text_keys, eps=eps)
    all_layers = list(range(model.n_layers))
    mc = sample_masses(model, clean, all_layers, batch_size=batch_size)[0]      # [N, L, H, G]
    mp = sample_masses(model, poisoned, all_layers, batch_size=batch_size)[0]
    cal, test = mc[0::2], mc[1::2]
    labels = np.r_[np.zeros(len(test)), np.ones(len(mp))]
    result = {}
    for start in range(model.n_layers - window + 1):
        sl = slice(start, start + window)
        det = Whitener(settings.whitening, sigma_eps=settings.sigma_eps).fit(settings.features(cal[:, sl]))
        scores = np.r_[det.distance(settings.features(test[:, sl])), det.distance(settings.features(mp[:, sl]))]
        result[start] = float(roc_auc_score(labels, scores))
    return result


def select_detection_layers(model: "HookedLVLM", clean_samples: Sequence["Sample"], method: str = "fusion_onset",
                            poisoned_samples: Sequence["Sample"] | None = None, window: int = 3, *,
                            rule: str = "onset", onset_fraction: float = 0.5, divergence: str = "kl",
                            text_keys: str = "post_image", batch_size: int = 16,
                            details: dict | None = None, settings: DetectorSettings | None = None,
                            progress: bool = False) -> list[int]:
    """A contiguous window of ``window`` detection layers (see the module docstring for the rules).

    Args:
        model: the hooked LVLM.
        clean_samples: clean samples (both methods).
        method: ``"fusion_onset"`` (clean only) or ``"auroc"`` (needs ``poisoned_samples``).
        window: number of layers (1..n_layers).
        rule, onset_fraction, divergence: fusion-onset settings.
        text_keys, batch_size: feature settings for ``"auroc"``; forward batch size.
        settings: ``"auroc"``: the detector's feature / whitening settings (default: the defaults with
            ``text_keys``).
        details: if a dict is given, it receives the per-layer effects (``"effect"``) or the per-window
            AUROCs (``"aurocs"``) and the rule used, for recording with the results.
        progress: ``"fusion_onset"``: a progress bar over the scan's batches.

    Returns:
        ascending 0-indexed layers.
    """
    if method not in METHODS:
        raise InputError(f"select_detection_layers: method={method!r} must be one of {METHODS}")
    if not isinstance(window, numbers.Integral) or isinstance(window, bool) or not 1 <= window <= model.n_layers:
        raise InputError(f"select_detection_layers: window={window!r} must be an int in 1..{model.n_layers}")
    if method == "fusion_onset":
        if poisoned_samples is not None:
            raise InputError("select_detection_layers: method='fusion_onset' uses clean samples only; "
                             "poisoned_samples needs method='auroc'")
        if rule not in ONSET_RULES:
            raise InputError(f"select_detection_layers: rule={rule!r} must be one of {ONSET_RULES}")
        if not isinstance(onset_fraction, numbers.Real) or not 0.0 < float(onset_fraction) <= 1.0:
            raise InputError(f"select_detection_layers: onset_fraction={onset_fraction!r} must be in (0, 1]")
        effect = fusion_onset_profile(model, clean_samples, batch_size=batch_size, divergence=divergence,
                                      progress=progress)
        start = _window_start(effect, int(window), rule, float(onset_fraction))
        if details is not None:
            details.update(method=method, rule=rule, onset_fraction=float(onset_fraction), divergence=divergence,
                           effect=effect.tolist(), start=start)
    else:
        if poisoned_samples is None:
            raise InputError("select_detection_layers: method='auroc' needs poisoned_samples (triggered inputs)")
        scores = window_aurocs(model, clean_samples, poisoned_samples, window=int(window), text_keys=text_keys,
                               batch_size=batch_size, settings=settings)
        best = max(scores.values())
        start = min(s for s, v in scores.items() if v == best)
        if details is not None:
            details.update(method=method, aurocs=scores, start=start)
    return list(range(start, start + int(window)))
