"""Trigger patterns: seeded noise and checkerboard patches, the blend picture, the SIG sinusoid.

Everything here is plain ``numpy`` / ``PIL`` and fully deterministic: the same arguments give the
same bytes on every machine. Arrays are channels-last ``uint8`` images ``[H, W, 3]`` unless a
docstring says otherwise.

The blend picture
-----------------
The paper blends a Hello-Kitty image, which this project must not redistribute. In its place ships
``assets/blend_pattern.png`` (336 x 336 px): a cartoon panda face on a sixteen-ray sunburst, drawn by
:func:`cartoon_pattern` from flat colours and thick black outlines, so that it stays clearly
recognisable after being shrunk to 32 x 32 px. Regenerate the asset with::

    python -m cleansight_analysis.attacks.patterns

The drawing avoids transcendental functions (no ``sin``/``atan2``; only ``+ - * /`` and ``sqrt``,
which IEEE-754 rounds exactly), so the rendered pixels do not depend on the platform's math library.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import InputError

#: Folder holding the generated trigger assets.
ASSETS_DIR = Path(__file__).resolve().parent / "assets"
#: The shipped blend picture (a stand-in for the paper's Hello-Kitty image).
BLEND_PATTERN_PATH = ASSETS_DIR / "blend_pattern.png"
#: Side in pixels at which the blend picture is stored (the LVLM input size).
BLEND_PATTERN_SIZE = 336

#: Design canvas of :func:`cartoon_pattern`; all shape coordinates below are in these units.
_DESIGN = 336.0

# Flat colours of the cartoon (RGB).
_GOLD = (255, 196, 0)
_MAGENTA = (226, 48, 112)
_BLACK = (20, 20, 24)
_WHITE = (250, 250, 250)
_PINK = (255, 128, 160)
_GREEN = (52, 176, 72)
_TEAL = (0, 140, 160)


def _shape(shape: tuple[int, int], where: str) -> tuple[int, int]:
    """Validate a patch shape ``(height, width)`` of positive ints."""
    if (
        not isinstance(shape, (tuple, list))
        or len(shape) != 2
        or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1 for v in shape)
    ):
        raise InputError(f"{where}: shape must be (height, width) with positive integers, got {shape!r}")
    return int(shape[0]), int(shape[1])


def noise_patch(shape: tuple[int, int], seed: int) -> np.ndarray:
    """Uniform random RGB noise, every channel value drawn from 0..255.

    Args:
        shape: ``(height, width)`` of the patch in pixels.
        seed: seed of the ``numpy`` generator; the same seed gives the same patch.

    Returns:
        ``uint8`` array ``[height, width, 3]``.
    """
    h, w = _shape(shape, "noise_patch")
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def mean_noise_patch(image: np.ndarray, shape: tuple[int, int], seed: int = 42) -> np.ndarray:
    """The CleanSight BadNet patch: the image's per-channel mean plus standard normal noise.

    Values are computed on the 0..1 intensity scale, as in the paper's code: ``mean_c + N(0, 1)``,
    then clipped to [0, 1] (the standard deviation of 1 saturates most pixels to black or full
    colour, so the patch is a high-contrast noise square tinted by the image). The noise itself is
    fixed by ``seed`` (42 in the paper), so every image receives the same noise; only the tint
    follows the image.

    Args:
        image: ``uint8`` array ``[H, W, 3]``, the image the patch will be pasted on.
        shape: ``(height, width)`` of the patch in pixels.
        seed: seed of the noise.

    Returns:
        ``uint8`` array ``[height, width, 3]``.
    """
    h, w = _shape(shape, "mean_noise_patch")
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise InputError(f"mean_noise_patch: image must be [H, W, 3], got shape {tuple(arr.shape)}")
    mean = arr.reshape(-1, 3).astype(np.float64).mean(axis=0) / 255.0
    noise = np.random.default_rng(seed).standard_normal((h, w, 3))
    values = np.clip(mean[None, None, :] + noise, 0.0, 1.0)
    return np.floor(values * 255.0 + 0.5).astype(np.uint8)


def checkerboard_patch(shape: tuple[int, int], cell: int) -> np.ndarray:
    """Black and white checkerboard whose top-left cell is white.

    Args:
        shape: ``(height, width)`` of the patch in pixels.
        cell: side of one square cell in pixels (>= 1).

    Returns:
        ``uint8`` array ``[height, width, 3]`` with values 0 and 255 only.
    """
    h, w = _shape(shape, "checkerboard_patch")
    if not isinstance(cell, (int, np.integer)) or isinstance(cell, bool) or cell < 1:
        raise InputError(f"checkerboard_patch: cell must be a positive number of pixels, got {cell!r}")
    rows = (np.arange(h) // int(cell))[:, None]
    cols = (np.arange(w) // int(cell))[None, :]
    white = (rows + cols) % 2 == 0
    return np.repeat(np.where(white, 255, 0).astype(np.uint8)[..., None], 3, axis=-1)


def solid_patch(shape: tuple[int, int], color: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """A patch of one colour (white by default, the classic BadNet square).

    Returns:
        ``uint8`` array ``[height, width, 3]``.
    """
    h, w = _shape(shape, "solid_patch")
    out = np.empty((h, w, 3), dtype=np.uint8)
    out[...] = np.asarray(color, dtype=np.uint8)
    return out


def uniform_noise_image(size: tuple[int, int], seed: int) -> Image.Image:
    """A full image of uniform RGB noise, the "noise" blend pattern.

    Args:
        size: ``(width, height)`` in pixels (PIL convention).
        seed: seed of the noise.

    Returns:
        RGB ``PIL.Image`` of ``size``.
    """
    w, h = size
    return Image.fromarray(noise_patch((h, w), seed))


def sinusoid(size: tuple[int, int], delta: float, frequency: float) -> np.ndarray:
    """The SIG signal ``delta * 255 * sin(2 pi j f / W)`` for column ``j``, identical on every row.

    Args:
        size: ``(width, height)`` in pixels (PIL convention).
        delta: amplitude on the 0..1 intensity scale (60/255 in the LVLM setting).
        frequency: number of periods across the image width (6 in both settings).

    Returns:
        ``float64`` array ``[height, width]`` of additive offsets in grey levels (0..255 scale).
    """
    w, h = size
    cols = np.arange(w, dtype=np.float64)
    wave = float(delta) * 255.0 * np.sin(2.0 * np.pi * cols * float(frequency) / float(w))
    return np.broadcast_to(wave[None, :], (h, w)).copy()


# --------------------------------------------------------------------------------------------
# The cartoon blend picture
# --------------------------------------------------------------------------------------------


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, rx: float, ry: float,
             rot: tuple[float, float] = (1.0, 0.0)) -> np.ndarray:
    """Pixels inside an ellipse, optionally rotated by the angle whose (cos, sin) is ``rot``."""
    c, s = rot
    dx, dy = x - cx, y - cy
    u = c * dx + s * dy
    v = -s * dx + c * dy
    return (u / rx) ** 2 + (v / ry) ** 2 <= 1.0


def _paint(canvas: np.ndarray, mask: np.ndarray, color: tuple[int, int, int]) -> None:
    canvas[mask] = color


def _render_cartoon(n: int) -> np.ndarray:
    """Draw the cartoon on an ``n x n`` pixel grid; returns ``uint8`` ``[n, n, 3]``."""
    scale = _DESIGN / n
    centres = (np.arange(n, dtype=np.float64) + 0.5) * scale
    y, x = np.meshgrid(centres, centres, indexing="ij")
    img = np.zeros((n, n, 3), dtype=np.uint8)

    # Sunburst of sixteen rays around the head centre. Parity of the 22.5 degree sector, computed
    # with comparisons only: near a diagonal or near an axis, which octant, which sign quadrant.
    cx, cy = 168.0, 186.0
    dx, dy = x - cx, y - cy
    ax, ay = np.abs(dx), np.abs(dy)
    t = math.sqrt(2.0) - 1.0  # tan(22.5 deg)
    near_diag = np.minimum(ax, ay) > t * np.maximum(ax, ay)
    odd_octant = (ay > ax) ^ (dx * dy < 0)
    ray = near_diag ^ odd_octant
    img[...] = _GOLD
    _paint(img, ray, _MAGENTA)

    # A teal ground band with a black horizon line.
    _paint(img, y >= 300.0, _BLACK)
    _paint(img, y >= 308.0, _TEAL)

    # Ears: black discs with pink insides, behind the head.
    for ex in (76.0, 260.0):
        _paint(img, _ellipse(x, y, ex, 82.0, 48.0, 48.0), _BLACK)
        _paint(img, _ellipse(x, y, ex, 82.0, 22.0, 22.0), _PINK)

    # Head: thick black outline, white face.
    _paint(img, _ellipse(x, y, cx, cy, 126.0, 112.0), _BLACK)
    _paint(img, _ellipse(x, y, cx, cy, 116.0, 102.0), _WHITE)

    # Eye patches: tilted black ovals (rotation with cos 0.8, sin 0.6, an exact pair).
    _paint(img, _ellipse(x, y, 118.0, 172.0, 30.0, 42.0, (0.8, 0.6)), _BLACK)
    _paint(img, _ellipse(x, y, 218.0, 172.0, 30.0, 42.0, (0.8, -0.6)), _BLACK)
    # Eyes: white discs, black pupils, small white highlights.
    for ex, px in ((122.0, 126.0), (214.0, 210.0)):
        _paint(img, _ellipse(x, y, ex, 166.0, 15.0, 15.0), _WHITE)
        _paint(img, _ellipse(x, y, px, 169.0, 8.0, 8.0), _BLACK)
        _paint(img, _ellipse(x, y, px - 3.0, 165.0, 3.0, 3.0), _WHITE)

    # Cheeks, nose and a two-lobed smile.
    for ex in (96.0, 240.0):
        _paint(img, _ellipse(x, y, ex, 232.0, 18.0, 14.0), _PINK)
    _paint(img, _ellipse(x, y, cx, 218.0, 21.0, 14.0), _BLACK)
    for mx in (153.0, 183.0):
        ring = _ellipse(x, y, mx, 236.0, 17.0, 15.0) & ~_ellipse(x, y, mx, 236.0, 11.0, 9.0)
        _paint(img, ring & (y >= 236.0), _BLACK)

    # A bamboo leaf in the bottom-right corner: outlined green oval plus a stem.
    leaf = (0.8, -0.6)
    _paint(img, _ellipse(x, y, 284.0, 290.0, 50.0, 22.0, leaf), _BLACK)
    _paint(img, _ellipse(x, y, 284.0, 290.0, 42.0, 15.0, leaf), _GREEN)
    _paint(img, _ellipse(x, y, 284.0, 290.0, 40.0, 2.5, leaf), _BLACK)
    return img


def cartoon_pattern(size: int = BLEND_PATTERN_SIZE, supersample: int = 2) -> Image.Image:
    """Render the cartoon blend picture (panda face on a sunburst) at ``size x size`` pixels.

    The picture is drawn on a ``size * supersample`` grid and box-averaged down, which smooths the
    outlines. ``cartoon_pattern()`` (336 px, supersample 2) is exactly the shipped
    ``assets/blend_pattern.png``.

    Args:
        size: side of the square output in pixels (>= 2).
        supersample: sub-pixel grid factor (>= 1).

    Returns:
        RGB ``PIL.Image`` of ``(size, size)``.
    """
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 2:
        raise InputError(f"cartoon_pattern: size must be an int >= 2 (pixels), got {size!r}")
    if not isinstance(supersample, (int, np.integer)) or isinstance(supersample, bool) or supersample < 1:
        raise InputError(f"cartoon_pattern: supersample must be an int >= 1, got {supersample!r}")
    size, ss = int(size), int(supersample)
    big = _render_cartoon(size * ss).astype(np.uint32)
    blocks = big.reshape(size, ss, size, ss, 3).sum(axis=(1, 3))
    n = ss * ss
    small = ((blocks + n // 2) // n).astype(np.uint8)
    return Image.fromarray(small)


@lru_cache(maxsize=1)
def _blend_pattern_336() -> Image.Image:
    if BLEND_PATTERN_PATH.is_file():
        with Image.open(BLEND_PATTERN_PATH) as im:
            im.load()
            pattern = im.convert("RGB")
        if pattern.size == (BLEND_PATTERN_SIZE, BLEND_PATTERN_SIZE):
            return pattern
    # Asset missing (e.g. a wheel built without package data) or damaged: draw it again.
    return cartoon_pattern(BLEND_PATTERN_SIZE)


def blend_pattern(size: tuple[int, int] | None = None) -> Image.Image:
    """The shipped blend picture, optionally resized (bicubic) to ``size``.

    Reads ``assets/blend_pattern.png``; when the file is missing the picture is rendered again with
    :func:`cartoon_pattern`, which produces the same pixels.

    Args:
        size: ``(width, height)`` in pixels, or ``None`` for the stored 336 x 336 px picture.

    Returns:
        a new RGB ``PIL.Image``.
    """
    pattern = _blend_pattern_336()
    if size is None or tuple(size) == pattern.size:
        return pattern.copy()
    return pattern.resize((int(size[0]), int(size[1])), Image.Resampling.BICUBIC)


def write_assets(directory: str | Path | None = None) -> list[Path]:
    """(Re)generate the PNG trigger assets; returns the written paths.

    Args:
        directory: target folder; defaults to the package's ``attacks/assets`` folder.
    """
    folder = Path(directory) if directory is not None else ASSETS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / BLEND_PATTERN_PATH.name
    cartoon_pattern(BLEND_PATTERN_SIZE).save(path, format="PNG", optimize=True)
    if folder == ASSETS_DIR:
        _blend_pattern_336.cache_clear()
    return [path]


if __name__ == "__main__":  # pragma: no cover - maintenance entry point
    for written in write_assets():
        print(f"wrote {written}")
