"""Image validation: everything the processor sees is an RGB ``PIL.Image`` of sane size.

Accepted inputs (per image): a ``PIL.Image`` of any mode (converted to RGB), a path to an image
file, a ``numpy`` array ``[H, W]`` / ``[H, W, C]`` (``uint8`` 0..255 or float 0..1, C in 1/3/4), or
a ``torch`` tensor ``[C, H, W]`` (float 0..1 or uint8). Anything else raises :class:`InputError`
naming the image and the problem.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import InputError

#: Smallest accepted side in pixels; smaller images carry no usable content.
MIN_SIDE = 2
#: Largest accepted long/short side ratio; beyond it CLIP-style resizing explodes in memory.
MAX_ASPECT = 50.0
#: Largest accepted image area in pixels (about a 12k x 8k photo).
MAX_PIXELS = 100_000_000


def _from_array(arr: np.ndarray, where: str) -> Image.Image:
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise InputError(
            f"{where}: array of shape {tuple(arr.shape)} is not an image; expected [H, W], [H, W, 3] "
            "or [H, W, 4] (channels last)"
        )
    if arr.dtype == np.uint8:
        data = arr
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise InputError(f"{where}: float image contains NaN or infinite values")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 1.0:
            raise InputError(
                f"{where}: float image values span [{lo:.3g}, {hi:.3g}]; expected the range [0, 1] "
                "(or pass uint8 values 0..255)"
            )
        data = np.round(arr * 255.0).astype(np.uint8)
    else:
        raise InputError(f"{where}: unsupported image dtype {arr.dtype}; use uint8 (0..255) or float (0..1)")
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
            with Image.open(path) as im:
                im.load()
                obj = im.copy()
        except OSError as exc:
            raise InputError(f"{where}: {str(path)!r} is not a readable image ({exc})") from exc
    if not isinstance(obj, Image.Image):
        try:
            import torch
        except ImportError:  # pragma: no cover
            torch = None
        if torch is not None and isinstance(obj, torch.Tensor):
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
    if obj.mode != "RGB":
        if obj.mode in ("RGBA", "LA", "PA") or (obj.mode == "P" and "transparency" in obj.info):
            # Composite transparent pixels on white, as a viewer would show them.
            rgba = obj.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            obj = Image.alpha_composite(background, rgba).convert("RGB")
        else:
            obj = obj.convert("RGB")
    return obj
