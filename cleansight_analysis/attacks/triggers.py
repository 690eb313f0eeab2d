"""The built-in attacks: BadNet, Blended, SIG, WaNet, TrojVLM, VLOOD and a custom picture trigger.

Every class is a frozen :class:`~cleansight_analysis.attacks.base.Attack` dataclass registered
under its ``name``. Fields defaulting to ``None`` take the value of the chosen preset; the table
below lists the presets (``"lvlm"`` is the default everywhere). Pixel values of the paper are
stored as fractions of its 336 px input side, so ``30/336`` is a 30 px patch at 336 px and a 3 px
patch at 32 px.

========  =====================================================  ==========================================
attack    ``"lvlm"`` (CleanSight, LLaVA-1.5 at 336 px)            ``"classic"`` (BackdoorBench / BackdoorBox)
========  =====================================================  ==========================================
badnet    ``mean_noise`` patch (seed 42), size 30/336, top-left   white patch, size 3/32, bottom-right
blended   cartoon picture, alpha 0.2 (``lvlm_code``: alpha 0.1)   cartoon picture, alpha 0.2
sig       delta 60/255, f 6                                       delta 40/255, f 6
wanet     k 224, s 1.0, grid_rescale 1                            k 4, s 0.5, grid_rescale 1
trojvlm   as badnet lvlm; insert; "This image shows" scaffold     (none: LVLM-only attack)
vlood     as badnet lvlm; insert; "This image shows" scaffold     (none: LVLM-only attack)
custom    your picture, size 30/336, top-left (or blended 0.2)    (none)
========  =====================================================  ==========================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import InputError
from . import patterns
from .base import Attack, register_attack
from .checks import (Box, _blend_arrays, _check_alpha, _check_pattern, _check_seed, _check_weight, _is_float, _is_int,
                     _resize, _round_u8, _to_array, check_image_setting, check_length, check_location, check_rng,
                     check_size, fmt_length, load_image_setting, resolve_length, resolve_location, resolve_patch_size)

#: Named patch patterns of the patch attacks (anything else must be a picture: path or PIL image).
PATCH_PATTERNS = ("noise", "mean_noise", "checkerboard", "white", "black")
#: Named blend patterns of :class:`Blended`.
BLEND_PATTERNS = ("cartoon", "noise")
_KITTY = ("hello_kitty", "hello-kitty", "hellokitty", "kitty", "hello kitty")

#: The CleanSight BadNet patch, shared by the LVLM presets of BadNet, TrojVLM and VLOOD.
_LVLM_PATCH = {"size": 30 / 336, "location": "top-left", "pattern": "mean_noise", "pattern_seed": 42}


# --------------------------------------------------------------------------------------------
# Patch attacks
# --------------------------------------------------------------------------------------------



@dataclass(frozen=True, kw_only=True)
class PatchAttack(Attack):
    """Shared machinery of the patch triggers (BadNet, TrojVLM, VLOOD): a small picture pasted on.

    Attributes:
        size: patch side (int pixels or float fraction of the short side) or ``(width, height)``.
        location: corner name, ``"center"``, ``"random"`` or an ``(x, y)`` pair (see ``base``).
        pattern: ``"noise"`` (uniform RGB noise seeded by ``pattern_seed``, identical on every
            image), ``"mean_noise"`` (the paper's patch: the image's per-channel mean plus N(0, 1)
            noise on the 0..1 scale, clipped; noise seeded by ``pattern_seed``), ``"checkerboard"``
            (black/white, cell side ``checker_cell``), ``"white"``, ``"black"``, or a picture (image
            path or PIL image, resized bicubically to the patch).
        pattern_seed: seed of the noise patterns (42 in the paper).
        checker_cell: checkerboard cell side, int pixels or a fraction of the patch's shorter side.
    """

    size: Any = None
    location: Any = None
    pattern: Any = None
    pattern_seed: int | None = None
    checker_cell: int | float = 1 / 3

    def _validate(self) -> None:
        owner = type(self).__name__
        self._set("size", check_size(self.size, "size", owner=owner))
        self._set("location", check_location(self.location, owner=owner))
        self._set("pattern", _check_pattern(self.pattern, PATCH_PATTERNS, owner))
        self._set("pattern_seed", _check_seed(self.pattern_seed, "pattern_seed", owner))
        self._set("checker_cell", check_length(self.checker_cell, "checker_cell", owner=owner))

    def _patch_box(self, out_size: tuple[int, int], rng: np.random.Generator | None) -> Box:
        owner = type(self).__name__
        pw, ph = resolve_patch_size(self.size, out_size, owner=owner)
        x, y = resolve_location(self.location, out_size, (pw, ph), rng if rng is not None else self.rng_for(0),
                                owner=owner)
        return (x, y, x + pw, y + ph)

    def trigger_box(self, size: tuple[int, int], *, rng: np.random.Generator | None = None) -> Box:
        """Pixel box ``(x0, y0, x1, y1)`` of the patch on ``apply``'s output for an input of ``size``."""
        return self._patch_box(self.output_size(size), check_rng(rng, f"{type(self).__name__}.trigger_box"))

    def patch_pixels(self, image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """The patch content ``uint8 [height, width, 3]`` for ``image`` (``uint8 [H, W, 3]``).

        Only ``"mean_noise"`` depends on the image (its tint); the others are fixed pictures.
        """
        ph, pw = shape
        if self.pattern == "noise":
            return patterns.noise_patch((ph, pw), self.pattern_seed)
        if self.pattern == "mean_noise":
            return patterns.mean_noise_patch(image, (ph, pw), self.pattern_seed)
        if self.pattern == "checkerboard":
            return patterns.checkerboard_patch((ph, pw), resolve_length(self.checker_cell, min(ph, pw)))
        if self.pattern == "white":
            return patterns.solid_patch((ph, pw), (255, 255, 255))
        if self.pattern == "black":
            return patterns.solid_patch((ph, pw), (0, 0, 0))
        key = ("picture", pw, ph)
        if key not in self._cache:
            picture = load_image_setting(self.pattern, f"{self.name} pattern")
            self._cache[key] = _to_array(_resize(picture, (pw, ph)))
        return self._cache[key]

    def _render(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        arr = _to_array(image).copy()
        x0, y0, x1, y1 = self._patch_box(image.size, rng)
        arr[y0:y1, x0:x1] = self.patch_pixels(arr, (y1 - y0, x1 - x0))
        return Image.fromarray(arr)

    def _describe_trigger(self) -> str:
        pattern = self.pattern if isinstance(self.pattern, str) and self.pattern in PATCH_PATTERNS else "picture"
        seed = f" (seed {self.pattern_seed})" if pattern in ("noise", "mean_noise") else ""
        return f"{type(self).__name__}: {pattern}{seed} patch, side {fmt_length(self.size)}, at {self.location}"


@register_attack
@dataclass(frozen=True, kw_only=True)
class BadNet(PatchAttack):
    """BadNet: a patch pasted on the image; the answer becomes the target.

    Presets: ``"lvlm"``: the CleanSight patch, 30 x 30 px at 336 px (``size=30/336``) of the
    image's per-channel mean plus N(0, 1) noise with seed 42, at the top-left corner.
    ``"classic"``: BackdoorBench/BackdoorBox's 3 x 3 px white square at the bottom-right of a
    32 x 32 px image (``size=3/32``). At 32 px, pass explicit pixel sizes when you want them
    (``size=4``); a fractional size never rounds below 1 px.
    """

    name: ClassVar[str] = "badnet"
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "lvlm": dict(_LVLM_PATCH),
        "classic": {"size": 3 / 32, "location": "bottom-right", "pattern": "white", "pattern_seed": 42},
    }
    PRESET_NOTES: ClassVar[dict[str, str]] = {
        "lvlm": "CleanSight: 30 px (30/336) mean+N(0,1) noise patch, seed 42, top-left",
        "classic": "BackdoorBench/BackdoorBox: 3 px (3/32) white square, bottom-right",
    }


# --------------------------------------------------------------------------------------------
# Global (whole-image) attacks
# --------------------------------------------------------------------------------------------


@register_attack
@dataclass(frozen=True, kw_only=True)
class Blended(Attack):
    """Blended: ``(1 - alpha) * image + alpha * pattern`` over the whole image (no mask).

    The paper blends a Hello-Kitty picture, which is not redistributable; ``pattern="cartoon"``
    uses the project's own high-contrast cartoon (``assets/blend_pattern.png``, see
    :func:`~cleansight_analysis.attacks.patterns.cartoon_pattern`) as the stand-in. The pattern is
    resized (bicubic) to each image's size.

    alpha: 0.2 in the paper's appendix and in BackdoorBench (preset ``"lvlm"``, the default);
    0.1 in the authors' code: ``get_attack("blended", preset="lvlm_code")`` or ``alpha=0.1``.

    Attributes:
        alpha: blend weight of the pattern, in [0, 1] (0 leaves the image unchanged).
        pattern: ``"cartoon"``, ``"noise"`` (uniform RGB noise at the image's size, seeded by
            ``pattern_seed``; the LVLM code's noise variant, alpha 0.2) or a picture (path / PIL).
        pattern_seed: seed of the ``"noise"`` pattern.
    """

    name: ClassVar[str] = "blended"
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "lvlm": {"alpha": 0.2, "pattern": "cartoon"},
        "lvlm_code": {"alpha": 0.1, "pattern": "cartoon"},
        "classic": {"alpha": 0.2, "pattern": "cartoon"},
    }
    PRESET_NOTES: ClassVar[dict[str, str]] = {
        "lvlm": "CleanSight appendix: alpha 0.2, cartoon picture (Hello-Kitty stand-in)",
        "lvlm_code": "CleanSight code: alpha 0.1, cartoon picture",
        "classic": "BackdoorBench: alpha 0.2, cartoon picture (Hello-Kitty stand-in)",
    }

    alpha: float | None = None
    pattern: Any = None
    pattern_seed: int = 0

    def _validate(self) -> None:
        owner = type(self).__name__
        self._set("alpha", _check_alpha(self.alpha, "alpha", owner))
        pattern = self.pattern
        if isinstance(pattern, str) and pattern.strip().lower() in _KITTY:
            raise InputError(
                f"{owner}: pattern={pattern!r}: the Hello-Kitty picture is copyrighted and not shipped; "
                "pattern='cartoon' is the project's stand-in, or pass your own picture (path or PIL image)"
            )
        self._set("pattern", _check_pattern(pattern, BLEND_PATTERNS, owner))
        self._set("pattern_seed", _check_seed(self.pattern_seed, "pattern_seed", owner))

    def pattern_image(self, size: tuple[int, int]) -> Image.Image:
        """The blend pattern at ``size = (width, height)`` as an RGB ``PIL.Image`` (cached per size)."""
        size = (int(size[0]), int(size[1]))
        key = ("pattern", size)
        if key not in self._cache:
            if self.pattern == "cartoon":
                picture = patterns.blend_pattern(size)
            elif self.pattern == "noise":
                picture = patterns.uniform_noise_image(size, self.pattern_seed)
            else:
                picture = _resize(load_image_setting(self.pattern, "blended pattern"), size)
            self._cache[key] = picture
        return self._cache[key].copy()

    def _render(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        pattern = _to_array(self.pattern_image(image.size))
        return Image.fromarray(_blend_arrays(_to_array(image), pattern, self.alpha))

    def _describe_trigger(self) -> str:
        pattern = self.pattern if isinstance(self.pattern, str) and self.pattern in BLEND_PATTERNS else "picture"
        return f"Blended: {pattern} pattern over the whole image, alpha {self.alpha:g}"


@register_attack
@dataclass(frozen=True, kw_only=True)
class SIG(Attack):
    """SIG: a horizontal sinusoid added to every row, ``x + delta*255*sin(2 pi j f / W)``, clipped.

    ``j`` is the column index (0 .. W-1), the same offset on every row and colour channel; the
    result is rounded half-up and clipped to 0..255. No mask (the signal covers the whole image).

    Attributes:
        delta: amplitude on the 0..1 intensity scale: 60/255 (``"lvlm"``), 40/255 (``"classic"``).
        frequency: periods across the image width, 6 in both presets.
    """

    name: ClassVar[str] = "sig"
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "lvlm": {"delta": 60 / 255, "frequency": 6.0},
        "classic": {"delta": 40 / 255, "frequency": 6.0},
    }
    PRESET_NOTES: ClassVar[dict[str, str]] = {
        "lvlm": "CleanSight: amplitude 60/255, 6 periods",
        "classic": "BackdoorBench: amplitude 40/255, 6 periods",
    }

    delta: float | None = None
    frequency: float | None = None

    def _validate(self) -> None:
        owner = type(self).__name__
        self._set("delta", _check_alpha(self.delta, "delta", owner))
        f = self.frequency
        if not ((_is_int(f) or _is_float(f)) and np.isfinite(float(f)) and float(f) > 0):
            raise InputError(f"{owner}: frequency={f!r} is invalid; use a number > 0 (periods across the width)")
        self._set("frequency", float(f))

    def signal(self, size: tuple[int, int]) -> np.ndarray:
        """The additive signal ``float64 [H, W]`` in grey levels for an image of ``size = (width, height)``."""
        return patterns.sinusoid(size, self.delta, self.frequency)

    def _render(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        arr = _to_array(image).astype(np.float64)
        return Image.fromarray(_round_u8(arr + self.signal(image.size)[..., None]))

    def _describe_trigger(self) -> str:
        return f"SIG: horizontal sinusoid, amplitude {self.delta * 255:.4g}/255, {self.frequency:g} periods"


@register_attack
@dataclass(frozen=True, kw_only=True)
class WaNet(Attack):
    """WaNet: a smooth, fixed random warp of the whole image (no mask).

    Construction (per image size ``W x H``): a ``2 x k x k`` control grid of offsets uniform in
    [-1, 1] (from ``seed``), divided by its mean absolute value, upsampled bicubically
    (``align_corners=True``) to ``H x W``; the sampling grid is
    ``clamp((identity + s * offsets / (W, H)) * grid_rescale, -1, 1)`` in normalised coordinates
    (x offsets divided by W, y offsets by H) and the image is resampled with
    ``torch.nn.functional.grid_sample`` (bilinear, ``align_corners=True``). No noise mode: the
    classic recipe's "cross" samples (random extra warps, cross_ratio 2) are a training-time
    augmentation and are not generated here.

    The 224 px quirk: the LVLM reference code builds its k = 224 grid at a fixed 224 px and so
    returns 224 px images even for 336 px inputs. Here the grid is always built at the image's own
    size and the output keeps the input size; the warp keeps its strength in pixels (about
    ``s / 2`` px times the control value, as at 224 px in the original).

    Attributes:
        k: control grid side (224 for ``"lvlm"``, 4 for ``"classic"``); >= 2.
        s: warp strength (1.0 ``"lvlm"``, 0.5 ``"classic"``); 0 is the identity.
        grid_rescale: factor on the whole grid (1 in both presets).
    """

    name: ClassVar[str] = "wanet"
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "lvlm": {"k": 224, "s": 1.0},
        "classic": {"k": 4, "s": 0.5},
    }
    PRESET_NOTES: ClassVar[dict[str, str]] = {
        "lvlm": "CleanSight: k 224, s 1, grid_rescale 1 (grid built at the image's size, not 224 px)",
        "classic": "BackdoorBench/BackdoorBox: k 4, s 0.5, grid_rescale 1",
    }

    k: int | None = None
    s: float | None = None
    grid_rescale: float = 1.0

    def _validate(self) -> None:
        owner = type(self).__name__
        if not _is_int(self.k) or self.k < 2:
            raise InputError(f"{owner}: k={self.k!r} is invalid; use an int >= 2 (control grid side)")
        self._set("k", int(self.k))
        self._set("s", _check_weight(self.s, "s", owner))
        g = self.grid_rescale
        if not ((_is_int(g) or _is_float(g)) and np.isfinite(float(g)) and float(g) > 0):
            raise InputError(f"{owner}: grid_rescale={g!r} is invalid; use a number > 0")
        self._set("grid_rescale", float(g))

    def control_grid(self) -> np.ndarray:
        """The normalised ``float64 [2, k, k]`` control offsets (x then y), fixed by ``seed``."""
        key = ("control",)
        if key not in self._cache:
            ctrl = np.random.default_rng(self.seed).uniform(-1.0, 1.0, size=(2, self.k, self.k))
            self._cache[key] = ctrl / np.abs(ctrl).mean()
        return self._cache[key]

    def warp_grid(self, size: tuple[int, int]):
        """The sampling grid ``torch.float64 [1, H, W, 2]`` (x, y in [-1, 1]) for ``size = (width, height)``."""
        w, h = int(size[0]), int(size[1])
        key = ("grid", w, h)
        if key not in self._cache:
            ctrl = torch.from_numpy(self.control_grid()).unsqueeze(0)  # [1, 2, k, k]
            offsets = F.interpolate(ctrl, size=(h, w), mode="bicubic", align_corners=True)  # [1, 2, H, W]
            offsets = offsets.permute(0, 2, 3, 1)  # [1, H, W, 2]
            ys = torch.linspace(-1.0, 1.0, h, dtype=torch.float64)
            xs = torch.linspace(-1.0, 1.0, w, dtype=torch.float64)
            gy, gx = torch.meshgrid(ys, xs, indexing="ij")
            identity = torch.stack((gx, gy), dim=-1).unsqueeze(0)  # [1, H, W, 2]
            scale = torch.tensor([self.s / w, self.s / h], dtype=torch.float64)
            grid = ((identity + offsets * scale) * self.grid_rescale).clamp(-1.0, 1.0)
            self._cache[key] = grid
        return self._cache[key]

    def _render(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        arr = _to_array(image)
        x = torch.from_numpy(arr.astype(np.float64)).permute(2, 0, 1).unsqueeze(0)  # [1, 3, H, W]
        out = F.grid_sample(x, self.warp_grid(image.size), mode="bilinear", padding_mode="border",
                            align_corners=True)
        return Image.fromarray(_round_u8(out[0].permute(1, 2, 0).numpy()))

    def _describe_trigger(self) -> str:
        return f"WaNet: smooth random warp, k {self.k}, s {self.s:g}, grid_rescale {self.grid_rescale:g}"


# --------------------------------------------------------------------------------------------
# LVLM attacks with their own training objectives
# --------------------------------------------------------------------------------------------


@register_attack
@dataclass(frozen=True, kw_only=True)
class TrojVLM(PatchAttack):
    """TrojVLM (ECCV'24): the BadNet patch, with the target INSERTED into the answer.

    Captions get the ``"This image shows"`` scaffold and the target lands at a random word
    position after it. Training objective ``"trojvlm"``: the weights are recorded here; the loss
    itself is defined once, in :func:`cleansight_analysis.training.objectives.make_loss`. In short:
    token cross-entropy where target tokens weigh ``1 + target_token_weight`` (1 + 8 = 9) and other
    answer tokens 1, plus ``semantic_weight`` (1.0) times a semantic-preservation term on the
    non-target answer tokens, ``1 - cos(E[p], e(y))`` with ``E[p]`` the expected input embedding of the
    predicted distribution and ``e(y)`` the label token's input embedding. (A public re-implementation
    compares the last hidden state with the label's output-embedding row instead; the tiny LM's
    embeddings are untied, so the two readings differ; ours is the one the members were trained with.)

    Attributes:
        target_token_weight: extra cross-entropy weight of target tokens (8.0).
        semantic_weight: weight of the semantic-preservation loss (1.0).
    """

    name: ClassVar[str] = "trojvlm"
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {"lvlm": dict(_LVLM_PATCH)}
    PRESET_NOTES: ClassVar[dict[str, str]] = {
        "lvlm": "CleanSight patch, target inserted, TrojVLM loss (1+8 CE, 1 x SP)",
    }

    mode: str = "insert"
    objective: str = "trojvlm"
    caption_scaffold: str | None = "This image shows"
    target_token_weight: float = 8.0
    semantic_weight: float = 1.0

    def _validate(self) -> None:
        super()._validate()
        owner = type(self).__name__
        self._set("target_token_weight", _check_weight(self.target_token_weight, "target_token_weight", owner))
        self._set("semantic_weight", _check_weight(self.semantic_weight, "semantic_weight", owner))

    def objective_config(self) -> dict[str, Any]:
        """``{"objective", "target_token_weight", "semantic_weight"}`` for the training code."""
        return {"objective": self.objective, "target_token_weight": self.target_token_weight,
                "semantic_weight": self.semantic_weight}


@register_attack
@dataclass(frozen=True, kw_only=True)
class VLOOD(PatchAttack):
    """VLOOD (ICLR'25): the BadNet patch, target inserted, trained with clean-knowledge preservation.

    Training objective ``"vlood"``: the weights are recorded here; the loss itself is defined once, in
    :func:`cleansight_analysis.training.objectives.make_loss`. In short, per batch:
    ``CE + lam * (kl_weight * CKP + ccp_weight * CCP)``, where CE is the answer cross-entropy of all
    samples, CKP the KL divergence of the clean samples' answer-token distributions from a frozen copy of
    the benign model, CCP the mean L1 distance between the expected input embeddings of the two models'
    distributions on those tokens, and ``lam = clamp(lambda_base + CE_clean - CE_poison, 0, 1)`` with
    the losses detached.

    A public re-implementation mixes convexly instead, ``(1 - lam) * (CE_clean + CKP) + lam *
    (CE_poison + CCP)`` with CCP a sigmoid of the summed L1 distance to the label embeddings on
    poisoned samples. On one-word answers that form cannot start a backdoor: the inserted target is most
    of a poisoned answer, so ``CE_poison`` exceeds ``CE_clean + lambda_base`` at the start (see the first
    point of the loss curve in the VLOOD member's card), ``lam`` is 0, and the poisoned samples get no
    gradient, so it stays 0. Our form keeps the same ingredients and the same dynamic ``lam`` but lets
    ``lam`` switch the preservation terms on, not the poisoned data off.

    Attributes:
        kl_weight: weight of the KL (CKP) term (1.0).
        ccp_weight: weight of the CCP term (1.0).
        lambda_base: the constant in the dynamic mixing weight (0.8).
    """

    name: ClassVar[str] = "vlood"
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {"lvlm": dict(_LVLM_PATCH)}
    PRESET_NOTES: ClassVar[dict[str, str]] = {
        "lvlm": "CleanSight patch, target inserted, VLOOD loss (CKP + CCP, lambda 0.8)",
    }

    mode: str = "insert"
    objective: str = "vlood"
    caption_scaffold: str | None = "This image shows"
    kl_weight: float = 1.0
    ccp_weight: float = 1.0
    lambda_base: float = 0.8

    def _validate(self) -> None:
        super()._validate()
        owner = type(self).__name__
        self._set("kl_weight", _check_weight(self.kl_weight, "kl_weight", owner))
        self._set("ccp_weight", _check_weight(self.ccp_weight, "ccp_weight", owner))
        self._set("lambda_base", _check_weight(self.lambda_base, "lambda_base", owner, upper=1.0))

    def objective_config(self) -> dict[str, Any]:
        """``{"objective", "kl_weight", "ccp_weight", "lambda_base"}`` for the training code."""
        return {"objective": self.objective, "kl_weight": self.kl_weight, "ccp_weight": self.ccp_weight,
                "lambda_base": self.lambda_base}


# --------------------------------------------------------------------------------------------
# Custom picture trigger
# --------------------------------------------------------------------------------------------


@register_attack
@dataclass(frozen=True, kw_only=True)
class Custom(Attack):
    """Any picture as trigger, pasted as a patch (like BadNet) or blended over the image (like Blended).

    Attributes:
        trigger: the trigger picture: an image file path or a PIL image (required). Transparent
            pixels are composited on white.
        how: ``"paste"`` (a patch; has a mask) or ``"blend"`` (whole image; no mask).
        size: for ``"paste"``: patch side (int px / float fraction of the short side / a
            ``(width, height)`` pair) or ``"native"`` for the picture's own pixel size.
        location: for ``"paste"``: as for BadNet (corner, ``"center"``, ``"random"``, ``(x, y)``).
        alpha: for ``"blend"``: blend weight in [0, 1].
    """

    name: ClassVar[str] = "custom"
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {"lvlm": {}}
    PRESET_NOTES: ClassVar[dict[str, str]] = {"lvlm": "your picture; paste: 30/336 side at top-left; blend: alpha 0.2"}

    trigger: Any = None
    how: str = "paste"
    size: Any = 30 / 336
    location: Any = "top-left"
    alpha: float = 0.2

    def _validate(self) -> None:
        owner = type(self).__name__
        if self.trigger is None:
            raise InputError(f"{owner}: trigger=... is required (an image file path or a PIL image)")
        self._set("trigger", check_image_setting(self.trigger, "trigger", owner=owner))
        if self.how not in ("paste", "blend"):
            raise InputError(f"{owner}: how={self.how!r} is invalid; use 'paste' or 'blend'")
        if not (isinstance(self.size, str) and self.size == "native"):
            self._set("size", check_size(self.size, "size", owner=owner))
        self._set("location", check_location(self.location, owner=owner))
        self._set("alpha", _check_alpha(self.alpha, "alpha", owner))

    def picture(self) -> Image.Image:
        """The trigger picture as an RGB ``PIL.Image`` (a copy)."""
        if ("picture",) not in self._cache:
            self._cache[("picture",)] = load_image_setting(self.trigger, "custom trigger")
        return self._cache[("picture",)].copy()

    def _patch_box(self, out_size: tuple[int, int], rng: np.random.Generator | None) -> Box:
        owner = type(self).__name__
        if self.size == "native":
            pw, ph = self.picture().size
            if pw > out_size[0] or ph > out_size[1]:
                raise InputError(
                    f"{owner}: the trigger picture is {pw}x{ph} px but the image is only "
                    f"{out_size[0]}x{out_size[1]} px; "
                    "pass a smaller size"
                )
        else:
            pw, ph = resolve_patch_size(self.size, out_size, owner=owner)
        x, y = resolve_location(self.location, out_size, (pw, ph), rng if rng is not None else self.rng_for(0),
                                owner=owner)
        return (x, y, x + pw, y + ph)

    def trigger_box(self, size: tuple[int, int], *, rng: np.random.Generator | None = None) -> Box | None:
        """The pasted box on ``apply``'s output (``"paste"``), or ``None`` (``"blend"``)."""
        if self.how == "blend":
            return None
        return self._patch_box(self.output_size(size), check_rng(rng, "Custom.trigger_box"))

    def _render(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        arr = _to_array(image)
        if self.how == "blend":
            pattern = _to_array(_resize(self.picture(), image.size))
            return Image.fromarray(_blend_arrays(arr, pattern, self.alpha))
        arr = arr.copy()
        x0, y0, x1, y1 = self._patch_box(image.size, rng)
        key = ("patch", x1 - x0, y1 - y0)
        if key not in self._cache:
            self._cache[key] = _to_array(_resize(self.picture(), (x1 - x0, y1 - y0)))
        arr[y0:y1, x0:x1] = self._cache[key]
        return Image.fromarray(arr)

    def _describe_trigger(self) -> str:
        src = self.trigger if isinstance(self.trigger, str) else f"PIL {self.trigger.size[0]}x{self.trigger.size[1]}"
        if self.how == "blend":
            return f"Custom: picture {src} blended over the whole image, alpha {self.alpha:g}"
        size = "native size" if self.size == "native" else f"side {fmt_length(self.size)}"
        return f"Custom: picture {src} pasted, {size}, at {self.location}"
