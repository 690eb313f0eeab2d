"""Small, tested shims between TransformerLens 4.3 and transformers 5.x.

``transformers`` 5.x passes the KV cache to attention modules as ``cache=``; TransformerLens 4.3's
attention bridge only looks for ``past_key_values=`` / ``layer_past=``. Without a shim every decode
step attends to itself alone and generation silently ignores the prompt. We forward the keyword
with a pre-forward hook on each attention bridge (no forked modeling code).
"""

from __future__ import annotations

from typing import Any

import torch


def _forward_cache_kwarg(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    if kwargs.get("past_key_values") is None and kwargs.get("cache") is not None:
        kwargs["past_key_values"] = kwargs["cache"]
    return args, kwargs


def install_kv_cache_shim(bridge: Any) -> int:
    """Hook every language-model attention bridge of ``bridge``; returns how many were hooked."""
    n = 0
    for block in bridge.blocks:
        attn = getattr(block, "attn", None)
        if attn is None or getattr(attn, "_cleansight_cache_shim", False):
            continue
        attn.register_forward_pre_hook(_forward_cache_kwarg, with_kwargs=True)
        attn._cleansight_cache_shim = True
        n += 1
    return n
