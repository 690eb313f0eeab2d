"""Image validation: everything the processor sees is an RGB ``PIL.Image`` of sane size.

Accepted inputs (per image): a ``PIL.Image`` of any mode (converted to RGB), a path to an image
file, a ``numpy`` array ``[H, W]`` / ``[H, W, C]`` (``uint8`` 0..255, ``uint16`` 0..65535 or float
0..1, C in 1/3/4), or a ``torch`` tensor ``[C, H, W]`` (float 0..1 or uint8). Anything else raises
:class:`InputError` naming the image and the problem.

High-bit-depth images are scaled to 8 bits by their bit depth, never clipped: 16-bit samples
(PIL modes ``I;16*``, ``uint16`` arrays) become ``round(v / 257)``; PIL mode ``I`` (32-bit int) is read
as 16-bit when its values lie in 0..65535 (how 16-bit PNGs used to open) and as 31-bit
(``v * 255 / (2**31 - 1)``) otherwise, negative values are rejected; PIL mode ``F`` (32-bit float)
must lie in [0, 1], as float arrays do.

Image files are checked against :data:`MAX_PIXELS` from their header, before any pixel is decoded, so
a small file declaring a huge image (a decompression bomb) raises :class:`InputError` instead of
allocating it.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import InputError

#: Smallest accepted side in pixels; smaller images carry no usable content.
MIN_SIDE = 2
#: Largest accepted long/short side ratio; beyond it CLIP-style resizing explodes in memory.
MAX_ASPECT = 50.0
#: Largest accepted image area in pixels (about a 12k x 8k photo). Files are checked from their header,
#: before decoding; this replaces PIL's own decompression-bomb warning (89,478,485 px), whose error
#: threshold (twice that) lies above it.
MAX_PIXELS = 100_000_000

#: PIL modes holding 16-bit samples.
_MODES_16 = ("I;16", "I;16L", "I;16B", "I;16N")


def _to_uint8_16bit(arr: np.ndarray) -> np.ndarray:
    """16-bit samples to 8 bits by bit depth: ``round(v / 257)`` (65535 -> 255, no clipping)."""
    return np.round(arr.astype(np.float32) / 257.0).astype(np.uint8)


def _high_depth_to_l(im: Image.Image, where: str) -> Image.Image:
    """A PIL image of mode ``I;16*``, ``I`` or ``F`` as an 8-bit ``L`` image, scaled by its bit depth."""
    arr = np.asarray(im)
    if im.mode in _MODES_16:
        return Image.fromarray(_to_uint8_16bit(arr))
    if im.mode == "F":
        return _from_array(arr.astype(np.float32), where, what="mode 'F' (32-bit float) image")
    arr = arr.astype(np.int64)  # mode "I": 32-bit signed
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0:
        raise InputError(
            f"{where}: mode 'I' (32-bit int) image has values in [{lo}, {hi}]; negative samples have no 8-bit "
            "meaning (expected 0..65535 for 16-bit or 0..2**31-1 for 32-bit data)"
        )
    if hi <= 65535:
        return Image.fromarray(_to_uint8_16bit(arr))
    return Image.fromarray(np.round(arr.astype(np.float64) * (255.0 / (2**31 - 1))).astype(np.uint8))


def _bomb_error(where: str, path: Path, pixels: int | None, size: tuple[int, int] | None = None) -> InputError:
    declared = f"{pixels:,} pixels" if pixels is not None else "more pixels than PIL allows"
    if size is not None:
        declared += f" ({size[0]}x{size[1]})"
    return InputError(
        f"{where}: {str(path)!r} declares an image of {declared}, over the limit of {MAX_PIXELS:,} pixels "
        "(cleansight_analysis.inputs.images.MAX_PIXELS); not decoding it (possible decompression bomb)"
    )


def _from_array(arr: np.ndarray, where: str, what: str = "float image") -> Image.Image:
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise InputError(
            f"{where}: array of shape {tuple(arr.shape)} is not an image; expected [H, W], [H, W, 3] "
            "or [H, W, 4] (channels last)"
        )
    if arr.dtype == np.uint8:
        data = arr
    elif arr.dtype == np.uint16:
        data = _to_uint8_16bit(arr)
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise InputError(f"{where}: {what} contains NaN or infinite values")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 1.0:
            raise InputError(
                f"{where}: {what} values span [{lo:.3g}, {hi:.3g}]; expected the range [0, 1] "
                "(or pass uint8 values 0..255)"
            )
        data = np.round(arr * 255.0).astype(np.uint8)
    else:
        raise InputError(f"{where}: unsupported image dtype {arr.dtype}; use uint8 (0..255), uint16 (0..65535) or float (0..1)")
    return Image.fromarray(np.ascontiguousarray(data))


def to_rgb_image(obj: Any, where: str = "image") -> Image.Image:
    """Return ``obj`` as an RGB ``PIL.Image`` or raise :class:`InputError` saying what is wrong.

    Args:
        obj: PIL image, path, ``np.ndarray`` ``[H, W(, C)]`` or ``torch.Tensor`` ``[C, H, W]``.
        where: how to name the image in error messages, e.g. ``"images[2][0]"``.
    """
    if isinstance(obj, (str, Path)):
        path = Path(obj)
        if not path.is_file():
            raise InputError(f"{where}: image file {str(path)!r} does not exist")
        try:
            with warnings.catch_warnings():
                # MAX_PIXELS, checked below on the header before decoding, replaces PIL's bomb warning.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path) as im:
                    w, h = im.size
                    if w * h > MAX_PIXELS:
                        raise _bomb_error(where, path, w * h, (w, h))
                    im.load()
                    obj = im.copy()
        except Image.DecompressionBombError as exc:  # PIL's own limit (2 x MAX_IMAGE_PIXELS) hit in open()
            found = re.search(r"\((\d+) pixels\)", str(exc))
            raise _bomb_error(where, path, int(found.group(1)) if found else None) from exc
        except OSError as exc:
            raise InputError(f"{where}: {str(path)!r} is not a readable image ({exc})") from exc
    if not isinstance(obj, Image.Image):
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu()
            if t.ndim == 3 and t.shape[0] in (1, 3, 4):
                t = t.permute(1, 2, 0)
            elif t.ndim != 2:
                raise InputError(
                    f"{where}: tensor of shape {tuple(obj.shape)} is not an image; expected [C, H, W] with C in 1/3/4"
                )
            obj = t.numpy() if t.dtype != torch.bfloat16 else t.float().numpy()
        if isinstance(obj, np.ndarray):
            obj = _from_array(obj, where)
        else:
            raise InputError(
                f"{where}: got {type(obj).__name__}; expected a PIL image, an image path, a numpy array or a torch tensor"
            )
    w, h = obj.size
    if min(w, h) < MIN_SIDE:
        raise InputError(f"{where}: image is {w}x{h} px; each side must be at least {MIN_SIDE} px")
    if max(w, h) / min(w, h) > MAX_ASPECT:
        raise InputError(f"{where}: image is {w}x{h} px, aspect ratio above {MAX_ASPECT:g}:1 is not supported")
    if w * h > MAX_PIXELS:
        raise InputError(f"{where}: image is {w}x{h} px, more than {MAX_PIXELS:,} pixels; downscale it first")
    if obj.mode in _MODES_16 or obj.mode in ("I", "F"):
        obj = _high_depth_to_l(obj, where)
    if obj.mode != "RGB":
        if obj.mode in ("RGBA", "LA", "PA") or (obj.mode == "P" and "transparency" in obj.info):
            # Composite transparent pixels on white, as a viewer would show them.
            rgba = obj.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            obj = Image.alpha_composite(background, rgba).convert("RGB")
        else:
            obj = obj.convert("RGB")
    return obj
