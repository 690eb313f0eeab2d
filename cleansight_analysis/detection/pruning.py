"""The pruning set Omega (``docs/method.md#pruning``): one definition for CleanSight and the oracle sweeps.

At the last detection layer ``l_e``, from the answer query's post-softmax row ``alpha^{l_e,h}_{q,j}``::

    Omega = { j in I_vis : max_h alpha^{l_e,h}_{q,j} > tau }

(union over heads, absolute threshold, no top-k: the count varies per input). ``tau="auto"`` in CleanSight
is a quantile of the pooled clean values :func:`image_token_peaks` over every image token.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:  # pragma: no cover
    from ..inputs.batch import Batch


def image_mask(batch: "Batch") -> torch.Tensor:
    """``[B, T]`` bool: the image tokens of every sample."""
    out = torch.zeros(len(batch), batch.seq_len, dtype=torch.bool)
    for i, g in enumerate(batch.groups):
        out[i, g.image] = True
    return out


def image_token_peaks(rows: torch.Tensor, seq_len: int) -> torch.Tensor:
    """``max_h alpha_{q,j}`` ``[B, T]`` from query rows ``[B, H, K]`` (keys past ``T`` are dropped)."""
    return rows[..., :seq_len].amax(1)


def omega(rows: torch.Tensor, img: torch.Tensor, tau: float) -> torch.Tensor:
    """Omega as a key mask ``[B, T]`` bool from the ``l_e`` query rows ``[B, H, K]`` and the image mask ``[B, T]``."""
    return img & (image_token_peaks(rows, img.shape[-1]) > tau)


def omega_positions(mask: torch.Tensor) -> list[torch.Tensor]:
    """Per-sample key positions (``[n_i]`` long) of a ``[B, T]`` mask."""
    return [mask[i].nonzero().squeeze(-1) for i in range(mask.shape[0])]


def auto_tau(peaks: Any, quantile: float) -> float:
    """``tau="auto"``: the ``quantile`` of the pooled clean :func:`image_token_peaks` over every image token
    (a tensor or a list of per-batch tensors), i.e. about ``1 - quantile`` of clean image tokens exceed it."""
    if isinstance(peaks, (list, tuple)):
        peaks = torch.cat([torch.as_tensor(p).reshape(-1) for p in peaks])
    return float(np.quantile(torch.as_tensor(peaks).double().numpy(), quantile))


def attention_pruning_positions(model: Any, batch: "Batch", layer: int, tau: float) -> list[torch.Tensor]:
    """Omega of every sample of ``batch`` at ``layer`` (one forward pass up to ``layer``): per-sample
    absolute key positions, for an oracle detector that flags every input (Fig. 6, the logit lens)."""
    rows = model.attention_rows(batch, layers=[layer], query="last").values[:, 0]  # [B, H, K]
    return omega_positions(omega(rows.float().cpu(), image_mask(batch), tau))


__all__ = ["attention_pruning_positions", "auto_tau", "image_mask", "image_token_peaks", "omega", "omega_positions"]
