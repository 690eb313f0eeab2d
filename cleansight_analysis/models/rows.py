"""Attention rows: post-softmax attention of chosen query positions, sliced inside the forward pass.

Only ``[batch, layer, head, key]`` rows leave the model. Under SDPA attention the rows are computed from
each layer's q and k (``O(B * H * Q * T)``) and no ``[B, H, T, T]`` pattern exists; under eager attention
the pattern lives only inside the attention computation and is never stored.

This is part of the model core (:class:`~cleansight_analysis.models.hooked.HookedLVLM` returns
:class:`AttentionRows`); the analyses built on rows live in :mod:`cleansight_analysis.attention`,
which re-exports these names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..inputs.groups import GENERATED, GROUP_NAMES, TokenGroups
from .attention_hooks import RowsHook
from .hooknames import HookSpec, hook_pattern


class StopForward(Exception):
    """Raised inside a hook to end a forward pass once every requested row is recorded."""


class _RowTap(RowsHook):
    """The recorder's reader of one layer."""

    def __init__(self, recorder: "RowRecorder", layer: int):
        self.recorder, self.layer = recorder, layer

    def queries(self, batch: int, q_len: int, k_len: int) -> torch.Tensor:
        qpos = self.recorder.query_positions
        if qpos is None:  # generation mode: the last query of every call
            return torch.full((batch, 1), q_len - 1, dtype=torch.long)
        return qpos

    def read(self, rows: torch.Tensor) -> None:
        rec = self.recorder
        # rows: [B, H, n, K] -> stored [B, H, K] (generation mode) or [B, Q, H, K]
        kept = rows[:, :, -1] if rec.query_positions is None else rows.transpose(1, 2)
        rec.calls[self.layer].append(kept.detach().to(device=rec.device, dtype=rec.dtype))
        if rec.stop_after and self.layer == max(rec.layers):
            raise StopForward
        return None


class RowRecorder:
    """Row readers (:class:`~.attention_hooks.RowsHook`) on ``blocks.{l}.attn.hook_pattern`` that keep only
    the requested query rows (served from q and k under SDPA, sliced from the pattern under eager).

    Args:
        layers: LM layers to record.
        query_positions: ``[B, Q]`` absolute query positions to keep on a full-sequence pass, or
            ``None`` for generation mode: keep the *last* row of every forward call (the prefill's last
            prompt token, then each decode step's single query).
        dtype, device: storage of the recorded rows (default float32 on CPU).
        stop_after: raise :class:`StopForward` once the deepest requested layer is recorded.
    """

    def __init__(self, layers: Sequence[int], query_positions: torch.Tensor | None, *,
                 dtype: torch.dtype = torch.float32, device: Any = "cpu", stop_after: bool = False):
        self.layers = tuple(layers)
        self.query_positions = query_positions
        self.dtype, self.device = dtype, device
        self.stop_after = stop_after
        self.calls: dict[int, list[torch.Tensor]] = {layer: [] for layer in self.layers}

    def hooks(self) -> list[HookSpec]:
        return [(hook_pattern(layer), _RowTap(self, layer)) for layer in self.layers]

    def nonfinite_layers(self) -> list[int]:
        """Recorded layers whose rows hold NaN / inf (empty when every row is finite)."""
        return [layer for layer in self.layers if any(not bool(torch.isfinite(r).all()) for r in self.calls[layer])]

    def stacked(self) -> torch.Tensor:
        """Full-sequence mode: ``[B, Q, L, H, K]``. Generation mode: ``[B, S, L, H, K_max]`` (zero-padded keys)."""
        if self.query_positions is not None:
            return torch.stack([self.calls[layer][-1] for layer in self.layers], dim=2)
        steps = len(self.calls[self.layers[0]])
        k_max = self.calls[self.layers[0]][-1].shape[-1]
        b, h = self.calls[self.layers[0]][0].shape[:2]
        out = torch.zeros(b, steps, len(self.layers), h, k_max, dtype=self.dtype, device=self.device)
        for li, layer in enumerate(self.layers):
            for s, rows in enumerate(self.calls[layer]):
                out[:, s, li, :, : rows.shape[-1]] = rows
        return out


@dataclass
class AttentionRows:
    """Post-softmax attention rows of selected queries.

    Attributes:
        values: ``[B, L, H, K]`` when each sample has one query (``query="last"`` or one position),
            else ``[B, Q, L, H, K]`` (``query="generated"`` or several positions). ``K`` is the padded
            key length; generated keys follow the prompt's ``T`` keys.
        layers: the LM layers of the ``L`` axis.
        query_positions: ``[B]`` or ``[B, Q]`` absolute position of each query.
        groups: the batch's :class:`TokenGroups`, one per sample.
        valid: ``[B, Q]`` for generated queries: False after the sample emitted EOS.
    """

    values: torch.Tensor
    layers: tuple[int, ...]
    query_positions: torch.Tensor
    groups: list[TokenGroups]
    valid: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def per_query(self) -> bool:
        """True when ``values`` carries a query axis (``[B, Q, L, H, K]``)."""
        return self.values.dim() == 5

    @property
    def group_names(self) -> tuple[str, ...]:
        return GROUP_NAMES + ((GENERATED,) if self._has_generated_keys else ())

    @property
    def _has_generated_keys(self) -> bool:
        return self.values.shape[-1] > self.groups[0].seq_len

    def membership(self) -> torch.Tensor:
        """``[B, K, G]`` one-hot group of every key of every sample (padding: all zero)."""
        k = self.values.shape[-1]
        gen = self._has_generated_keys
        return torch.stack([g.membership(k, generated=gen) for g in self.groups]).to(self.values.dtype)

    def group_mass(self) -> torch.Tensor:
        """Attention mass per key group: ``[B, L, H, G]`` (or ``[B, Q, L, H, G]``).

        ``G`` follows :attr:`group_names` (system, image, prompt, template_tail[, generated]). For a
        real query the masses sum to 1 (padding keys receive no attention).
        """
        m = self.membership().to(self.values.device)
        eq = "bqlhk,bkg->bqlhg" if self.per_query else "blhk,bkg->blhg"
        return torch.einsum(eq, self.values, m)

    def to_frame(self):
        """Tidy ``pandas.DataFrame`` of :meth:`group_mass`: one row per sample[, query], layer, head, group."""
        import pandas as pd

        mass = self.group_mass()
        if not self.per_query:
            mass = mass[:, None]
        b, q, n_layers, h, g = mass.shape
        idx = torch.stack(torch.meshgrid(*(torch.arange(n) for n in (b, q, n_layers, h, g)), indexing="ij"), -1)
        idx = idx.reshape(-1, 5)
        frame = pd.DataFrame({
            "sample": idx[:, 0].numpy(),
            "query": idx[:, 1].numpy(),
            "layer": torch.tensor(self.layers)[idx[:, 2]].numpy(),
            "head": idx[:, 3].numpy(),
            "group": pd.Categorical.from_codes(idx[:, 4].numpy(), categories=list(self.group_names)),
            "mass": mass.reshape(-1).float().numpy(),
        })
        if self.valid is not None:
            frame["valid"] = self.valid[idx[:, 0], idx[:, 1]].numpy()
        return frame if self.per_query else frame.drop(columns="query")
