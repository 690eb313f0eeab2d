"""Baseline test-time defenses: pixel purifiers and three input-level detectors.

Purifiers (``kind = "purifier"``) transform every input image before the model sees it:

=========== ==========================================================================================
name        what :class:`Purifier` does (via :func:`~cleansight_analysis.interventions.get_perturbation`)
=========== ==========================================================================================
blur        the paper's Blur baseline, ``(1 - t) x + t blur(x)``, Gaussian radius ``0.06 t min(H, W)``
st          the paper's ST baseline (mirror, random shrink with grey pad, random rotation)
shrinkpad   deterministic shrink by ``1 - 0.8 t`` and grey pad
jpeg        JPEG re-encoding, quality ``95 -> 5`` as ``t`` goes ``0+ -> 1``
=========== ==========================================================================================

The paper uses intensity ``t = 0.7``, the default here.

Detectors (``kind = "detector"``) score each input, higher = more suspicious, and are calibrated the way
CleanSight is: ``fit`` scores clean samples and sets ``threshold`` to their ``quantile`` (default 0.99,
so the clean false-positive rate is about 1 %); ``detect`` is ``score > threshold``.

=================== =================================================================================
detector            score (``[B]``, higher = more suspicious)
=================== =================================================================================
StripDetector       STRIP: minus the mean entropy (nats) of the first-answer-token distribution over
                    ``n_overlays`` blends ``alpha x + (1 - alpha) c`` of the input with held-out clean
                    images ``c``. A trigger that survives blending keeps the answer fixed (low entropy).
AttentionEntropy-   BYE-style: minus the entropy (nats) of the last prompt token's attention over the
Detector            image tokens (head-averaged, renormalised within the image tokens), averaged over
                    ``layers``. Attention stolen by a trigger patch is concentrated (low entropy).
ScaleUpDetector     SCALE-UP: share of ``scales`` whose pixel-amplified input ``clip(s x, 0, 255)``
                    keeps the greedy first answer token of the original input (scaled prediction
                    consistency). Triggered inputs keep predicting the target under amplification.
=================== =================================================================================

Pixel edits of a prepared batch (blending, amplification, purification of flagged inputs) act on the
image *as the vision tower saw it* (:meth:`HookedLVLM.processed_image`, ``[H, W, 3]`` uint8 at the
processor's resolution) and the batch is rebuilt with its rendered prompts (``batch.texts``), so a
detector works on any :class:`~cleansight_analysis.inputs.Batch` without the original image files. For
LLaVA-1.5 this round trip is exact; for LLaVA-NeXT only the low-resolution whole-image view is kept.

Usage::

    det = get_defense("strip", n_overlays=8).fit(model, clean_samples)
    batch = det.prepare(model, images, prompts)
    out = det.generate(model, batch, max_new_tokens=12)   # texts, flags, scores
"""

from __future__ import annotations

import math
import numbers
from dataclasses import replace
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from ..data.base import check_samples
from ..errors import InputError
from ..inputs.images import to_rgb_image
from ..interventions import get_perturbation
from .base import Defense, DefenseOutput

#: Pixel kinds a :class:`Purifier` accepts (the registry builds the first four by name).
PURIFIER_KINDS: tuple[str, ...] = ("blur", "st", "shrinkpad", "jpeg", "noise")
#: What a detector does with the inputs it flags.
THEN_ACTIONS: tuple[str, ...] = ("none", "purify")


# ---------------------------------------------------------------------------------------------- checks
def _check_number(value: Any, what: str, owner: str, lo: float, hi: float, *, lo_open: bool = False,
                  hi_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise InputError(f"{owner}: {what} must be a finite number, got {value!r}")
    v = float(value)
    if (v <= lo if lo_open else v < lo) or (v >= hi if hi_open else v > hi):
        lo_b, hi_b = "(" if lo_open else "[", ")" if hi_open else "]"
        raise InputError(f"{owner}: {what} must be in {lo_b}{lo}, {hi}{hi_b}, got {value!r}")
    return v


def _check_int(value: Any, what: str, owner: str, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < lo:
        raise InputError(f"{owner}: {what} must be an integer >= {lo}, got {value!r}")
    return int(value)


def _check_choice(value: Any, what: str, owner: str, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value.strip().lower() not in choices:
        raise InputError(f"{owner}: {what} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value.strip().lower()


# ---------------------------------------------------------------------------------------------- image helpers
def superimpose(image: Any, overlay: Any, alpha: float = 0.5) -> Image.Image:
    """STRIP's blend ``round(alpha * image + (1 - alpha) * overlay)`` (overlay resized to ``image``).

    Args:
        image: the input, ``PIL.Image`` or ``[H, W, 3]`` uint8 array.
        overlay: a clean image of any size (bilinear-resized to the input's size).
        alpha: weight of ``image`` in ``[0, 1]``.

    Returns:
        RGB ``PIL.Image`` with the size of ``image``.
    """
    alpha = _check_number(alpha, "alpha", "superimpose", 0.0, 1.0)
    x = np.asarray(_rgb(image), dtype=np.float64)
    over = _rgb(overlay)
    if over.size != (x.shape[1], x.shape[0]):
        over = over.resize((x.shape[1], x.shape[0]), Image.BILINEAR)
    out = alpha * x + (1.0 - alpha) * np.asarray(over, dtype=np.float64)
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))


def amplify(image: Any, scale: float) -> Image.Image:
    """SCALE-UP's pixel amplification ``clip(round(scale * x), 0, 255)`` of an RGB image."""
    scale = _check_number(scale, "scale", "amplify", 0.0, float("inf"), lo_open=True, hi_open=True)
    x = np.asarray(_rgb(image), dtype=np.float64)
    return Image.fromarray(np.clip(np.rint(x * scale), 0, 255).astype(np.uint8))


def _rgb(image: Any) -> Image.Image:
    return to_rgb_image(image, where="baseline defense image")


def batch_images(model: Any, batch: Any) -> list[list[Image.Image]]:
    """Per sample, the images of ``batch`` as the vision tower saw them (``PIL`` RGB, processor size)."""
    per_sample = batch.images_per_sample or [1] * len(batch)
    out, k = [], 0
    for n in per_sample:
        out.append([Image.fromarray(model.processed_image(batch, k + j)) for j in range(n)])
        k += n
    return out


def rebuild(model: Any, batch: Any, images: Sequence[Sequence[Any]], rows: Sequence[int] | None = None) -> Any:
    """A new batch with the same rendered prompts as ``batch`` (rows ``rows``, default all) and new images.

    Args:
        images: one list of images per selected row (a multi-image sample keeps its image count).
        rows: indices into ``batch`` whose prompts to reuse, in order.
    """
    rows = list(range(len(batch))) if rows is None else list(rows)
    if len(images) != len(rows):
        raise InputError(f"rebuild: {len(images)} image entries for {len(rows)} rows")
    texts = [batch.texts[i] for i in rows]
    return model.prepare([list(ims) for ims in images], texts, chat_template=False,
                         padding_side=batch.padding_side)


def first_token_logits(model: Any, batch: Any) -> torch.Tensor:
    """``[B, V]`` float32 logits at each sample's last prompt token (they predict the first answer token)."""
    qpos = batch.query_positions
    if bool((qpos == batch.seq_len - 1).all()):
        logits = model.forward(batch, logits_to_keep=1)[:, -1]
    else:  # right padding: gather each sample's own last prompt position
        logits = model.forward(batch)
        logits = logits[torch.arange(len(batch)), qpos.to(logits.device)]
    return logits.float().cpu()


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in nats of ``softmax(logits)`` over the last dim: ``[..., V] -> [...]``."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def distribution_entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Entropy in nats of non-negative weights ``p`` renormalised along ``dim`` (``0 log 0 = 0``)."""
    p = p.double().clamp_min(0)
    p = p / p.sum(dim, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    return -torch.special.xlogy(p, p).sum(dim)


def _chunks(n: int, size: int):
    for s in range(0, n, size):
        yield range(s, min(n, s + size))


# ---------------------------------------------------------------------------------------------- purifier
class Purifier(Defense):
    """Transform every input image with a pixel perturbation, then run the model unchanged.

    Args:
        kind: one of :data:`PURIFIER_KINDS` (``blur``, ``st``, ``shrinkpad``, ``jpeg``; also ``noise``).
        intensity: strength in ``[0, 1]`` (0 = identity; the paper uses 0.7).
        seed: seed of random transforms (``st``); each image gets its own deterministic draw.
        **settings: further fields of the perturbation class (e.g. ``min_quality`` for ``jpeg``).

    ``name`` is the transform kind; ``kind`` is ``"purifier"``.
    """

    kind = "purifier"

    def __init__(self, kind: str, intensity: float = 0.7, seed: int = 0, **settings: Any):
        self.transform = _check_choice(kind, "kind", "Purifier", PURIFIER_KINDS)
        self.name = self.transform
        self.intensity = _check_number(intensity, "intensity", f"Purifier({self.transform!r})", 0.0, 1.0)
        self.seed = seed
        self.settings = dict(settings)
        self.perturbation = get_perturbation(self.transform, self.intensity, seed=seed, **settings)

    def purify(self, image: Any) -> Any:
        """The transformed image (``PIL`` RGB, same size); a list of images is transformed one by one."""
        if isinstance(image, (list, tuple)):
            return [self.perturbation.apply_image(im) for im in image]
        return self.perturbation.apply_image(image)

    def prepare(self, model: Any, images: Sequence[Any], prompts: Sequence[str] | str) -> Any:
        """``model.prepare`` on the purified images (one entry per prompt; lists for multi-image samples)."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        return model.prepare([self.purify(im) for im in images], prompts)

    def purify_batch(self, model: Any, batch: Any, rows: Sequence[int] | None = None) -> Any:
        """A rebuilt batch (rows ``rows`` of ``batch``) whose processed images are purified."""
        rows = list(range(len(batch))) if rows is None else list(rows)
        imgs = batch_images(model, batch)
        return rebuild(model, batch, [self.purify(imgs[i]) for i in rows], rows)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "intensity": self.intensity, "seed": self.seed,
                **self.settings}


# ---------------------------------------------------------------------------------------------- detectors
class CalibratedDetector(Defense):
    """Shared machinery of the baseline detectors: quantile calibration, detection, optional purification.

    Args:
        quantile: the threshold is this quantile of the clean calibration scores (linear
            interpolation, ``torch.quantile``); must be in ``(0, 1)``.
        min_samples: fewest clean calibration scores ``fit`` accepts (at least 2).
        batch_size: samples per forward pass (detectors that perturb run several passes per sample).
        then: ``"none"`` (answers unchanged, flags reported) or ``"purify"`` (flagged samples are
            answered again from purified images).
        purifier: kind of the :class:`Purifier` used when ``then="purify"``.
        purifier_intensity: its intensity.
    """

    kind = "detector"

    def __init__(self, *, quantile: float = 0.99, min_samples: int = 10, batch_size: int = 16,
                 then: str = "none", purifier: str = "jpeg", purifier_intensity: float = 0.7):
        owner = type(self).__name__
        self.quantile = _check_number(quantile, "quantile", owner, 0.0, 1.0, lo_open=True, hi_open=True)
        self.min_samples = _check_int(min_samples, "min_samples", owner, 2)
        self.batch_size = _check_int(batch_size, "batch_size", owner, 1)
        self.then = _check_choice(then, "then", owner, THEN_ACTIONS)
        self.purifier = Purifier(purifier, purifier_intensity)
        self.threshold: float | None = None
        self.clean_scores: torch.Tensor | None = None

    # -- subclasses
    def _score_batch(self, model: Any, batch: Any) -> torch.Tensor:
        """``[B]`` scores of one prepared batch (override)."""
        raise NotImplementedError

    def _setup(self, model: Any, samples: list[Any]) -> list[Any]:
        """Keep what scoring needs from the fit set; return the samples left for calibration."""
        return samples

    def _settings(self) -> dict[str, Any]:
        return {}

    # -- interface
    def fit(self, model: Any, clean_samples: Sequence[Any]) -> "CalibratedDetector":
        """Score clean samples and set ``threshold`` to their ``quantile``.

        Args:
            clean_samples: :class:`~cleansight_analysis.data.Sample` list (images and prompts).

        Raises:
            InputError: not a list of samples, or fewer than ``min_samples`` left for calibration.
        """
        samples = check_samples(clean_samples, f"{type(self).__name__}.fit")
        calib = self._setup(model, samples)
        if len(calib) < self.min_samples:
            raise InputError(
                f"{type(self).__name__}.fit: {len(calib)} clean sample(s) left for calibration, need at least "
                f"min_samples={self.min_samples} (got {len(samples)} in all{self._held_note()}); "
                "pass more clean samples or lower min_samples")
        scores = []
        for idx in _chunks(len(calib), self.batch_size):
            chunk = [calib[i] for i in idx]
            batch = model.prepare([s.image for s in chunk], [s.prompt for s in chunk])
            scores.append(self.score(model, batch))
        self.clean_scores = torch.cat(scores).double()
        if not bool(torch.isfinite(self.clean_scores).all()):
            raise InputError(f"{type(self).__name__}.fit: some clean scores are not finite")
        self.threshold = float(torch.quantile(self.clean_scores, self.quantile))
        return self

    def _held_note(self) -> str:
        return ""

    def score(self, model: Any, batch: Any) -> torch.Tensor:
        """``[B]`` float64 scores, higher = more suspicious (see the class docstring for what they are)."""
        out = []
        for idx in _chunks(len(batch), self.batch_size):
            sub = batch if len(idx) == len(batch) else _select(batch, list(idx))
            out.append(self._score_batch(model, sub).double().cpu())
        return torch.cat(out)

    def _check_fitted(self) -> float:
        if self.threshold is None:
            raise InputError(f"{type(self).__name__} is not calibrated: call fit(model, clean_samples) first")
        return self.threshold

    def detect(self, model: Any, batch: Any) -> torch.Tensor:
        """``[B]`` bool: ``score > threshold``."""
        threshold = self._check_fitted()
        return self.score(model, batch) > threshold

    def generate(self, model: Any, batch: Any, max_new_tokens: int = 12) -> DefenseOutput:
        """Answers with flags and scores; with ``then="purify"`` flagged samples are answered from
        purified images (unflagged samples keep the model's own answer)."""
        threshold = self._check_fitted()
        scores = self.score(model, batch)
        flags = scores > threshold
        texts = list(model.generate(batch, max_new_tokens=max_new_tokens).texts)
        info: dict[str, Any] = {"threshold": threshold, "then": self.then}
        if self.then == "purify":
            rows = torch.nonzero(flags).flatten().tolist()
            if rows:
                purified = self.purifier.purify_batch(model, batch, rows)
                new = model.generate(purified, max_new_tokens=max_new_tokens).texts
                for i, text in zip(rows, new):
                    texts[i] = text
            info["purified"] = rows
        return DefenseOutput(texts=texts, flags=flags, scores=scores, info=info)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "quantile": self.quantile, "min_samples": self.min_samples,
                "batch_size": self.batch_size, "then": self.then, "purifier": self.purifier.to_dict(),
                "threshold": self.threshold, **self._settings()}


def _select(batch: Any, rows: list[int]) -> Any:
    """Rows of a batch (images follow their samples; token positions stay valid: padding is kept)."""
    per = batch.images_per_sample or [1] * len(batch)
    starts = np.concatenate([[0], np.cumsum(per)]).astype(int)
    img_idx = [k for i in rows for k in range(starts[i], starts[i + 1])]
    return replace(
        batch,
        input_ids=batch.input_ids[rows],
        attention_mask=batch.attention_mask[rows],
        pixel_values=batch.pixel_values[img_idx],
        groups=[batch.groups[i] for i in rows],
        image_sizes=None if batch.image_sizes is None else batch.image_sizes[img_idx],
        prompts=[batch.prompts[i] for i in rows] if batch.prompts else [],
        texts=[batch.texts[i] for i in rows] if batch.texts else [],
        images_per_sample=[per[i] for i in rows],
    )


class StripDetector(CalibratedDetector):
    """STRIP (Gao et al. 2019) on the first answer token.

    Each input image ``x`` is blended with ``n_overlays`` clean images ``c_k`` as
    ``alpha x + (1 - alpha) c_k`` (:func:`superimpose`); for each blend the model's distribution over
    the first answer token (softmax of the logits at the last prompt position) gives an entropy
    ``H_k`` in nats. Score: ``-mean_k H_k`` (``[B]``). A trigger that survives blending pins the
    answer, so low entropy (high score) is suspicious.

    The ``c_k`` are ``n_overlays`` clean images drawn (with ``seed``) from the ``fit`` samples and held
    out of calibration; the other fit samples calibrate the threshold.

    Args:
        n_overlays: blends per input (BackdoorBench uses 64; 8 keeps it cheap).
        alpha: weight of the input in each blend.
        seed: which fit samples become overlays.
        **common: see :class:`CalibratedDetector`.
    """

    name = "strip"

    def __init__(self, n_overlays: int = 8, alpha: float = 0.5, seed: int = 0, **common: Any):
        super().__init__(**common)
        self.n_overlays = _check_int(n_overlays, "n_overlays", "StripDetector", 1)
        self.alpha = _check_number(alpha, "alpha", "StripDetector", 0.0, 1.0, hi_open=True)
        self.seed = _check_int(seed, "seed", "StripDetector", 0)
        self.overlays: list[Image.Image] | None = None

    def _settings(self) -> dict[str, Any]:
        return {"n_overlays": self.n_overlays, "alpha": self.alpha, "seed": self.seed}

    def _held_note(self) -> str:
        return f", {self.n_overlays} held out as overlays"

    def _setup(self, model: Any, samples: list[Any]) -> list[Any]:
        if len(samples) <= self.n_overlays:
            raise InputError(
                f"StripDetector.fit: {len(samples)} clean sample(s), but n_overlays={self.n_overlays} are held out as "
                f"overlay images and at least min_samples={self.min_samples} more are needed for calibration")
        order = np.random.default_rng(self.seed).permutation(len(samples))
        held = [samples[i] for i in order[: self.n_overlays]]
        batch = model.prepare([s.image for s in held], [s.prompt for s in held])
        self.set_overlays([ims[0] for ims in batch_images(model, batch)])
        return [samples[i] for i in sorted(order[self.n_overlays:])]

    def set_overlays(self, images: Sequence[Any]) -> "StripDetector":
        """Use these clean images as overlays (``fit`` draws them from the fit set)."""
        if len(images) == 0:
            raise InputError("StripDetector.set_overlays: no images")
        self.overlays = [_rgb(im) for im in images]
        self.n_overlays = len(self.overlays)
        return self

    def blends(self, model: Any, batch: Any) -> list[list[list[Image.Image]]]:
        """``[B][n_overlays]`` blended image lists (each image of a sample blended with the same overlay)."""
        if self.overlays is None:
            raise InputError("StripDetector has no overlay images: call fit(model, clean_samples) first")
        return [[[superimpose(im, c, self.alpha) for im in ims] for c in self.overlays]
                for ims in batch_images(model, batch)]

    def overlay_entropies(self, model: Any, batch: Any) -> torch.Tensor:
        """``[B, n_overlays]`` first-token entropies (nats) of the blended inputs."""
        blends = self.blends(model, batch)
        b, n = len(batch), len(self.overlays or [])
        flat_rows = [i for i in range(b) for _ in range(n)]
        flat_imgs = [blends[i][k] for i in range(b) for k in range(n)]
        ents = []
        for idx in _chunks(len(flat_rows), max(self.batch_size, n)):
            sub = rebuild(model, batch, [flat_imgs[j] for j in idx], [flat_rows[j] for j in idx])
            ents.append(entropy(first_token_logits(model, sub)))
        return torch.cat(ents).view(b, n)

    def _score_batch(self, model: Any, batch: Any) -> torch.Tensor:
        return -self.overlay_entropies(model, batch).mean(1)


class AttentionEntropyDetector(CalibratedDetector):
    """Attention-entropy filter in the style of BYE (Rong et al.), used at test time.

    For each sample, take the last prompt token's post-softmax attention row in each chosen layer
    (``model.attention_rows(batch, layers=...)``, ``values [B, L, H, K]``), keep the image keys
    (``batch.groups[i].image``), reduce the heads and renormalise within the image tokens, and take the
    Shannon entropy in nats. Score: minus the mean entropy over layers (``[B]``). A trigger that steals
    attention concentrates it on a few patches (low entropy, high score). Bounds: ``0`` (one-hot) to
    ``log(n_image)`` (uniform), so the score lies in ``[-log n_image, 0]``.

    Args:
        layers: LM layers (default all; BYE selects "sensitive" layers with a 2-GMM, which needs
            poisoned samples and is not done here).
        head_reduce: ``"attention"`` (BYE: average the heads' rows, then the entropy) or ``"entropy"``
            (entropy per head, then the average).
        **common: see :class:`CalibratedDetector`.
    """

    name = "attention_entropy"

    def __init__(self, layers: int | Sequence[int] | None = None, head_reduce: str = "attention", **common: Any):
        super().__init__(**common)
        if layers is not None and not isinstance(layers, (numbers.Integral, list, tuple, range)):
            raise InputError(f"AttentionEntropyDetector: layers must be None, an int or a list of ints; got {layers!r}")
        self.layers = list(layers) if isinstance(layers, (list, tuple, range)) else layers
        self.head_reduce = _check_choice(head_reduce, "head_reduce", "AttentionEntropyDetector",
                                         ("attention", "entropy"))

    def _settings(self) -> dict[str, Any]:
        return {"layers": self.layers, "head_reduce": self.head_reduce}

    def image_entropies(self, model: Any, batch: Any) -> torch.Tensor:
        """``[B, L]`` entropy (nats) of each chosen layer's image attention."""
        rows = model.attention_rows(batch, layers=self.layers)
        values = rows.values.double()  # [B, L, H, K]
        out = []
        for i, groups in enumerate(batch.groups):
            img = groups.image.to(values.device)
            if img.numel() == 0:
                raise InputError(f"AttentionEntropyDetector: sample {i} has no image tokens")
            p = values[i][..., img]  # [L, H, n_img]
            if self.head_reduce == "attention":
                out.append(distribution_entropy(p.mean(1)))  # [L]
            else:
                out.append(distribution_entropy(p).mean(1))  # [L]
        return torch.stack(out)

    def _score_batch(self, model: Any, batch: Any) -> torch.Tensor:
        return -self.image_entropies(model, batch).mean(1)


class ScaleUpDetector(CalibratedDetector):
    """SCALE-UP (Guo et al. 2023): scaled prediction consistency on the greedy first answer token.

    Each image is amplified to ``clip(s x, 0, 255)`` for every ``s`` in ``scales`` (:func:`amplify`).
    Score (``[B]``, in ``[0, 1]``): the share of scales whose greedy first answer token equals the
    original input's. Triggered inputs keep answering with the target under amplification (high
    consistency, high score).

    The token score takes ``len(scales) + 1`` values, so a quantile threshold on clean scores is
    coarse (with threshold 1.0 nothing is flagged). ``score_mode="probability"`` scores instead the
    mean probability the amplified inputs give the original greedy token (continuous, same direction).

    Args:
        scales: amplification factors, each > 0 (the defaults follow the brief; BackdoorBox uses 3..11).
        score_mode: ``"tokens"`` (SCALE-UP's consistency) or ``"probability"``.
        **common: see :class:`CalibratedDetector`.
    """

    name = "scale_up"

    def __init__(self, scales: Sequence[float] = (2, 3, 4, 5), score_mode: str = "tokens", **common: Any):
        super().__init__(**common)
        if isinstance(scales, (str, bytes)) or not isinstance(scales, (list, tuple, range)) or len(scales) == 0:
            raise InputError(f"ScaleUpDetector: scales must be a non-empty list of numbers > 0, got {scales!r}")
        self.scales = [_check_number(s, "scale", "ScaleUpDetector", 0.0, float("inf"), lo_open=True, hi_open=True)
                       for s in scales]
        self.score_mode = _check_choice(score_mode, "score_mode", "ScaleUpDetector", ("tokens", "probability"))

    def _settings(self) -> dict[str, Any]:
        return {"scales": self.scales, "score_mode": self.score_mode}

    def scaled_logits(self, model: Any, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``([B, V], [B, S, V])``: first-token logits of the original and of each amplified input."""
        base = first_token_logits(model, batch)
        imgs = batch_images(model, batch)
        b, n = len(batch), len(self.scales)
        flat_rows = [i for i in range(b) for _ in range(n)]
        flat_imgs = [[amplify(im, s) for im in imgs[i]] for i in range(b) for s in self.scales]
        out = []
        for idx in _chunks(len(flat_rows), max(self.batch_size, n)):
            sub = rebuild(model, batch, [flat_imgs[j] for j in idx], [flat_rows[j] for j in idx])
            out.append(first_token_logits(model, sub))
        return base, torch.cat(out).view(b, n, -1)

    def _score_batch(self, model: Any, batch: Any) -> torch.Tensor:
        base, scaled = self.scaled_logits(model, batch)
        top = base.argmax(-1)  # [B]
        if self.score_mode == "tokens":
            return (scaled.argmax(-1) == top[:, None]).double().mean(1)
        probs = torch.softmax(scaled.double(), -1)  # [B, S, V]
        return probs.gather(-1, top[:, None, None].expand(-1, len(self.scales), 1))[..., 0].mean(1)


__all__ = ["AttentionEntropyDetector", "CalibratedDetector", "PURIFIER_KINDS", "Purifier", "ScaleUpDetector",
           "StripDetector", "THEN_ACTIONS", "amplify", "batch_images", "distribution_entropy", "entropy",
           "first_token_logits", "rebuild", "superimpose"]
