"""The pixel kinds (act on the image before the processor): ``st``, ``shrinkpad``, ``blur``, ``jpeg``, ``noise``."""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from ...errors import InputError
from ...inputs.images import to_rgb_image
from .base import GREY, PERTURBATIONS, Perturbation, _check_bool, _check_int, _check_real, _check_unit


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
