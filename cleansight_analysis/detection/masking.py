"""Pre-softmax key masking: the one hook factory behind every pruning in the package.

A masked key gets the dtype's most negative finite value (``torch.finfo(dtype).min``, the paper's
``-1e38`` made dtype-safe) in the pre-softmax scores (``hook_attn_scores``), so the softmax gives it
(numerically) zero weight and renormalises the rest; under SDPA attention the same hook removes the key
from SDPA's boolean mask (exactly zero weight), without the eager scores. Tokens stay in the sequence and
the KV cache; key positions never move during decoding, so one ``[B, T]`` mask serves prefill and every
decode step.

- :func:`key_mask_hook`: one hook function; the mask may be a tensor or a callable read at call time
  (CleanSight builds Omega inside the same forward pass); ``prefill`` / ``decode`` choose the calls it acts
  on, ``query`` restricts it to one query row per sample (the fusion-onset probe).
- :func:`key_mask_hooks`: the hooks for a range of layers of a model (random pruning, the oracle tau sweep,
  the logit lens' pruned condition).
- :func:`drop_keys` (from :mod:`cleansight_analysis.models.attention_hooks`): the same mask applied to a
  *post*-softmax pattern by zeroing and renormalising (for the layer where Omega is built, whose scores
  hook has already run).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence, Union

import torch

from ..errors import InputError
from ..models.attention_hooks import KeyMaskHook, drop_keys, fit_width

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


class _KeyMask(KeyMaskHook):
    """The hook :func:`key_mask_hook` returns (see there)."""

    def __init__(self, mask: Mask, seq_len: int | None, prefill: bool, decode: bool, query: torch.Tensor | None,
                 owner: str):
        self.mask, self.seq_len, self.prefill, self.decode = mask, seq_len, prefill, decode
        self.query, self.owner = query, owner

    def hidden(self, shape: tuple[int, ...], device: Any) -> torch.Tensor | None:
        m = self.mask() if callable(self.mask) else self.mask
        if m is None or not bool(m.any()):
            return None
        if shape[0] != m.shape[0]:
            raise InputError(f"{self.owner}: built for {m.shape[0]} samples, saw scores of shape {shape}")
        q_len, k = shape[-2], shape[-1]
        if self.seq_len is not None:
            is_prefill = k == self.seq_len and q_len == self.seq_len
            if (is_prefill and not self.prefill) or (not is_prefill and not self.decode):
                return None
        km = fit_width(m, k, device)
        if self.query is None or q_len == 1:
            return km[:, None, :]
        hide = torch.zeros(shape[0], q_len, k, dtype=torch.bool, device=device)
        hide[torch.arange(shape[0], device=device), self.query.to(device)] = km
        return hide


def key_mask_hook(mask: Mask, *, seq_len: int | None = None, prefill: bool = True, decode: bool = True,
                  query: torch.Tensor | None = None, owner: str = "key_mask_hook") -> KeyMaskHook:
    """A ``hook_attn_scores`` hook masking the keys in ``mask`` before the softmax.

    It is a :class:`~cleansight_analysis.models.attention_hooks.KeyMaskHook`: under SDPA attention the model
    removes the keys from SDPA's boolean mask instead of editing scores (no eager attention needed).

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
    return _KeyMask(mask, seq_len, prefill, decode, query, owner)


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


__all__ = ["drop_keys", "key_mask_hook", "key_mask_hooks", "positions_mask"]
