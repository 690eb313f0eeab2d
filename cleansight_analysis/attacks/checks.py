"""Argument checks and geometry shared by the attacks: lengths (pixels or fractions of the short side),
patch sizes and locations, generators, image-valued settings (paths or PIL images, JSON as base64 PNG),
and the small pixel helpers of the triggers. The conventions are stated in :mod:`.base`."""

from __future__ import annotations

import base64
import io
import math
import numbers
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import InputError
from ..inputs.images import to_rgb_image

#: Named patch locations.
LOCATION_NAMES = ("top-left", "top-right", "bottom-left", "bottom-right", "center", "random")
#: The LVLM input side the paper's pixel values refer to.
LVLM_SIDE = 336
#: File suffixes read as trigger pictures.
_PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
#: (x0, y0, x1, y1) pixel box, x1/y1 exclusive.
Box = tuple[int, int, int, int]


# --------------------------------------------------------------------------------------------
# Validation and resolution of sizes and locations
# --------------------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_float(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, numbers.Integral))


def check_length(value: Any, name: str, *, owner: str) -> int | float:
    """Validate a length: an int >= 1 (pixels) or a float in (0, 1] (fraction of the short side).

    Returns the value as a plain Python ``int`` or ``float``; raises :class:`InputError` otherwise.
    """
    if _is_int(value):
        if int(value) >= 1:
            return int(value)
    elif _is_float(value):
        v = float(value)
        if math.isfinite(v) and 0.0 < v <= 1.0:
            return v
    raise InputError(
        f"{owner}: {name}={value!r} is not a valid length; use an int >= 1 (pixels) or a float in "
        "(0, 1] (fraction of the image's shorter side)"
    )


def check_size(value: Any, name: str, *, owner: str) -> int | float | tuple[int | float, int | float]:
    """Validate a patch size: one length (square patch) or a ``(width, height)`` pair of lengths."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise InputError(f"{owner}: {name}={value!r} must be one length or a (width, height) pair")
        return (check_length(value[0], f"{name}[0]", owner=owner), check_length(value[1], f"{name}[1]", owner=owner))
    return check_length(value, name, owner=owner)


def check_location(value: Any, name: str = "location", *, owner: str) -> str | tuple[int | float, int | float]:
    """Validate a patch location (see the module docstring); returns a normalised copy."""
    if isinstance(value, str):
        loc = value.strip().lower().replace("_", "-").replace("centre", "center")
        if loc in LOCATION_NAMES:
            return loc
        raise InputError(
            f"{owner}: {name}={value!r} is not a known location; use one of {', '.join(LOCATION_NAMES)} "
            "or an (x, y) pair (int pixels or float fractions in [0, 1])"
        )
    if isinstance(value, (tuple, list)) and len(value) == 2:
        out: list[int | float] = []
        for axis, v in zip("xy", value):
            if _is_int(v) and int(v) >= 0:
                out.append(int(v))
            elif _is_float(v) and math.isfinite(float(v)) and 0.0 <= float(v) <= 1.0:
                out.append(float(v))
            else:
                raise InputError(
                    f"{owner}: {name} {axis}={v!r} is invalid; use an int >= 0 (pixels) or a float in [0, 1] "
                    "(fraction of the free range)"
                )
        return (out[0], out[1])
    raise InputError(
        f"{owner}: {name}={value!r} is not a location; use one of {', '.join(LOCATION_NAMES)} or an (x, y) pair"
    )


def resolve_length(value: int | float, short_side: int) -> int:
    """Pixels for a validated length on an image whose shorter side is ``short_side`` (>= 1 px)."""
    if _is_int(value):
        return int(value)
    return max(1, int(math.floor(float(value) * short_side + 0.5)))


def resolve_patch_size(size: Any, image_size: tuple[int, int], *, owner: str) -> tuple[int, int]:
    """Patch ``(width, height)`` in pixels for an image of ``image_size = (width, height)``.

    Raises :class:`InputError` naming both sizes when the patch does not fit the image.
    """
    w, h = image_size
    short = min(w, h)
    if isinstance(size, tuple):
        pw, ph = resolve_length(size[0], short), resolve_length(size[1], short)
    else:
        pw = ph = resolve_length(size, short)
    if pw > w or ph > h:
        raise InputError(
            f"{owner}: the trigger is {pw}x{ph} px (size={size!r}) but the image is only {w}x{h} px; "
            "use a smaller size or a fraction of the image side"
        )
    return pw, ph


def resolve_location(location: Any, image_size: tuple[int, int], patch_size: tuple[int, int],
                     rng: np.random.Generator, *, owner: str) -> tuple[int, int]:
    """Top-left pixel ``(x, y)`` of a ``patch_size`` patch on an ``image_size`` image.

    ``rng`` is used (two integers drawn at once) only for ``location == "random"``.
    """
    w, h = image_size
    pw, ph = patch_size
    free_x, free_y = w - pw, h - ph
    if location == "random":
        x, y = rng.integers(0, [free_x + 1, free_y + 1])
        return int(x), int(y)
    named = {
        "top-left": (0, 0),
        "top-right": (free_x, 0),
        "bottom-left": (0, free_y),
        "bottom-right": (free_x, free_y),
        "center": (free_x // 2, free_y // 2),
    }
    if isinstance(location, str):
        return named[location]
    coords = []
    for axis, v, free in (("x", location[0], free_x), ("y", location[1], free_y)):
        if _is_int(v):
            if v > free:
                raise InputError(
                    f"{owner}: location {axis}={v} px puts the {pw}x{ph} px trigger outside the {w}x{h} px image "
                    f"(largest {axis} is {free})"
                )
            coords.append(int(v))
        else:
            coords.append(int(math.floor(float(v) * free + 0.5)))
    return coords[0], coords[1]


def check_rng(rng: Any, owner: str) -> np.random.Generator | None:
    """``rng`` unchanged if it is ``None`` or a ``numpy.random.Generator``; :class:`InputError` otherwise."""
    if rng is None or isinstance(rng, np.random.Generator):
        return rng
    raise InputError(
        f"{owner}: rng must be a numpy.random.Generator (e.g. attack.rng_for(i)) or None, got {type(rng).__name__}"
    )


def fmt_length(value: Any) -> str:
    """Human-readable length: ``"4 px"`` or ``"0.0893 of the short side (30 px at 336 px)"``."""
    if isinstance(value, tuple):
        return f"{fmt_length(value[0])} x {fmt_length(value[1])}"
    if _is_int(value):
        return f"{value} px"
    return f"{value:.4g} of the short side ({value * LVLM_SIDE:.3g} px at {LVLM_SIDE} px)"


# --------------------------------------------------------------------------------------------
# Image-valued settings (trigger pictures): paths or PIL images, JSON via base64 PNG
# --------------------------------------------------------------------------------------------


def check_image_setting(value: Any, name: str, *, owner: str) -> str | Image.Image:
    """Validate a picture setting: an existing image file path (kept as ``str``) or a PIL image."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, (str, Path)):
        path = Path(value)
        if not path.is_file():
            raise InputError(f"{owner}: {name}={str(value)!r} is not an existing image file")
        return str(path)
    raise InputError(f"{owner}: {name} must be an image file path or a PIL image, got {type(value).__name__}")


def load_image_setting(value: str | Image.Image, name: str) -> Image.Image:
    """The RGB picture of a validated picture setting (transparent pixels composited on white)."""
    return to_rgb_image(value, where=name)


def image_to_json(value: Any) -> Any:
    """A path stays a string; a PIL image becomes ``{"png_base64": ...}`` (lossless)."""
    if isinstance(value, Image.Image):
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return {"png_base64": base64.b64encode(buf.getvalue()).decode("ascii")}
    return value


def image_from_json(value: Any) -> Any:
    """Inverse of :func:`image_to_json`."""
    if isinstance(value, dict) and "png_base64" in value:
        with Image.open(io.BytesIO(base64.b64decode(value["png_base64"]))) as im:
            im.load()
            return im.copy()
    return value


def _to_json(value: Any) -> Any:
    if isinstance(value, Image.Image):
        return image_to_json(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (tuple, list)):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_json(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return value


def _from_json(value: Any) -> Any:
    if isinstance(value, dict) and "png_base64" in value:
        return image_from_json(value)
    if isinstance(value, list):
        return tuple(_from_json(v) for v in value)
    return value


# --------------------------------------------------------------------------------------------
# Pixel helpers and numeric checks of the triggers
# --------------------------------------------------------------------------------------------


def _to_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.uint8)


def _round_u8(values: np.ndarray) -> np.ndarray:
    """Round half-up and clip float grey levels to ``uint8``."""
    return np.clip(np.floor(values + 0.5), 0, 255).astype(np.uint8)


def _blend_arrays(image: np.ndarray, pattern: np.ndarray, alpha: float) -> np.ndarray:
    """``(1 - alpha) * image + alpha * pattern`` on ``[H, W, 3]`` uint8 arrays, rounded to uint8."""
    out = (1.0 - alpha) * image.astype(np.float64) + alpha * pattern.astype(np.float64)
    return _round_u8(out)


def _check_alpha(value: Any, name: str, owner: str) -> float:
    if (_is_int(value) or _is_float(value)) and 0.0 <= float(value) <= 1.0:
        return float(value)
    raise InputError(f"{owner}: {name}={value!r} is invalid; use a number in [0, 1]")


def _check_weight(value: Any, name: str, owner: str, upper: float | None = None) -> float:
    ok = (_is_int(value) or _is_float(value)) and np.isfinite(float(value)) and float(value) >= 0.0
    if ok and (upper is None or float(value) <= upper):
        return float(value)
    rng = f"[0, {upper:g}]" if upper is not None else ">= 0"
    raise InputError(f"{owner}: {name}={value!r} is invalid; use a number {rng}")


def _check_seed(value: Any, name: str, owner: str) -> int:
    if _is_int(value) and value >= 0:
        return int(value)
    raise InputError(f"{owner}: {name} must be an int >= 0, got {value!r}")


def _check_pattern(value: Any, names: tuple[str, ...], owner: str) -> str | Image.Image:
    """A pattern setting: one of ``names`` (normalised), an existing image file (path) or a PIL image."""
    if isinstance(value, str):
        key = value.strip().lower().replace("-", "_")
        if key in names:
            return key
        looks_like_file = Path(value).is_file() or Path(value).suffix.lower() in _PICTURE_SUFFIXES
        if not looks_like_file:
            raise InputError(
                f"{owner}: pattern={value!r} is not a known pattern; use one of {', '.join(names)} "
                "or a picture (image file path or PIL image)"
            )
    return check_image_setting(value, "pattern", owner=owner)


def _resize(picture: Image.Image, size: tuple[int, int]) -> Image.Image:
    return picture if picture.size == tuple(size) else picture.resize(tuple(size), Image.Resampling.BICUBIC)
