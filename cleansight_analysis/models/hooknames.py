"""Names of the TransformerBridge hook points this package uses, spelled in one place.

The bridge replaces every language-model attention module with one that recomputes attention eagerly
and exposes hook points; each decoder block, the final norm and the unembedding have ``hook_in`` /
``hook_out`` points. Use these helpers instead of writing ``f"blocks.{l}.attn.hook_pattern"`` by hand
(a name filter such as ``n.endswith("hook_pattern")`` would also match the vision tower's hooks).
"""

from __future__ import annotations

from typing import Any, Callable

#: ``(hook name or filter, fn)``: one TransformerLens forward hook.
HookSpec = tuple[Any, Callable]

#: Input embeddings as the first decoder block sees them (token embeddings merged with image features).
EMBED_IN = "blocks.0.hook_in"
#: Output of the final norm and of the unembedding (``lm_head``: the logits).
FINAL_NORM_OUT = "ln_final.hook_out"
UNEMBED_OUT = "unembed.hook_out"


def hook_attn(layer: int, hook: str = "pattern") -> str:
    """An attention hook of LM layer ``layer``: ``hook_attn(3, "z") == "blocks.3.attn.hook_z"``."""
    return f"blocks.{int(layer)}.attn.hook_{hook}"


def hook_pattern(layer: int) -> str:
    """Post-softmax attention ``[B, H, Q, K]`` of LM layer ``layer``."""
    return hook_attn(layer, "pattern")


def hook_attn_scores(layer: int) -> str:
    """Pre-softmax attention scores ``[B, H, Q, K]`` of LM layer ``layer`` (key masks act here)."""
    return hook_attn(layer, "attn_scores")


def hook_z(layer: int) -> str:
    """Per-head attention output ``[B, T, H, d_head]`` of LM layer ``layer`` (the input of ``o_proj``)."""
    return hook_attn(layer, "z")


def hook_resid_post(layer: int) -> str:
    """Residual stream after LM layer ``layer`` (``[B, T, d_model]``; the decoder block's output)."""
    return f"blocks.{int(layer)}.hook_resid_post"


def hook_block_out(layer: int) -> str:
    """Output of decoder block ``layer`` (equals :func:`hook_resid_post` on the bridge)."""
    return f"blocks.{int(layer)}.hook_out"


__all__ = ["EMBED_IN", "FINAL_NORM_OUT", "HookSpec", "UNEMBED_OUT", "hook_attn",
           "hook_attn_scores", "hook_block_out", "hook_pattern", "hook_resid_post", "hook_z"]
