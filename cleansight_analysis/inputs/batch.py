"""``Batch``: processor output plus the token groups of every sample."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Sequence

import torch

from ..errors import InputError
from .groups import TokenGroups, build_token_groups, label_prompt_tokens
from .images import to_rgb_image
from .templates import render_prompt


@dataclass
class Batch:
    """A batch ready for the model.

    Attributes:
        input_ids: ``[B, T]`` token ids, image placeholders expanded, padded on ``padding_side``.
        attention_mask: ``[B, T]`` 1 for real tokens, 0 for padding.
        pixel_values: processor output (``[n_images, 3, H, W]`` for LLaVA-1.5,
            ``[n_images, patches, 3, h, w]`` for LLaVA-NeXT), images of all samples in order.
        groups: one :class:`TokenGroups` per sample.
        image_sizes: ``[n_images, 2]`` original ``(H, W)`` (LLaVA-NeXT only).
        prompts: the user prompts; ``texts``: the rendered prompts (one placeholder per image).
        images_per_sample: how many images each sample carries.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor
    groups: list[TokenGroups]
    image_sizes: torch.Tensor | None = None
    prompts: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    images_per_sample: list[int] = field(default_factory=list)
    padding_side: str = "left"

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def query_positions(self) -> torch.Tensor:
        """``[B]`` position of each sample's last prompt token."""
        return torch.tensor([g.query for g in self.groups], dtype=torch.long)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for the HF model's ``forward`` / ``generate``."""
        out = {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "pixel_values": self.pixel_values}
        if self.image_sizes is not None:
            out["image_sizes"] = self.image_sizes
        return out

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> "Batch":
        """Move tensors to ``device``; cast ``pixel_values`` to ``dtype`` (ids stay integer)."""
        pix = self.pixel_values.to(device=device, dtype=dtype) if dtype is not None else self.pixel_values.to(device)
        return replace(
            self,
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            pixel_values=pix,
            image_sizes=None if self.image_sizes is None else self.image_sizes.to(device),
        )


def _normalise(images: Any, prompts: Any) -> tuple[list[list[Any]], list[str]]:
    if isinstance(prompts, str):
        n = len(images) if isinstance(images, (list, tuple)) else 1
        prompts = [prompts] * n
    if not isinstance(prompts, (list, tuple)):
        raise InputError(f"prompts must be a string or a list of strings, got {type(prompts).__name__}")
    if not isinstance(images, (list, tuple)):
        images = [images]
    if len(prompts) == 0 or len(images) == 0:
        raise InputError("empty batch: prepare() needs at least one image and one prompt")
    if len(images) != len(prompts):
        raise InputError(
            f"got {len(images)} image entries for {len(prompts)} prompts; pass one entry per prompt "
            "(a list of images for a sample with several images)"
        )
    per_sample = [list(x) if isinstance(x, (list, tuple)) else [x] for x in images]
    for i, imgs in enumerate(per_sample):
        if not imgs:
            raise InputError(f"sample {i} has no image; every sample needs at least one image")
    return per_sample, list(prompts)


def max_positions(config: Any) -> int | None:
    """The language model's position limit (``text_config.max_position_embeddings``), or None if unset."""
    text = getattr(config, "text_config", None) or config
    limit = getattr(text, "max_position_embeddings", None)
    return int(limit) if limit else None


def check_prompt_length(config: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        image_token_id: int) -> None:
    """Raise :class:`InputError` when a prompt (text + image tokens, padded) exceeds the LM's positions.

    Positions follow the padded sequence (left padding shifts every sample to the longest one's
    length), so the padded length ``T`` is what must fit; it equals the longest sample's token count.
    """
    limit = max_positions(config)
    seq_len = int(input_ids.shape[1])
    if limit is None or seq_len <= limit:
        return
    lengths = attention_mask.sum(1)
    i = int(lengths.argmax())
    n = int(lengths[i])
    n_img = int((input_ids[i][attention_mask[i].bool()] == image_token_id).sum())
    raise InputError(
        f"sample {i}: prompt is {n:,} tokens ({n_img:,} image + {n - n_img:,} text) but the model takes at most "
        f"{limit:,} positions (text_config.max_position_embeddings); shorten the prompt or use fewer/smaller images"
    )


def prepare_batch(
    processor: Any,
    family: Any,
    config: Any,
    images: Any,
    prompts: str | Sequence[str],
    *,
    chat_template: bool = True,
    system_prompt: str | None = None,
    padding_side: str = "left",
) -> Batch:
    """Validate images, render prompts, run the processor and derive every sample's token groups.

    See :meth:`cleansight_analysis.models.HookedLVLM.prepare` for the arguments.
    """
    if padding_side not in ("left", "right"):
        raise InputError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    per_sample, prompts = _normalise(images, prompts)
    rgb = [[to_rgb_image(im, f"images[{i}][{j}]") for j, im in enumerate(imgs)] for i, imgs in enumerate(per_sample)]
    rendered = [
        render_prompt(processor, p, len(imgs), chat_template=chat_template, system_prompt=system_prompt)
        for p, imgs in zip(prompts, rgb)
    ]
    tokenizer = processor.tokenizer
    image_token_id = int(config.image_token_id)
    old_side = tokenizer.padding_side
    added_pad = False
    if tokenizer.pad_token is None:  # some LLaMA tokenizers ship without one
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
        added_pad = True
    try:
        tokenizer.padding_side = padding_side
        enc = processor(images=[im for imgs in rgb for im in imgs], text=[r.text for r in rendered],
                        padding=True, return_tensors="pt")
        labelled = [label_prompt_tokens(tokenizer, r, image_token_id) for r in rendered]
    finally:
        tokenizer.padding_side = old_side
        if added_pad:
            tokenizer.pad_token = None
    check_prompt_length(config, enc["input_ids"], enc["attention_mask"], image_token_id)
    image_sizes = enc.get("image_sizes")
    layouts = family.image_layouts(config, enc["pixel_values"], image_sizes)
    groups, k = [], 0
    for i, imgs in enumerate(rgb):
        groups.append(build_token_groups(enc["input_ids"][i], enc["attention_mask"][i], labelled[i],
                                         layouts[k:k + len(imgs)], image_token_id, where=f"sample {i}"))
        k += len(imgs)
    return Batch(
        input_ids=enc["input_ids"],
        attention_mask=enc["attention_mask"],
        pixel_values=enc["pixel_values"],
        groups=groups,
        image_sizes=None if image_sizes is None else torch.as_tensor(image_sizes),
        prompts=prompts,
        texts=[r.text for r in rendered],
        images_per_sample=[len(imgs) for imgs in rgb],
        padding_side=padding_side,
    )


def sample_batches(model: Any, samples: Sequence[Any], batch_size: int,
                   padding_side: str = "left") -> Iterator[tuple[int, Batch]]:
    """``(start, batch)`` for consecutive chunks of ``batch_size`` samples (``Sample`` objects), each
    prepared with ``model.prepare`` (images, prompts, chat template, ``padding_side``)."""
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}")
    for start in range(0, len(samples), batch_size):
        yield start, sample_batch(model, samples, start, batch_size, padding_side)


def sample_batch(model: Any, samples: Sequence[Any], start: int, batch_size: int,
                 padding_side: str = "left") -> Batch:
    """The batch of ``samples[start:start + batch_size]`` (the one :func:`sample_batches` yields at ``start``)."""
    chunk = samples[start:start + batch_size]
    if not chunk:
        raise InputError(f"sample_batch: no samples from index {start} of {len(samples)}")
    return model.prepare([x.image for x in chunk], [x.prompt for x in chunk], padding_side=padding_side)
