"""Attention-key masking: the pruning mechanism of the Table 3 ablations and the oracle tau sweep.

- :func:`key_mask_hooks`: ``hook_attn_scores`` hooks that hide chosen key positions from every query of
  the layers from ``from_layer`` on (prefill and every decode step);
- :func:`attention_pruning_positions`: the rule of ``docs/method.md#pruning`` (image keys whose attention
  from the last prompt token exceeds ``tau`` in any head of one layer).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..errors import InputError


def key_mask_hooks(model: Any, positions: Sequence[torch.Tensor], from_layer: int = 0) -> list:
    """``hook_attn_scores`` hooks that mask key ``positions[i]`` of sample ``i`` in layers >= ``from_layer``.

    The pre-softmax scores of those keys are set to the dtype's most negative finite value at prefill
    and at every decode step (keys never move in the KV cache), so every query of those layers gives
    them (numerically) zero attention. Samples with an empty position tensor run unchanged.
    """
    n_layers = int(model.n_layers)
    if not 0 <= int(from_layer) < n_layers:
        raise InputError(f"key_mask_hooks: from_layer={from_layer} is outside 0..{n_layers - 1}")
    pos = [torch.as_tensor(p, dtype=torch.long).reshape(-1) for p in positions]
    if not any(len(p) for p in pos):
        return []

    def fn(scores: torch.Tensor, hook: Any = None) -> torch.Tensor:
        if scores.shape[0] != len(pos):
            raise InputError(f"key_mask_hooks: built for {len(pos)} samples, saw scores of shape "
                             f"{tuple(scores.shape)}")
        low = torch.finfo(scores.dtype).min
        for i, p in enumerate(pos):
            if len(p):
                scores[i, :, :, p.to(scores.device)] = low
        return scores

    return model.lm_hooks("attn_scores", fn, layers=list(range(int(from_layer), n_layers)))


def attention_pruning_positions(model: Any, batch: Any, layer: int, tau: float) -> list[torch.Tensor]:
    """The pruning rule of ``docs/method.md#pruning``: image keys whose attention from the last prompt
    token exceeds ``tau`` in any head of ``layer`` (``Omega = {j in I_vis : max_h alpha_{q,j} > tau}``)."""
    rows = model.attention_rows(batch, layers=[layer], query="last")
    values = rows.values[:, 0]  # [B, H, K]
    out = []
    for i, g in enumerate(batch.groups):
        img = g.image
        peak = values[i][:, img].amax(0)  # [n_vis]
        out.append(img[peak > tau].cpu())
    return out


__all__ = ["attention_pruning_positions", "key_mask_hooks"]
