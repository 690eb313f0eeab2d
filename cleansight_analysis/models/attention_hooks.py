"""Hook functions that say what they need from attention, so the model can serve them without the pattern.

Two kinds. Each is an ordinary TransformerLens hook (``fn(tensor, hook) -> tensor``) on its usual hook
point, so it works wherever a hook works (eager attention, ``bridge.hooks``); each also declares what it
needs, which :mod:`cleansight_analysis.models.sdpa` serves inside SDPA attention at ``O(B*H*Q*T)`` extra
cost instead of materialising the ``[B, H, T, T]`` scores:

- :class:`KeyMaskHook`, on ``hook_attn_scores``: hides keys (per sample, optionally per query row).
  Eager: the hidden scores become the dtype's most negative finite value. SDPA: the hidden keys leave
  SDPA's boolean attention mask (identical up to rounding: both give the key exactly zero weight and
  renormalise the rest).
- :class:`RowsHook`, on ``hook_pattern``: reads the post-softmax rows of chosen query positions and may
  then drop keys from the whole layer. Eager: the rows are sliced from the pattern and a drop zeroes the
  keys and renormalises (:func:`drop_keys`). SDPA: the rows are computed from the layer's q and k
  (:func:`rows_from_qk`, after RoPE, KV heads shared as the model shares them) and a drop leaves the mask.
"""

from __future__ import annotations

from typing import Any

import torch


def fit_width(mask: torch.Tensor, k: int, device: Any) -> torch.Tensor:
    """``mask`` ``[B, K']`` cut or zero-padded to ``[B, k]`` on ``device``."""
    out = torch.zeros(mask.shape[0], k, dtype=torch.bool)
    w = min(k, mask.shape[-1])
    out[:, :w] = mask[:, :w].cpu()
    return out.to(device)


def drop_keys(pattern: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """Post-softmax ``pattern`` ``[B, H, Q, K]`` with the keys of ``key_mask`` ``[B, K']`` zeroed and every row
    renormalised (equal to the pre-softmax mask up to rounding); samples with no masked key are returned
    bit-identical."""
    km = fit_width(key_mask, pattern.shape[-1], pattern.device)
    edited = pattern.masked_fill(km[:, None, None, :], 0.0)
    edited = edited / edited.sum(-1, keepdim=True).clamp_min(torch.finfo(pattern.dtype).tiny)
    return torch.where(km.any(1)[:, None, None, None], edited, pattern)


class KeyMaskHook:
    """A ``hook_attn_scores`` hook that only hides keys. Subclasses implement :meth:`hidden`."""

    def hidden(self, shape: tuple[int, ...], device: Any) -> torch.Tensor | None:
        """``[B, Q or 1, K]`` bool (True = hide) for scores / masks of ``shape`` ``[B, H, Q, K]``, or ``None``
        when this call hides nothing."""
        raise NotImplementedError

    def __call__(self, scores: torch.Tensor, hook: Any = None) -> torch.Tensor:
        """Eager form: hidden pre-softmax scores get ``torch.finfo(dtype).min``."""
        hide = self.hidden(tuple(scores.shape), scores.device)
        if hide is None:
            return scores
        return scores.masked_fill(hide[:, None], torch.finfo(scores.dtype).min)


class RowsHook:
    """A ``hook_pattern`` hook that reads the rows of chosen queries. Subclasses implement :meth:`queries`
    and :meth:`read`."""

    def queries(self, batch: int, q_len: int, k_len: int) -> torch.Tensor | None:
        """``[B, n]`` indices on this call's query axis (``q_len`` queries over ``k_len`` keys; the queries
        are the last ``q_len`` positions) whose rows to read, or ``None`` to skip the call."""
        raise NotImplementedError

    def read(self, rows: torch.Tensor) -> torch.Tensor | None:
        """Take the rows ``[B, H, n, K]``; return ``[B, K']`` bool keys to drop from this layer's attention
        (every query) or ``None``. May raise to end the forward pass."""
        raise NotImplementedError

    def __call__(self, pattern: torch.Tensor, hook: Any = None) -> torch.Tensor:
        """Eager form: slice the rows from ``pattern`` ``[B, H, Q, K]``; a drop renormalises the pattern."""
        idx = self.queries(pattern.shape[0], pattern.shape[-2], pattern.shape[-1])
        if idx is None:
            return pattern
        bi = torch.arange(pattern.shape[0], device=pattern.device)[:, None]
        rows = pattern[bi, :, idx.to(pattern.device), :].transpose(1, 2)  # [B, n, H, K] -> [B, H, n, K]
        drop = self.read(rows)
        if drop is None or not bool(drop.any()):
            return pattern
        return drop_keys(pattern, drop)


def causal_allowed(idx: torch.Tensor, q_len: int, k_len: int) -> torch.Tensor:
    """``[B, n, K]`` bool: keys that queries ``idx`` (indices among the last ``q_len`` of ``k_len``
    positions) may see under a plain causal mask."""
    keys = torch.arange(k_len, device=idx.device)
    return keys[None, None, :] <= (idx + (k_len - q_len))[..., None]


def rows_from_qk(query: torch.Tensor, key: torch.Tensor, idx: torch.Tensor, allowed: torch.Tensor,
                 scaling: float) -> torch.Tensor:
    """Post-softmax rows ``[B, H, n, K]`` of queries ``idx`` ``[B, n]``, as eager attention computes them.

    ``query`` ``[B, H, Q, d]`` and ``key`` ``[B, H_kv, K, d]`` after RoPE (and the KV cache); query head
    ``h`` reads KV head ``h // (H / H_kv)``, as ``repeat_kv`` shares them. ``allowed`` ``[B, n, K]`` bool
    (True = may attend). Scores are ``(q k^T) * scaling`` in the model dtype, masked keys get the dtype's
    most negative value, the softmax runs in float32 and is cast back, all in eager attention's order.
    """
    b, h, _, d = query.shape
    h_kv, k_len = key.shape[1], key.shape[2]
    n = idx.shape[1]
    bi = torch.arange(b, device=query.device)[:, None]
    q_sel = query[bi, :, idx.to(query.device)]                       # [B, n, H, d]
    q_sel = q_sel.permute(0, 2, 1, 3).reshape(b, h_kv, (h // h_kv) * n, d)
    # one product per sample: HF's key is [B, T, H_kv, d] in memory (a transposed view), which a batched
    # matmul over [B, H_kv] would first copy whole; per sample it is a strided matrix BLAS reads in place
    scores = torch.stack([torch.matmul(q_sel[i], key[i].transpose(-2, -1)) for i in range(b)])
    scores = scores.view(b, h, n, k_len) * scaling
    scores = scores.masked_fill(~allowed[:, None].to(scores.device), torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)


__all__ = ["KeyMaskHook", "RowsHook", "causal_allowed", "drop_keys", "fit_width", "rows_from_qk"]
