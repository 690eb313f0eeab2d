"""Can the projector see the trigger at all?  A probe on the frozen vision tower's features.

In the paper's threat model only the projector is poisoned; the vision tower and the LM stay frozen. Whatever
the backdoor does, it must start from what the frozen tower makes of the triggered image. If the tower's
features of triggered and clean images overlap, no projector can tell them apart: the backdoor can neither
fire reliably nor stay silent on clean inputs, and it has nothing distinctive to steal attention with.

:func:`trigger_visibility` measures that overlap with a probe: a logistic regression on the tower's features
(what the projector reads, :meth:`~cleansight_analysis.models.HookedLVLM.vision_features`), half of the images
triggered, half clean, *different* scenes in the two halves (as in a poisoned training set), trained on one
part of the images and scored on the rest. A linear probe is a lower bound on what a trained projector with
the LM behind it can read; a warp that the tower smooths away is invisible to both.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..attention.separability import auroc
from ..errors import InputError

#: Fewest images a probe accepts (half clean, half triggered; a quarter of them held out).
MIN_PROBE_IMAGES = 40


def tpr_at_fpr(clean_scores: Any, triggered_scores: Any, fpr: float) -> tuple[float, float]:
    """True-positive rate at the threshold that flags at most ``fpr`` of ``clean_scores``.

    The threshold is the smallest clean score with at most ``floor(fpr * n_clean)`` clean scores above it;
    an input is flagged when its score is strictly above. Returns ``(tpr, realised_fpr)``.
    """
    clean = np.sort(np.asarray(clean_scores, dtype=np.float64).reshape(-1))
    trig = np.asarray(triggered_scores, dtype=np.float64).reshape(-1)
    if not len(clean) or not len(trig):
        raise InputError(f"tpr_at_fpr: needs clean and triggered scores, got {len(clean)} and {len(trig)}")
    if not 0.0 <= fpr < 1.0:
        raise InputError(f"tpr_at_fpr: fpr must be in [0, 1), got {fpr!r}")
    allowed = int(np.floor(fpr * len(clean) + 1e-9))
    threshold = clean[len(clean) - 1 - allowed]
    return float((trig > threshold).mean()), float((clean > threshold).mean())


def trigger_visibility(model: Any, images: Sequence[Any], attack: Any, *, seed: int = 0, test_fraction: float = 0.25,
                       fpr: float = 0.01, inverse_l2: float = 0.1, batch_size: int = 64) -> dict[str, Any]:
    """How well the frozen vision tower's features separate triggered from clean images.

    Args:
        model: a :class:`~cleansight_analysis.models.HookedLVLM` (its tower and feature layer are used).
        images: clean images of distinct scenes; the odd-numbered ones get the trigger (``attack.apply``).
        attack: an :class:`~cleansight_analysis.attacks.Attack`.
        seed: seeds the attack's randomness (e.g. WaNet's noise) and nothing else; the probe is deterministic.
        test_fraction: share of the images (the last ones) held out to score the probe.
        fpr: the false-positive rate at which ``tpr`` is read.
        inverse_l2: the inverse L2 strength ``C`` of :class:`sklearn.linear_model.LogisticRegression`, fitted on
            features standardised with the training part's mean and standard deviation.

    Returns:
        ``n_train, n_test, auroc`` (held-out, of the probe's decision values), ``tpr`` at ``fpr``, ``fpr``
        (realised) and ``fpr_target``; ``feature_change``: the triggered images' mean relative change of their
        features, ``||f(trigger(x)) - f(x)|| / ||f(x)||`` per token, averaged over tokens and images.

    Cost: the probe holds ``len(images) x n_tokens x d_vision`` float64 values, about 0.5 MB per image for the tiny
    family (64 x 96) and 4.7 MB per image for LLaVA-1.5's tower (576 x 1024): pass fewer images for a large tower.
    """
    from sklearn.linear_model import LogisticRegression

    n = len(images)
    if n < MIN_PROBE_IMAGES:
        raise InputError(f"trigger_visibility: needs at least {MIN_PROBE_IMAGES} images, got {n}")
    if not 0.0 < test_fraction < 1.0:
        raise InputError(f"trigger_visibility: test_fraction must be in (0, 1), got {test_fraction!r}")
    if not 0.0 <= fpr < 1.0:
        raise InputError(f"trigger_visibility: fpr must be in [0, 1), got {fpr!r}")
    if not inverse_l2 > 0:
        raise InputError(f"trigger_visibility: inverse_l2 must be positive, got {inverse_l2!r}")
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    shown = [attack.apply(img, rng=rng) if lab else img for img, lab in zip(images, labels)]
    feats = model.vision_features(shown, batch_size=batch_size).double().numpy()  # [n, tokens, d]
    bare = model.vision_features([images[i] for i in np.flatnonzero(labels)], batch_size=batch_size).double().numpy()
    change = np.linalg.norm(feats[labels == 1] - bare, axis=-1) / np.maximum(np.linalg.norm(bare, axis=-1), 1e-12)

    x = feats.reshape(n, -1)
    n_test = max(4, int(round(n * test_fraction)))
    train, test = slice(0, n - n_test), slice(n - n_test, n)
    mu, sd = x[train].mean(0), x[train].std(0) + 1e-6
    x = (x - mu) / sd
    probe = LogisticRegression(C=inverse_l2, max_iter=5000).fit(x[train], labels[train])
    scores = probe.decision_function(x[test])
    y = labels[test]
    tpr, realised = tpr_at_fpr(scores[y == 0], scores[y == 1], fpr)
    return {"n_train": n - n_test, "n_test": n_test, "auroc": auroc(scores, y), "tpr": tpr, "fpr": realised,
            "fpr_target": float(fpr), "feature_change": float(change.mean())}


__all__ = ["MIN_PROBE_IMAGES", "tpr_at_fpr", "trigger_visibility"]
