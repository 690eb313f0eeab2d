"""Pre-softmax key masking: the one hook factory behind every pruning in the package.

A masked key gets the dtype's most negative finite value (``torch.finfo(dtype).min``, the paper's
``-1e38`` made dtype-safe) in the pre-softmax scores (``hook_attn_scores``), so the softmax gives it
(numerically) zero weight and renormalises the rest. Tokens stay in the sequence and the KV cache; key
positions never move during decoding, so one ``[B, T]`` mask serves prefill and every decode step.

- :func:`key_mask_hook`: one hook function; the mask may be a tensor or a callable read at call time
  (CleanSight builds Omega inside the same forward pass); ``prefill`` / ``decode`` choose the calls it acts
  on, ``query`` restricts it to one query row per sample (the fusion-onset probe).
- :func:`key_mask_hooks`: the hooks for a range of layers of a model (random pruning, the oracle tau sweep,
  the logit lens' pruned condition).
- :func:`drop_keys`: the same mask applied to a *post*-softmax pattern by zeroing and renormalising (for
  the layer where Omega is built, whose scores hook has already run).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence, Union

import torch

from ..errors import InputError

Mask = Union[torch.Tensor, Callable[[], "torch.Tensor | None"]]


def positions_mask(positions: Sequence[Any], n_keys: int | None = None) -> torch.Tensor:
    """``[B, K]`` bool from per-sample key positions (``K`` = ``n_keys`` or the largest position + 1)."""
    pos = [torch.as_tensor(p, dtype=torch.long).reshape(-1) for p in positions]
    width = max([int(p.max()) + 1 for p in pos if len(p)] + [1]) if n_keys is None else int(n_keys)
    out = torch.zeros(len(pos), width, dtype=torch.bool)
    for i, p in enumerate(pos):
        if len(p):
            out[i, p] = True
    return out


def _fit_width(mask: torch.Tensor, k: int, device: Any) -> torch.Tensor:
    """``mask`` ``[B, K']`` cut or zero-padded to ``[B, k]`` on ``device``."""
    out = torch.zeros(mask.shape[0], k, dtype=torch.bool)
    w = min(k, mask.shape[-1])
    out[:, :w] = mask[:, :w].cpu()
    return out.to(device)


def key_mask_hook(mask: Mask, *, seq_len: int | None = None, prefill: bool = True, decode: bool = True,
                  query: torch.Tensor | None = None, owner: str = "key_mask_hook") -> Callable:
    """A ``hook_attn_scores`` function masking the keys in ``mask`` before the softmax.

    Args:
        mask: ``[B, T]`` bool (True = hide this key), or a callable returning one (or ``None``: nothing to
            mask yet) when the hook fires.
        seq_len: the prompt length ``T``; a call with ``Q == K == T`` is the prefill, any other a decode
            step. ``None``: every call is treated alike (``prefill`` / ``decode`` are then ignored).
        prefill, decode: act on the prefill call / on decode steps.
        query: ``[B]`` positions: at prefill only that query row of each sample is masked (other rows keep
            every key); decode steps (one query) are masked whole.

    Returns:
        ``fn(scores [B, H, Q, K], hook) -> scores``; samples whose mask is empty are returned unchanged.
    """

    def fn(scores: torch.Tensor, hook: Any = None) -> torch.Tensor:
        m = mask() if callable(mask) else mask
        if m is None or not bool(m.any()):
            return scores
        if scores.shape[0] != m.shape[0]:
            raise InputError(f"{owner}: built for {m.shape[0]} samples, saw scores of shape {tuple(scores.shape)}")
        q_len, k = scores.shape[-2], scores.shape[-1]
        if seq_len is not None:
            is_prefill = k == seq_len and q_len == seq_len
            if (is_prefill and not prefill) or (not is_prefill and not decode):
                return scores
        km = _fit_width(m, k, scores.device)
        low = torch.finfo(scores.dtype).min
        if query is None or q_len == 1:
            return scores.masked_fill(km[:, None, None, :], low)
        out = scores.clone()
        bi = torch.arange(scores.shape[0], device=scores.device)
        q = query.to(scores.device)
        out[bi, :, q, :] = out[bi, :, q, :].masked_fill(km[:, None, :], low)
        return out

    return fn


def key_mask_hooks(model: Any, mask: Mask | Sequence[Any], from_layer: int = 0, *,
                   layers: Sequence[int] | None = None, seq_len: int | None = None, prefill: bool = True,
                   decode: bool = True, query: torch.Tensor | None = None) -> list:
    """``hook_attn_scores`` hooks masking keys in the layers ``from_layer..n_layers-1`` (or ``layers``).

    Args:
        model: the hooked LVLM (``n_layers``, ``lm_hooks``).
        mask: ``[B, T]`` bool, a callable returning one, or per-sample key positions (a list of
            ``[n_i]`` tensors: sample ``i`` hides keys ``positions[i]``).
        from_layer: first masked layer when ``layers`` is None.
        seq_len, prefill, decode, query: as for :func:`key_mask_hook`.

    Returns:
        ``[(hook name, fn)]``; empty when a given mask hides nothing.
    """
    n_layers = int(model.n_layers)
    if layers is None:
        if not 0 <= int(from_layer) < n_layers:
            raise InputError(f"key_mask_hooks: from_layer={from_layer} is outside 0..{n_layers - 1}")
        layers = list(range(int(from_layer), n_layers))
    if not callable(mask) and not isinstance(mask, torch.Tensor):
        mask = positions_mask(mask)
    if isinstance(mask, torch.Tensor):
        if mask.dtype != torch.bool or mask.dim() != 2:
            raise InputError(f"key_mask_hooks: mask must be [B, T] bool, got {mask.dtype} {tuple(mask.shape)}")
        if not bool(mask.any()):
            return []
    fn = key_mask_hook(mask, seq_len=seq_len, prefill=prefill, decode=decode, query=query, owner="key_mask_hooks")
    return model.lm_hooks("attn_scores", fn, layers=list(layers))


def drop_keys(pattern: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """Post-softmax ``pattern`` ``[B, H, Q, K]`` with the keys of ``key_mask`` ``[B, K']`` zeroed and every row
    renormalised (equal to the pre-softmax mask up to rounding); samples with no masked key are returned
    bit-identical."""
    km = _fit_width(key_mask, pattern.shape[-1], pattern.device)
    edited = pattern.masked_fill(km[:, None, None, :], 0.0)
    edited = edited / edited.sum(-1, keepdim=True).clamp_min(torch.finfo(pattern.dtype).tiny)
    return torch.where(km.any(1)[:, None, None, None], edited, pattern)


__all__ = ["drop_keys", "key_mask_hook", "key_mask_hooks", "positions_mask"]
