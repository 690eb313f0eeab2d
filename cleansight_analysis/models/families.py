"""One adapter per supported architecture: where image tokens go and how they form grids.

The language model sees each image as a run of ``image_token_id`` tokens. How many, and how they
map back onto the picture, depends on the architecture:

- **LLaVA-1.5** (``LlavaForConditionalGeneration``): one grid of ``(H / patch) x (W / patch)``
  patch tokens, row-major, optionally preceded by the CLS token (``"full"`` feature selection).
- **LLaVA-NeXT** (``LlavaNextForConditionalGeneration``): an "any-resolution" layout, a low-res
  ``base`` grid of the whole image followed by a high-res grid stitched from tiles, cropped back to
  the image's aspect ratio, with one ``newline`` token closing every row.

Everything is derived from the model config, the processed ``pixel_values`` and ``image_sizes``
through HF's own helper functions; nothing is hard-coded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..errors import UnsupportedModelError


@dataclass(frozen=True, eq=False)
class GridLayout:
    """A rectangular block of image tokens, relative to the image's first token.

    Attributes:
        name: ``"base"`` (the only grid of LLaVA-1.5, or NeXT's low-res overview) or ``"highres"``.
        offsets: ``[rows, cols]`` offsets of each grid cell from the image's first token.
    """

    name: str
    offsets: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.offsets.shape)  # type: ignore[return-value]


@dataclass(frozen=True, eq=False)
class ImageLayout:
    """Token layout of one image: ``n_tokens`` tokens, its grids, and non-grid extras."""

    n_tokens: int
    grids: tuple[GridLayout, ...]
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. "cls", "newline" offsets


def _grid(name: str, start: int, rows: int, cols: int, row_stride: int | None = None) -> GridLayout:
    stride = cols if row_stride is None else row_stride
    offsets = start + torch.arange(rows)[:, None] * stride + torch.arange(cols)[None, :]
    return GridLayout(name, offsets)


@dataclass(frozen=True)
class ModelFamily:
    """How this package drives one HF architecture."""

    name: str
    architecture: str
    display: str
    layout_fn: Callable[[Any, torch.Tensor, Any], list[ImageLayout]]
    #: keys of the processor output that the model's forward needs besides ids and mask
    image_input_keys: tuple[str, ...] = ("pixel_values",)
    #: attribute path, from the HF model, of the language model's final norm
    final_norm_path: str = "model.language_model.norm"

    def image_layouts(self, config: Any, pixel_values: torch.Tensor, image_sizes: Any = None) -> list[ImageLayout]:
        """Layouts of every image in processor order. ``pixel_values``: the processor's output."""
        return self.layout_fn(config, pixel_values, image_sizes)

    def final_norm(self, hf_model: Any) -> Any:
        """The language model's final norm (applied to the last residual stream before ``lm_head``)."""
        module = hf_model
        for part in self.final_norm_path.split("."):
            module = getattr(module, part, None)
            if module is None:
                raise UnsupportedModelError(f"{type(hf_model).__name__} has no final norm at "
                                            f"{self.final_norm_path!r} ({self.display})")
        return module

    def hf_class(self):
        import transformers

        return getattr(transformers, self.architecture)


def _strategy(config: Any) -> str:
    return getattr(config, "vision_feature_select_strategy", "default") or "default"


def projector_inputs(core: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """What the projector reads: the vision tower's hidden states at ``config.vision_feature_layer`` (several
    layers concatenated along the feature axis when it is a list), without the CLS token under the
    ``"default"`` selection strategy.

    Args:
        core: a ``Llava*ForConditionalGeneration`` (HF; not a peft wrapper).
        pixel_values: ``[n_images, 3, H, W]`` (LLaVA-1.5) or ``[n_tiles, 3, h, w]``, as the tower takes them.

    Returns:
        ``[n_images, n_tokens, d_vision]`` in the tower's dtype, on its device.
    """
    cfg = core.config
    layer = cfg.vision_feature_layer
    out = core.model.vision_tower(pixel_values.to(device=core.device, dtype=core.dtype), output_hidden_states=True)
    if isinstance(layer, int):
        feats = out.hidden_states[layer]
    else:
        feats = torch.cat([out.hidden_states[i] for i in layer], dim=-1)
    return feats[:, 1:] if _strategy(cfg) == "default" else feats


def _llava_layouts(config: Any, pixel_values: torch.Tensor, image_sizes: Any = None) -> list[ImageLayout]:
    """LLaVA-1.5: ``pixel_values`` is ``[n_images, 3, H, W]``."""
    patch = int(config.vision_config.patch_size)
    rows, cols = int(pixel_values.shape[-2]) // patch, int(pixel_values.shape[-1]) // patch
    full = _strategy(config) == "full"
    start = 1 if full else 0
    extras = {"cls": torch.tensor([0])} if full else {}
    layout = ImageLayout(start + rows * cols, (_grid("base", start, rows, cols),), extras)
    return [layout for _ in range(int(pixel_values.shape[0]))]


def _llava_next_layouts(config: Any, pixel_values: torch.Tensor, image_sizes: Any) -> list[ImageLayout]:
    """LLaVA-NeXT any-resolution: ``pixel_values`` ``[n_images, patches, 3, h, w]``, ``image_sizes`` ``[n, 2]``."""
    from transformers.models.llava_next.modeling_llava_next import (
        get_anyres_image_grid_shape,
        image_size_to_num_patches,
        unpad_image,
    )

    if _strategy(config) != "default":
        raise UnsupportedModelError(
            "LLaVA-NeXT with vision_feature_select_strategy='full' is not supported (HF cannot pack it either)"
        )
    if image_sizes is None:
        raise UnsupportedModelError("LLaVA-NeXT inputs need `image_sizes` from the processor")
    vision_size = int(config.vision_config.image_size)
    side = vision_size // int(config.vision_config.patch_size)
    layouts = []
    for size in torch.as_tensor(image_sizes).tolist():
        base = _grid("base", 0, side, side)
        n_patches = image_size_to_num_patches(size, config.image_grid_pinpoints, vision_size)
        if n_patches <= 1:  # no tiles: base grid plus one newline token
            layouts.append(ImageLayout(side * side + 1, (base,), {"newline": torch.tensor([side * side])}))
            continue
        tiles_h, tiles_w = get_anyres_image_grid_shape(size, config.image_grid_pinpoints, vision_size)
        # Ask HF's own unpadding which rows / columns of the stitched tile grid survive.
        rows, cols = unpad_image(torch.empty(1, tiles_h * side, tiles_w * side), torch.tensor(size)).shape[-2:]
        start = side * side
        high = _grid("highres", start, rows, cols, row_stride=cols + 1)
        newline = start + torch.arange(rows) * (cols + 1) + cols
        layouts.append(ImageLayout(start + rows * (cols + 1), (base, high), {"newline": newline}))
    return layouts


FAMILIES: dict[str, ModelFamily] = {
    f.architecture: f
    for f in (
        ModelFamily("llava", "LlavaForConditionalGeneration", "LLaVA-1.5 style (CLIP + projector + Llama)",
                    _llava_layouts),
        ModelFamily("llava_next", "LlavaNextForConditionalGeneration",
                    "LLaVA-NeXT / 1.6 (any-resolution grids, Llama/Mistral/Vicuna LM)", _llava_next_layouts,
                    ("pixel_values", "image_sizes")),
    )
}

#: Architectures ``load_lvlm`` accepts, as HF class names.
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(FAMILIES)


def family_for(architecture: str | None) -> ModelFamily:
    """The :class:`ModelFamily` of an HF architecture name, or a clear error listing what is supported."""
    if architecture in FAMILIES:
        return FAMILIES[architecture]
    supported = ", ".join(f"{a} ({f.display})" for a, f in FAMILIES.items())
    raise UnsupportedModelError(
        f"architecture {architecture!r} is not supported; supported architectures: {supported}. "
        "Qwen2-VL has no editable TransformerLens adapter and Qwen2.5-VL / Qwen3-VL need torchvision."
    )


def architecture_of(model_or_config: Any) -> str | None:
    """The HF architecture name of a model object or config."""
    if isinstance(model_or_config, torch.nn.Module):
        return type(model_or_config).__name__
    archs = getattr(model_or_config, "architectures", None) or []
    return archs[0] if archs else None
