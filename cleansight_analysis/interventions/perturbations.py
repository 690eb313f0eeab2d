"""Perturbations of the image or of the attention, behind one interface and one intensity scale.

Every perturbation is an :class:`~cleansight_analysis.interventions.base.Intervention` whose strength is
one number, ``intensity`` in ``[0, 1]`` (0 = no change), so that sweeps such as the paper's Fig. 1
(ASR against perturbation intensity, pixel versus attention perturbations) need nothing kind-specific::

    from cleansight_analysis.interventions.perturbations import get_perturbation

    st = get_perturbation("st", 0.7, seed=1)              # the paper's ST baseline at t = 0.7
    img2 = st.apply_image(img)                            # same size, RGB, deterministic
    flat = get_perturbation("attn_uniform", 1.0)          # image attention of text queries made uniform
    answers = generate_answers(model, samples, intervention=flat)

Kinds (:data:`PERTURBATION_KINDS`):

========== ========= ====================================================================================
kind       domain    what intensity ``t`` does
========== ========= ====================================================================================
st         pixel     the paper's ST: mirror, shrink by ``1 - U(0, 0.8 t)`` with grey (127) padding, rotate
                     by ``U(-180 t, 180 t)`` degrees with grey fill
shrinkpad  pixel     shrink by ``1 - 0.8 t`` (no randomness) and pad with grey
blur       pixel     the paper's Blur baseline: ``(1 - t) x + t blur(x)``, Gaussian radius ``0.06 t min(H, W)``
jpeg       pixel     JPEG re-encoding, quality falling linearly from 95 to 5 as ``t`` goes from 0+ to 1
noise      pixel     additive Gaussian pixel noise, std ``0.25 t`` of the 0..255 range
attn_uniform attention for text queries, each image's attention is pulled toward its mean:
                     ``p' = (1 - t) p + t mean(p)`` over that image's keys (in every chosen LM layer)
========== ========= ====================================================================================

Choices the paper leaves open are settings (dataclass fields) with the defaults above; see each class.
At intensity 0 every kind is the identity (pixel kinds return an unchanged RGB copy; ``st`` applies its
mirror only for ``t > 0``, so that ``t = 0`` is the unperturbed baseline).
"""

from __future__ import annotations

import io
import math
import numbers
import zlib
from dataclasses import dataclass, fields
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

from ..errors import InputError, LayerIndexError
from ..inputs.images import to_rgb_image
from ..models.hooknames import HookSpec, hook_pattern
from ..models.intervention import Intervention
from ..registry import Registry

#: Pixel perturbation kinds (act on the image before the processor).
PIXEL_KINDS: tuple[str, ...] = ("st", "shrinkpad", "blur", "jpeg", "noise")
#: Attention perturbation kinds (act on ``hook_pattern`` of the LM layers).
ATTENTION_KINDS: tuple[str, ...] = ("attn_uniform",)
#: Every kind :func:`get_perturbation` knows.
PERTURBATION_KINDS: tuple[str, ...] = PIXEL_KINDS + ATTENTION_KINDS
#: kind -> perturbation class (a :class:`~cleansight_analysis.registry.Registry`; each class registers
#: itself with ``@PERTURBATIONS.register`` under its ``kind``).
PERTURBATIONS: Registry[type["Perturbation"]] = Registry("perturbation kind", plural="kinds", name_attr="kind")
#: Grey used for padding and rotation fill (the paper's 127).
GREY = 127


# ---------------------------------------------------------------------------------------------- checks
def _check_unit(value: Any, what: str, owner: str) -> float:
    """``value`` as a float in ``[0, 1]`` or :class:`InputError` naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(f"{owner}: {what} must be a number in [0, 1], got {value!r} ({type(value).__name__})")
    value = float(value)
    if not (0.0 <= value <= 1.0):  # also rejects NaN
        raise InputError(f"{owner}: {what} must lie in [0, 1] (0 = no perturbation, 1 = strongest), got {value!r}")
    return value


def _check_real(value: Any, what: str, owner: str, lo: float, hi: float, *, hi_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(float(value)):
        raise InputError(f"{owner}: {what} must be a number, got {value!r}")
    value = float(value)
    if value < lo or value > hi or (hi_open and value == hi):
        bracket = ")" if hi_open else "]"
        raise InputError(f"{owner}: {what} must lie in [{lo:g}, {hi:g}{bracket}, got {value!r}")
    return value


def _check_int(value: Any, what: str, owner: str, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputError(f"{owner}: {what} must be an integer, got {value!r} ({type(value).__name__})")
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise InputError(f"{owner}: {what} must lie in [{lo}, {hi}], got {value}")
    return value


def _check_bool(value: Any, what: str, owner: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise InputError(f"{owner}: {what} must be True or False, got {value!r}")
    return bool(value)


# ---------------------------------------------------------------------------------------------- base
class Perturbation(Intervention):
    """An intervention whose strength is one number, ``intensity`` in ``[0, 1]``.

    Concrete perturbations are dataclasses; their fields other than the intensity are the *settings*
    accepted by :func:`get_perturbation`. ``name`` is ``"{kind}@{intensity}"``.
    """

    kind: ClassVar[str] = "perturbation"
    domain: ClassVar[str] = "none"  # type: ignore[misc]
    #: dataclass field holding the intensity (``"intensity"``, or ``"eta"`` for attention kinds).
    intensity_field: ClassVar[str] = "intensity"

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"{self.kind}@{self.intensity:g}"

    @property
    def intensity(self) -> float:
        return float(getattr(self, self.intensity_field))

    @classmethod
    def setting_names(cls) -> tuple[str, ...]:
        """Names of the settings (dataclass fields other than the intensity)."""
        return tuple(f.name for f in fields(cls) if f.init and f.name != cls.intensity_field)  # type: ignore[arg-type]

    def settings(self) -> dict[str, Any]:
        """Current settings as plain Python values."""
        out = {}
        for key in self.setting_names():
            value = getattr(self, key)
            if isinstance(value, tuple):
                value = [list(v) if isinstance(v, tuple) else v for v in value]
            out[key] = value
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "domain": self.domain, "kind": self.kind, "intensity": self.intensity,
                **self.settings()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.settings().items())
        return f"{type(self).__name__}({self.intensity_field}={self.intensity!r}{', ' if args else ''}{args})"


# ---------------------------------------------------------------------------------------------- pixel kinds
@dataclass(repr=False)
class PixelPerturbation(Perturbation):
    """Base of the pixel kinds: take any image, return an RGB ``PIL.Image`` of the same size.

    Attributes:
        intensity: strength in ``[0, 1]``; 0 returns an unchanged RGB copy.
        seed: seed of the random draws (kinds without randomness ignore it).
        per_image: draw fresh randomness for each image (the generator is seeded with ``seed`` and a
            checksum of the image's pixels, so the same image always gets the same result); ``False``
            uses the same draws for every image.
    """

    intensity: float = 0.0
    seed: int = 0
    per_image: bool = True

    domain: ClassVar[str] = "pixel"  # type: ignore[misc]

    def __post_init__(self) -> None:
        owner = type(self).__name__
        self.intensity = _check_unit(self.intensity, "intensity", owner)
        self.seed = _check_int(self.seed, "seed", owner, 0)
        self.per_image = _check_bool(self.per_image, "per_image", owner)
        self._check_settings(owner)

    def _check_settings(self, owner: str) -> None:
        """Validate kind-specific settings (override)."""

    def rng_for(self, image: Image.Image) -> np.random.Generator:
        """The generator for ``image`` (see ``per_image``)."""
        if not self.per_image:
            return np.random.default_rng(self.seed)
        digest = zlib.crc32(image.tobytes())
        return np.random.default_rng([self.seed, digest, image.size[0], image.size[1]])

    def apply_image(self, image: Any) -> Image.Image:
        """The perturbed image: RGB ``PIL.Image`` with the size of ``image``.

        Args:
            image: a ``PIL.Image`` of any mode, a path, an array ``[H, W(, C)]`` or a tensor ``[C, H, W]``.
        """
        img = to_rgb_image(image, where=f"{self.kind} perturbation input")
        if self.intensity == 0.0:
            return img.copy()
        out = self._perturb(img, self.rng_for(img))
        if out.mode != "RGB":
            out = out.convert("RGB")
        assert out.size == img.size, (out.size, img.size)
        return out

    def _perturb(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        raise NotImplementedError


def shrink_and_pad(img: Image.Image, scale: float, *, fill: int = GREY, offset: tuple[float, float] = (0.5, 0.5)
                   ) -> Image.Image:
    """Shrink ``img`` by ``scale`` (antialiased) and paste it on a grey canvas of the original size.

    Args:
        img: RGB image of size ``(W, H)``.
        scale: side factor in ``(0, 1]``.
        fill: grey level of the canvas.
        offset: where the shrunk image sits, as fractions of the free space ``(x, y)`` (0.5 = centred).
    """
    w, h = img.size
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    if (nw, nh) == (w, h):
        return img.copy()
    small = img.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=None)
    canvas = Image.new("RGB", (w, h), (fill, fill, fill))
    canvas.paste(small, (int(round((w - nw) * offset[0])), int(round((h - nh) * offset[1]))))
    return canvas


@PERTURBATIONS.register
@dataclass(repr=False)
class ST(PixelPerturbation):
    """The paper's ST transform (Fig. 1 and the ST baseline of Tables 1/2), strength ``rho = intensity``.

    Mirror (left-right), then shrink by the factor ``1 - U(0, max_shrink * rho)`` and pad to the original
    size with grey ``fill`` (centred), then rotate by ``U(-max_angle * rho, max_angle * rho)`` degrees
    about the centre with grey fill (bilinear). The two uniforms are drawn as ``u * bound`` from one
    generator, so for a fixed seed and image the shrink and angle grow linearly with ``rho``.

    Attributes:
        max_shrink: 0.8 in the paper; in ``[0, 1)``.
        max_angle: 180 degrees in the paper.
        mirror: apply the mirror (for ``rho > 0``; ``rho = 0`` stays the identity baseline).
        fill: grey level of padding and rotation corners (127 in the paper).
    """

    max_shrink: float = 0.8
    max_angle: float = 180.0
    mirror: bool = True
    fill: int = GREY

    kind: ClassVar[str] = "st"

    def _check_settings(self, owner: str) -> None:
        self.max_shrink = _check_real(self.max_shrink, "max_shrink", owner, 0.0, 1.0, hi_open=True)
        self.max_angle = _check_real(self.max_angle, "max_angle", owner, 0.0, 180.0)
        self.mirror = _check_bool(self.mirror, "mirror", owner)
        self.fill = _check_int(self.fill, "fill", owner, 0, 255)

    def draw(self, rng: np.random.Generator) -> tuple[float, float]:
        """``(scale, angle_degrees)`` for one image from ``rng``."""
        u_shrink, u_angle = rng.random(2)
        scale = 1.0 - self.max_shrink * self.intensity * float(u_shrink)
        angle = self.max_angle * self.intensity * (2.0 * float(u_angle) - 1.0)
        return scale, angle

    def _perturb(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        scale, angle = self.draw(rng)
        if self.mirror:
            img = ImageOps.mirror(img)
        img = shrink_and_pad(img, scale, fill=self.fill)
        if angle != 0.0:
            img = img.rotate(angle, resample=Image.Resampling.BILINEAR, expand=False,
                             fillcolor=(self.fill, self.fill, self.fill))
        return img


@PERTURBATIONS.register
@dataclass(repr=False)
class ShrinkPad(PixelPerturbation):
    """Shrink by ``1 - max_shrink * intensity`` and pad with grey (no mirror, no rotation).

    Attributes:
        max_shrink: shrink at intensity 1, in ``[0, 1)``.
        fill: grey level of the padding.
        position: ``"center"`` (deterministic) or ``"random"`` (a seeded place inside the canvas).
    """

    max_shrink: float = 0.8
    fill: int = GREY
    position: str = "center"

    kind: ClassVar[str] = "shrinkpad"

    def _check_settings(self, owner: str) -> None:
        self.max_shrink = _check_real(self.max_shrink, "max_shrink", owner, 0.0, 1.0, hi_open=True)
        self.fill = _check_int(self.fill, "fill", owner, 0, 255)
        if self.position not in ("center", "random"):
            raise InputError(f"{owner}: position must be 'center' or 'random', got {self.position!r}")

    def _perturb(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        offset = (0.5, 0.5) if self.position == "center" else tuple(float(u) for u in rng.random(2))
        return shrink_and_pad(img, 1.0 - self.max_shrink * self.intensity, fill=self.fill, offset=offset)


@PERTURBATIONS.register
@dataclass(repr=False)
class Blur(PixelPerturbation):
    """The paper's Blur baseline: ``x' = (1 - t) x + t G_r(x)`` with ``r = radius_scale * t * min(H, W)``.

    ``G_r`` is PIL's Gaussian blur with radius (standard deviation) ``r`` pixels; the paper uses
    ``t = 0.7`` and ``radius_scale = 0.06``.

    Attributes:
        radius_scale: blur radius at ``t = 1`` as a fraction of the short side.
        blend: blend the blurred image with the original (the paper's form); ``False``: blur only.
    """

    radius_scale: float = 0.06
    blend: bool = True

    kind: ClassVar[str] = "blur"

    def _check_settings(self, owner: str) -> None:
        self.radius_scale = _check_real(self.radius_scale, "radius_scale", owner, 0.0, 1.0)
        self.blend = _check_bool(self.blend, "blend", owner)

    def radius(self, size: tuple[int, int]) -> float:
        """Blur radius in pixels for an image of ``size = (W, H)``."""
        return self.radius_scale * self.intensity * min(size)

    def _perturb(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        blurred = img.filter(ImageFilter.GaussianBlur(self.radius(img.size)))
        if not self.blend:
            return blurred
        return Image.blend(img, blurred, self.intensity)  # (1 - t) img + t blurred


@PERTURBATIONS.register
@dataclass(repr=False)
class Jpeg(PixelPerturbation):
    """JPEG re-encoding; quality ``round(max_quality - t (max_quality - min_quality))`` for ``t > 0``.

    Attributes:
        min_quality: quality at intensity 1 (1..95).
        max_quality: quality as the intensity approaches 0 (``min_quality``..100).
    """

    min_quality: int = 5
    max_quality: int = 95

    kind: ClassVar[str] = "jpeg"

    def _check_settings(self, owner: str) -> None:
        self.min_quality = _check_int(self.min_quality, "min_quality", owner, 1, 95)
        self.max_quality = _check_int(self.max_quality, "max_quality", owner, self.min_quality, 100)

    @property
    def quality(self) -> int:
        """JPEG quality used at this intensity."""
        return int(round(self.max_quality - self.intensity * (self.max_quality - self.min_quality)))

    def _perturb(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=self.quality)
        buf.seek(0)
        with Image.open(buf) as decoded:
            return decoded.convert("RGB")


@PERTURBATIONS.register
@dataclass(repr=False)
class Noise(PixelPerturbation):
    """Additive Gaussian pixel noise with std ``max_std * t * 255`` (clipped to 0..255, rounded).

    For a fixed seed and image the noise field is the same at every intensity and only scaled.

    Attributes:
        max_std: noise std at intensity 1 as a fraction of the 0..255 range.
    """

    max_std: float = 0.25

    kind: ClassVar[str] = "noise"

    def _check_settings(self, owner: str) -> None:
        self.max_std = _check_real(self.max_std, "max_std", owner, 0.0, 10.0)

    def _perturb(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        arr = np.asarray(img, dtype=np.float32)  # [H, W, 3]
        noise = rng.standard_normal(arr.shape, dtype=np.float32) * (self.max_std * self.intensity * 255.0)
        return Image.fromarray(np.clip(np.rint(arr + noise), 0, 255).astype(np.uint8), "RGB")


# ---------------------------------------------------------------------------------------------- attention kind
def _as_bool(t: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise InputError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    return t if t.dtype == torch.bool else t.bool()


def interpolate_image_attention(
    pattern: torch.Tensor,
    image_key_mask: torch.Tensor,
    query_is_text: torch.Tensor,
    eta: float,
    head_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pull the image part of text-query attention rows toward its per-image mean.

    For every edited row ``(b, h, q)`` and every image span ``s`` of sample ``b`` (keys ``I_s``):
    ``p'[k] = (1 - eta) p[k] + eta * mean_{j in I_s} p[j]`` for ``k in I_s``; other keys are unchanged.
    Each span's total mass, hence the row sum, is preserved; ``eta = 1`` makes the row constant over
    each span, ``eta = 0`` returns the input values exactly.

    Args:
        pattern: post-softmax attention ``[B, H, Q, K]`` (queries are any ``Q`` positions; the masks
            say which are text).
        image_key_mask: ``[B, K]`` (one image span per sample) or ``[B, S, K]`` bool, one row per image
            span (spans must be disjoint; an all-False row is an absent span).
        query_is_text: ``[B, Q]`` bool, True for the query rows to edit (text queries; False for image
            and padding queries).
        eta: interpolation weight in ``[0, 1]``.
        head_mask: optional ``[H]`` or ``[B, H]`` bool restricting the edit to those heads.

    Returns:
        A new tensor ``[B, H, Q, K]`` with the dtype and device of ``pattern``. Span means are
        accumulated in float32.
    """
    eta = _check_unit(eta, "eta", "interpolate_image_attention")
    if not isinstance(pattern, torch.Tensor) or pattern.dim() != 4:
        raise InputError(f"interpolate_image_attention: pattern must be a [B, H, Q, K] tensor, got "
                         f"{tuple(pattern.shape) if isinstance(pattern, torch.Tensor) else type(pattern).__name__}")
    b, h, q, k = pattern.shape
    spans = _as_bool(image_key_mask, "image_key_mask")
    if spans.dim() == 2:
        spans = spans[:, None]
    if spans.dim() != 3 or spans.shape[0] != b or spans.shape[2] != k:
        raise InputError(f"interpolate_image_attention: image_key_mask of shape {tuple(image_key_mask.shape)} "
                         f"does not fit a pattern [B={b}, H={h}, Q={q}, K={k}]; expected [B, K] or [B, S, K]")
    text = _as_bool(query_is_text, "query_is_text")
    if tuple(text.shape) != (b, q):
        raise InputError(f"interpolate_image_attention: query_is_text of shape {tuple(text.shape)} does not "
                         f"fit a pattern [B={b}, H={h}, Q={q}, K={k}]; expected [B, Q] = [{b}, {q}]")
    spans, text = spans.to(pattern.device), text.to(pattern.device)
    if (spans.sum(1) > 1).any():
        raise InputError("interpolate_image_attention: image spans overlap; each key may belong to one image")
    rows = text[:, None, :, None]  # [B, 1, Q, 1]
    if head_mask is not None:
        hm = _as_bool(head_mask, "head_mask").to(pattern.device)
        if hm.dim() == 1:
            hm = hm[None]
        if hm.dim() != 2 or hm.shape[-1] != h or hm.shape[0] not in (1, b):
            raise InputError(f"interpolate_image_attention: head_mask of shape {tuple(head_mask.shape)} does not "
                             f"fit {h} heads; expected [H] or [B, H]")
        rows = rows & hm[:, :, None, None]  # [B, H, Q, 1]
    on_image = spans.any(1)[:, None, None, :]  # [B, 1, 1, K]
    span_f = spans.to(torch.float32)  # [B, S, K]
    counts = span_f.sum(-1).clamp_min(1.0)  # [B, S]
    mass = torch.einsum("bhqk,bsk->bhqs", pattern.to(torch.float32), span_f)  # [B, H, Q, S]
    mean_k = torch.einsum("bhqs,bsk->bhqk", mass / counts[:, None, None, :], span_f).to(pattern.dtype)  # [B, H, Q, K]
    blended = (1.0 - eta) * pattern + eta * mean_k
    return torch.where(rows & on_image, blended, pattern)


def image_span_masks(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Key and query masks of a prepared batch for :func:`interpolate_image_attention`.

    Args:
        batch: a :class:`~cleansight_analysis.inputs.batch.Batch` (``input_ids`` ``[B, T]``, ``groups``).

    Returns:
        ``(image_key_mask, position_is_text)``: ``[B, S, T]`` bool with one row per image span
        (``S`` = most images in a sample; missing spans all False) and ``[B, T]`` bool, True at real
        (non-padding) positions that are not image tokens.
    """
    groups = getattr(batch, "groups", None)
    if groups is None or not hasattr(batch, "attention_mask"):
        raise InputError(f"expected a Batch from HookedLVLM.prepare(), got {type(batch).__name__}")
    b, t = batch.attention_mask.shape
    n_spans = max(len(g.images) for g in groups)
    spans = torch.zeros(b, n_spans, t, dtype=torch.bool)
    for i, g in enumerate(groups):
        for s, im in enumerate(g.images):
            spans[i, s, im.positions] = True
    text = batch.attention_mask.bool().cpu() & ~spans.any(1)
    return spans, text


def _interpolate_visible(pattern: torch.Tensor, spans: torch.Tensor, queries: torch.Tensor, eta: float,
                         head_mask: torch.Tensor | None) -> torch.Tensor:
    """Like :func:`interpolate_image_attention`, but each query row is flattened over the image keys it
    can see (causal: keys at or before the query), so image-token queries never get mass on later keys.

    Args:
        pattern: ``[B, H, Q, K]``, queries being the last ``Q`` of the ``K`` positions.
        spans: ``[B, S, K]`` image-key masks, one per image. queries: ``[B, Q]`` rows to edit.
        head_mask: ``[H]`` or None (every head).
    """
    b, h, q, k = pattern.shape
    qpos = torch.arange(k - q, k, device=pattern.device)
    causal = torch.arange(k, device=pattern.device)[None, :] <= qpos[:, None]  # [Q, K]
    out = pattern.float()
    edit_rows = queries[:, None, :, None]  # [B, 1, Q, 1]
    if head_mask is not None:
        edit_rows = edit_rows & head_mask.to(pattern.device).view(1, h, 1, 1)
    for s_idx in range(spans.shape[1]):
        vis = (spans[:, s_idx, None, :] & causal[None]).unsqueeze(1)  # [B, 1, Q, K]
        count = vis.sum(-1, keepdim=True).clamp(min=1)
        mean = (out * vis).sum(-1, keepdim=True) / count
        flat = (1 - eta) * out + eta * mean
        out = torch.where(vis & edit_rows, flat, out)
    return out.to(pattern.dtype)


#: Which query rows ``attn_uniform`` edits.
QUERY_SCOPES: tuple[str, ...] = ("text", "all")


@PERTURBATIONS.register
@dataclass(repr=False)
class AttentionUniform(Perturbation):
    """Attention perturbation of Fig. 1: flatten the image attention of text queries, keeping its mass.

    At post-softmax ``blocks.{l}.attn.hook_pattern`` (``[B, H, Q, K]``; ``Q = T`` at prefill, ``Q = 1``
    at each decode step, the queries being the last ``Q`` of the ``K`` positions) every query that is a
    text position (system, prompt, template or generated token; not an image token, not padding) has the
    image part of its row interpolated toward its mean, separately for each image span:
    ``p'_j = (1 - eta) p_j + eta * mean_{k in I_vis} p_k`` for ``j in I_vis``. Text keys are unchanged,
    image mass and row sums are preserved. Image tokens' own rows are untouched.

    Attributes:
        eta: interpolation weight (the intensity) in ``[0, 1]``.
        layers: LM layers to edit (``None``: all, as in the paper). Negative indices count from the end.
        heads: optional ``(layer, head)`` pairs; only these heads are edited. With ``layers=None`` the
            edited layers are the layers named here; with explicit ``layers`` each pair's layer must be
            among them.
        queries: ``"text"`` (default, the paper: text queries only) or ``"all"`` (image-token queries
            too, which also cuts the image-to-image route by which a trigger token can spread into the
            other image tokens before any text query reads them).
    """

    eta: float
    layers: Sequence[int] | None = None
    heads: Sequence[tuple[int, int]] | None = None
    queries: str = "text"

    kind: ClassVar[str] = "attn_uniform"
    domain: ClassVar[str] = "attention"  # type: ignore[misc]
    intensity_field: ClassVar[str] = "eta"

    def __post_init__(self) -> None:
        owner = "AttentionUniform"
        self.eta = _check_unit(self.eta, "eta", owner)
        if self.queries not in QUERY_SCOPES:
            raise InputError(f"{owner}: queries must be one of {QUERY_SCOPES}, got {self.queries!r}")
        if self.layers is not None:
            if isinstance(self.layers, numbers.Integral) and not isinstance(self.layers, bool):
                self.layers = (int(self.layers),)
            elif isinstance(self.layers, (list, tuple, range)):
                self.layers = tuple(_check_int(x, "layers entry", owner) for x in self.layers)
                if not self.layers:
                    raise InputError(f"{owner}: layers is empty; pass None for every LM layer")
            else:
                raise InputError(f"{owner}: layers must be None, an int or a list of ints, got {self.layers!r}")
        if self.heads is not None:
            if not isinstance(self.heads, (list, tuple)) or not self.heads:
                raise InputError(f"{owner}: heads must be None or a non-empty list of (layer, head) pairs, "
                                 f"got {self.heads!r}")
            pairs = []
            for pair in self.heads:
                if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                    raise InputError(f"{owner}: heads entries must be (layer, head) pairs, got {pair!r}")
                pairs.append((_check_int(pair[0], "heads layer", owner), _check_int(pair[1], "heads head", owner)))
            self.heads = tuple(pairs)

    def scope(self, model: Any) -> dict[int, torch.Tensor | None]:
        """Edited layers of ``model``, each with its ``[H]`` bool head mask (``None`` = every head).

        Raises:
            LayerIndexError: a layer or head outside the model.
            InputError: a head whose layer is not among explicit ``layers``.
        """
        layer_list = model.check_layers(None if self.layers is None else list(self.layers))
        if self.heads is None:
            return {layer: None for layer in layer_list}
        n_heads = int(model.n_heads)
        scope: dict[int, torch.Tensor] = {}
        for layer, head in self.heads:
            norm = model.check_layers([layer])[0]
            if self.layers is not None and norm not in layer_list:
                raise InputError(f"AttentionUniform: head ({layer}, {head}) is in layer {norm}, which is not among "
                                 f"layers {layer_list}")
            if not (-n_heads <= head < n_heads):
                raise LayerIndexError(f"AttentionUniform: head {head} (layer {layer}) is out of range for "
                                      f"{n_heads} heads (valid: 0..{n_heads - 1})")
            scope.setdefault(norm, torch.zeros(n_heads, dtype=torch.bool))[head % n_heads] = True
        return {layer: scope[layer] for layer in sorted(scope)}

    def hooks(self, model: Any, batch: Any) -> list[HookSpec]:
        """``(hook_name, fn)`` pattern hooks for ``batch`` (masks are built here, once per batch).

        The hooks work at prefill (``[B, H, T, T]``) and at every cached decode step (``[B, H, 1, T + s]``):
        generated keys are not image keys and generated queries are text.
        """
        spans, text = image_span_masks(batch)  # [B, S, T], [B, T]
        if self.queries == "all":
            text = text | spans.any(1)  # every non-padding query, image tokens included
        scope = self.scope(model)
        state: dict[str, Any] = {}

        def masks_for(pattern: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            b, _, q, k = pattern.shape
            t = spans.shape[-1]
            if b != spans.shape[0] or k < t or q > k:
                raise InputError(f"AttentionUniform hooks were built for a batch of {spans.shape[0]} samples with "
                                 f"{t} prompt positions but saw a pattern of shape {tuple(pattern.shape)}; call "
                                 "hooks(model, batch) for the batch you run")
            key = (q, k, pattern.device)
            if state.get("key") != key:
                if state.get("device") != pattern.device:
                    state["device"] = pattern.device
                    state["spans"], state["text"] = spans.to(pattern.device), text.to(pattern.device)
                sp, tx = state["spans"], state["text"]
                if k > t:
                    sp = torch.nn.functional.pad(sp, (0, k - t), value=False)
                    tx = torch.cat([tx, torch.ones(b, k - t, dtype=torch.bool, device=pattern.device)], 1)
                state["key"], state["masks"] = key, (sp, tx[:, k - q:])
            return state["masks"]

        def make(head_mask: torch.Tensor | None) -> Callable:
            def edit(pattern: torch.Tensor, hook: Any = None) -> torch.Tensor:
                sp, q_text = masks_for(pattern)
                if self.queries == "all":
                    return _interpolate_visible(pattern, sp, q_text, self.eta, head_mask)
                return interpolate_image_attention(pattern, sp, q_text, self.eta, head_mask)

            return edit

        return [(hook_pattern(layer), make(hm)) for layer, hm in scope.items()]


# ---------------------------------------------------------------------------------------------- factory
def perturbation_class(kind: str) -> type[Perturbation]:
    """The class of perturbation ``kind`` (case-insensitive), or :class:`InputError` listing the kinds."""
    return PERTURBATIONS.get(kind)


def get_perturbation(kind: str, intensity: float, **settings: Any) -> Perturbation:
    """Build perturbation ``kind`` at ``intensity`` (in ``[0, 1]``; 0 = identity).

    Args:
        kind: one of :data:`PERTURBATION_KINDS`.
        intensity: strength; ``eta`` for ``attn_uniform``.
        **settings: fields of that kind's class (e.g. ``seed`` for pixel kinds, ``layers`` / ``heads``
            for ``attn_uniform``).

    Raises:
        InputError: unknown kind (lists the known kinds), intensity outside ``[0, 1]`` or not a number,
            unknown setting (lists the accepted ones) or a setting value out of range.
    """
    cls = perturbation_class(kind)
    _check_unit(intensity, "intensity", f"perturbation {cls.kind!r}")
    accepted = cls.setting_names()
    unknown = sorted(set(settings) - set(accepted))
    if unknown:
        raise InputError(f"perturbation {cls.kind!r} has no setting(s) {', '.join(unknown)}; "
                         f"accepted: {', '.join(accepted)}")
    return cls(**{cls.intensity_field: intensity}, **settings)


__all__ = [
    "ATTENTION_KINDS", "AttentionUniform", "Blur", "GREY", "Jpeg", "Noise", "PERTURBATIONS", "PERTURBATION_KINDS",
    "PIXEL_KINDS", "Perturbation", "PixelPerturbation", "ST", "ShrinkPad", "get_perturbation", "image_span_masks",
    "interpolate_image_attention", "perturbation_class", "shrink_and_pad",
]
