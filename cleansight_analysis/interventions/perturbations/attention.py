"""The attention kind ``attn_uniform``: text queries' attention to each image pulled toward its mean
(on ``hook_pattern`` of the chosen LM layers), and the span helpers it needs."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

import torch

from ...errors import InputError, LayerIndexError
from ...models.hooknames import HookSpec, hook_pattern
from .base import PERTURBATIONS, Perturbation, _check_int, _check_unit


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
        generated keys are not image keys and generated queries are text. ``eta == 0`` is the identity and
        gets no hooks (a pattern hook would make the edited layers run eager instead of SDPA attention).
        """
        scope = self.scope(model)
        if self.eta == 0:
            return []
        spans, text = image_span_masks(batch)  # [B, S, T], [B, T]
        if self.queries == "all":
            text = text | spans.any(1)  # every non-padding query, image tokens included
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
