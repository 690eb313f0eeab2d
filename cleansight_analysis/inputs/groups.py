"""Token groups: which key positions are system, image, prompt and template-tail tokens.

The paper splits the keys the answer position attends to into I_sys (before the image), I_vis (the
image tokens) and I_prm (after the image). We keep the template tokens after the instruction
(e.g. ``ASSISTANT:``) as their own group, ``template_tail``, so that either reading of the paper's
denominator can be computed (see ``docs/method.md#token-groups``). All positions are absolute indices
into the *padded* sequence of the batch, so they index attention rows directly.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..errors import InputError
from .templates import RenderedPrompt

#: Key groups of a prompt, in the order used by every ``[..., group]`` tensor.
GROUP_NAMES: tuple[str, ...] = ("system", "image", "prompt", "template_tail")
#: Extra group for keys written during generation (rows of generated queries).
GENERATED = "generated"

_SYSTEM, _IMAGE, _PROMPT, _TAIL = range(4)


@dataclass(frozen=True, eq=False)
class GridView:
    """Image tokens laid out as the picture: ``positions[r, c]`` is the token of patch ``(r, c)``."""

    name: str
    positions: torch.Tensor  # [rows, cols], long

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.positions.shape[0]), int(self.positions.shape[1]))


@dataclass(frozen=True, eq=False)
class ImageTokens:
    """The tokens of one image.

    Attributes:
        positions: ``[n_tokens]`` all positions of this image's tokens (grids and extras).
        grids: the image's grids; LLaVA-1.5 has one (``base``), LLaVA-NeXT ``base`` then ``highres``.
        extras: non-grid image tokens by kind (``cls``, ``newline``), ``[n]`` positions each.
    """

    positions: torch.Tensor
    grids: tuple[GridView, ...]
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def grid(self) -> GridView:
        """The finest grid (what you want to draw on the image)."""
        return self.grids[-1]

    @property
    def grid_shape(self) -> tuple[int, int]:
        """``(rows, cols)`` of :attr:`grid`."""
        return self.grid.shape

    def paint(self, scores: torch.Tensor, grid: str | None = None) -> torch.Tensor:
        """Lay per-key scores ``[..., K]`` out on a grid: returns ``[..., rows, cols]``."""
        view = self.grid if grid is None else next((g for g in self.grids if g.name == grid), None)
        if view is None:
            raise InputError(f"image has no grid {grid!r}; grids: {[g.name for g in self.grids]}")
        return scores[..., view.positions]


@dataclass(frozen=True, eq=False)
class TokenGroups:
    """Token groups of one sample (positions index the padded sequence of its batch).

    Attributes:
        system: ``[n_sys]`` template/system tokens before the first image (BOS included).
        images: one :class:`ImageTokens` per image, in prompt order.
        prompt: ``[n_prm]`` the instruction (and template text between image and instruction).
        template_tail: ``[n_tail]`` template tokens after the instruction, e.g. ``ASSISTANT:``.
        query: position of the last prompt token (the query that predicts the first answer token).
        seq_len: length of the padded sequence these positions live in.
    """

    system: torch.Tensor
    images: tuple[ImageTokens, ...]
    prompt: torch.Tensor
    template_tail: torch.Tensor
    query: int
    seq_len: int

    @property
    def image(self) -> torch.Tensor:
        """``[n_vis]`` positions of every image token of the sample."""
        return torch.cat([im.positions for im in self.images])

    def positions(self, group: str) -> torch.Tensor:
        """Positions of a group by name (one of :data:`GROUP_NAMES`)."""
        if group not in GROUP_NAMES:
            raise InputError(f"unknown token group {group!r}; groups: {GROUP_NAMES}")
        return self.image if group == "image" else getattr(self, group)

    def membership(self, n_keys: int | None = None, *, generated: bool = False) -> torch.Tensor:
        """One-hot group membership of every key: ``[n_keys, G]`` float.

        ``G = len(GROUP_NAMES)``, plus one ``generated`` column (keys at or after ``seq_len``) when
        ``generated=True``. Padding keys belong to no group (all-zero row).
        """
        n_keys = self.seq_len if n_keys is None else n_keys
        n_groups = len(GROUP_NAMES) + int(generated)
        out = torch.zeros(n_keys, n_groups)
        for g, name in enumerate(GROUP_NAMES):
            out[self.positions(name), g] = 1.0
        if generated and n_keys > self.seq_len:
            out[self.seq_len:, -1] = 1.0
        return out


def label_prompt_tokens(tokenizer: Any, rendered: RenderedPrompt, image_token_id: int) -> tuple[list[int], list[int]]:
    """Tokenise the *unexpanded* prompt and give each token a group code.

    Returns ``(ids, codes)`` where image placeholders keep ``image_token_id`` and code ``_IMAGE``.
    """
    try:
        enc = tokenizer(rendered.text, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    except (NotImplementedError, KeyError, TypeError, ValueError):
        warnings.warn(f"{type(tokenizer).__name__} gives no character offsets; template_tail tokens are "
                      "counted as prompt", stacklevel=3)
        ids, offsets = list(tokenizer(rendered.text)["input_ids"]), None
    img_idx = [i for i, t in enumerate(ids) if t == image_token_id]
    if not img_idx:
        raise InputError(f"prompt {rendered.text[:80]!r} contains no image placeholder token")
    first_img, last_img = img_idx[0], img_idx[-1]
    if offsets is None:  # no character positions: split at the images only
        codes = [_IMAGE if t == image_token_id else _SYSTEM if i < first_img else _PROMPT for i, t in enumerate(ids)]
        return ids, codes
    instr_start, instr_end = rendered.instruction_span
    codes = []
    for i, (tok, (start, end)) in enumerate(zip(ids, offsets)):
        special = start == end == 0 and i > 0  # added special tokens carry no characters
        if tok == image_token_id:
            codes.append(_IMAGE)
        elif i > last_img and (start >= instr_end or special):
            codes.append(_TAIL)
        elif i < first_img and (start < instr_start or start == end):
            codes.append(_SYSTEM)
        else:
            codes.append(_PROMPT)
    return ids, codes


def build_token_groups(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labelled: tuple[list[int], list[int]],
    layouts: Sequence[Any],
    image_token_id: int,
    *,
    where: str = "sample",
) -> TokenGroups:
    """Map labelled prompt tokens onto one row of the processor's padded, image-expanded ids.

    Args:
        input_ids: ``[T]`` one row of the batch.
        attention_mask: ``[T]`` its mask (1 = real token); padding may be on either side.
        labelled: output of :func:`label_prompt_tokens` for the same prompt.
        layouts: one ``ImageLayout`` per image of this sample (from the model family).
        image_token_id: the model's image token id.
    """
    ids_u, codes_u = labelled
    n_placeholders = sum(1 for t in ids_u if t == image_token_id)
    if n_placeholders != len(layouts):
        raise InputError(f"{where}: {n_placeholders} image placeholder(s) for {len(layouts)} image(s)")
    valid = attention_mask.bool()
    positions = valid.nonzero().squeeze(-1)
    if positions.numel() == 0:
        raise InputError(f"{where}: the attention mask has no real tokens")
    start = int(positions[0])
    if int(positions[-1]) - start + 1 != positions.numel():
        raise InputError(f"{where}: padding inside the sequence (attention mask has holes)")
    row = input_ids[valid].tolist()

    expanded_ids: list[int] = []
    expanded_codes: list[int] = []
    image_starts: list[int] = []
    it = iter(layouts)
    for tok, code in zip(ids_u, codes_u):
        if tok == image_token_id:
            layout = next(it)
            image_starts.append(len(expanded_ids))
            expanded_ids += [tok] * layout.n_tokens
            expanded_codes += [_IMAGE] * layout.n_tokens
        else:
            expanded_ids.append(tok)
            expanded_codes.append(code)
    if expanded_ids != row:
        n_proc = sum(1 for t in row if t == image_token_id)
        n_ours = sum(layout.n_tokens for layout in layouts)
        if n_proc != n_ours:
            raise InputError(
                f"{where}: the processor produced {n_proc} image tokens but the model's image layout "
                f"expects {n_ours} ({[layout.n_tokens for layout in layouts]} per image); processor and "
                "model config disagree (patch size, image size, grid pinpoints or feature strategy)"
            )
        raise InputError(f"{where}: the processor's token ids differ from the tokenizer's for the same text")

    codes = torch.tensor(expanded_codes)
    offset = torch.arange(len(expanded_codes)) + start
    images = []
    for img_start, layout in zip(image_starts, layouts):
        base = start + img_start
        grids = tuple(GridView(g.name, g.offsets + base) for g in layout.grids)
        extras = {k: v + base for k, v in layout.extras.items()}
        images.append(ImageTokens(base + torch.arange(layout.n_tokens), grids, extras))
    return TokenGroups(
        system=offset[codes == _SYSTEM],
        images=tuple(images),
        prompt=offset[codes == _PROMPT],
        template_tail=offset[codes == _TAIL],
        query=int(positions[-1]),
        seq_len=int(input_ids.shape[-1]),
    )
