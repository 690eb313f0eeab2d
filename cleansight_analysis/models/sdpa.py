"""SDPA attention in every LM layer; eager attention only where a hook needs the full pattern or the scores.

TransformerLens' attention bridge recomputes Llama / Mistral attention eagerly (``[B, H, T, T]`` scores and
pattern) so that ``hook_attn_scores`` / ``hook_pattern`` can read and edit them. Most of this package only
needs a few query rows and key masks, so :func:`install_attention` lets every LM attention bridge choose,
per call, between two computations it already has:

- **eager** (the bridge's own ``forward``): when the model's mode is ``"eager"``, or when any hook point
  that only the eager computation fires (``hook_attn_scores``, ``hook_pattern``, ``hook_rot_q``, ...) has a
  hook in this layer (a perturbation that edits the pattern, ``run_with_cache``, a probe);
- **SDPA** (the bridge's HF-delegating ``forward``, i.e. HF's own attention module with the bridge's
  ``hook_in`` / ``hook_q`` / ``hook_k`` / ``hook_v`` / ``hook_z`` / ``hook_out`` still firing): otherwise. HF
  calls the attention function registered here under :data:`IMPLEMENTATION` (transformers'
  ``AttentionInterface``), which serves the layer's declared hooks (:mod:`.attention_hooks`) from q and k
  after RoPE, then runs HF's ``sdpa_attention_forward`` with the key masks folded into its boolean mask.

No modeling code is copied: the only intervention besides the registered function is the per-instance
``forward`` of each LM attention bridge, which picks one of the bridge's two existing forwards. The vision
tower's attention (HF's own modules behind the bridge) uses the same registered function: SDPA, or HF's
eager attention while its ``hook_pattern`` / ``hook_attn_scores`` are hooked.

:meth:`AttentionDispatch.route` splits a hook list: :class:`~.attention_hooks.KeyMaskHook` and
:class:`~.attention_hooks.RowsHook` hooks of layers that run SDPA go to that layer's :class:`Site`; all
other hooks go to the bridge. A layer with any other hook on an eager-only point keeps every hook on the
bridge, in the caller's order, and runs eager.
"""

from __future__ import annotations

import re
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch

from ..errors import InputError
from .attention_hooks import KeyMaskHook, RowsHook, causal_allowed, fit_width, rows_from_qk
from .hooknames import HookSpec

#: Name of the attention function (and mask function) registered with transformers.
IMPLEMENTATION = "cleansight_sdpa"
#: Values of ``HookedLVLM.attention`` / ``load_lvlm(attention=...)``.
ATTENTION_MODES: tuple[str, ...] = ("sdpa", "eager")
#: Hook points of an attention bridge that fire on both paths (every other one needs the eager path).
_BOTH_PATHS = ("hook_in", "hook_out")
_SITE_ATTR = "_cleansight_site"
_DISPATCH_ATTR = "_cleansight_attention"
_LM_POINT = re.compile(r"^blocks\.(\d+)\.attn\.(hook_\w+)$")
_SDPA: Callable | None = None  # transformers' sdpa_attention_forward, set by register_attention()


def check_mode(mode: Any) -> str:
    if not isinstance(mode, str) or mode not in ATTENTION_MODES:
        raise InputError(f"attention must be one of {ATTENTION_MODES}, got {mode!r}")
    return mode


def _is_hooked(point: torch.nn.Module) -> bool:
    return bool(point._forward_hooks or point._forward_pre_hooks or point._backward_hooks
                or point._backward_pre_hooks)


def _as_torch_hook(fn: Callable) -> Callable:
    """A TransformerLens-style ``fn(tensor, hook)`` as a torch forward hook on a ``HookPoint``."""

    def hook(module: Any, inputs: Any, output: torch.Tensor) -> Any:
        conv = getattr(module, "hook_conversion", None)
        x = conv.convert(output) if conv is not None else output
        out = fn(x, hook=module)
        return conv.revert(out) if out is not None and conv is not None else out

    return hook


def _full_allowed(mask: torch.Tensor | None, shape: tuple[int, int, int, int]) -> torch.Tensor:
    """HF's attention mask as ``[B, 1, Q, K]`` bool (True = may attend); ``None`` means plainly causal."""
    b, _, q_len, k_len = shape
    if mask is None:
        return torch.ones(q_len, k_len, dtype=torch.bool).tril(k_len - q_len)[None, None].expand(shape)
    if mask.dtype != torch.bool:  # an additive float mask: 0 keeps, the dtype's minimum hides
        mask = mask > torch.finfo(mask.dtype).min / 2
    return mask[..., -q_len:, -k_len:].expand(shape)


def _rows_allowed(mask: torch.Tensor | None, idx: torch.Tensor, q_len: int, k_len: int) -> torch.Tensor:
    """``[B, n, K]`` bool: what queries ``idx`` may see under ``mask`` (HF's, or the edited one)."""
    if mask is None:
        return causal_allowed(idx, q_len, k_len)
    full = _full_allowed(mask.to(idx.device), (idx.shape[0], 1, q_len, k_len))
    return full[:, 0][torch.arange(idx.shape[0], device=idx.device)[:, None], idx]


class Site:
    """One attention bridge: its eager-only hook points and the declared hooks it serves under SDPA.

    Args:
        attn: the attention bridge.
        layer: its LM layer, or ``None`` for an attention of the vision tower (no declared hooks; HF's eager
            attention while its pattern or scores are hooked).
        points: ``{name: HookPoint}`` of the bridge's hook points that only the eager computation fires.
    """

    def __init__(self, attn: torch.nn.Module, layer: int | None, points: dict[str, torch.nn.Module]):
        self.attn, self.layer, self.points = attn, layer, points
        self.mode = "sdpa"
        self.masks: list[KeyMaskHook] = []
        self.readers: list[RowsHook] = []
        if layer is not None:
            self._eager = type(attn).forward.__get__(attn)
            self._native = _native_forward().__get__(attn)

    def hooked(self) -> bool:
        """True when a hook sits on a point that only the eager computation fires."""
        return any(_is_hooked(p) for p in self.points.values())

    # -- the LM attention bridge's forward ------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.mode == "eager" or self.hooked():
            with self._eager_form():
                return self._eager(*args, **kwargs)
        # HF's module takes the KV cache as ``cache``; the shim (compat.py) also passes ``past_key_values``
        if kwargs.get("cache") is not None:
            kwargs.pop("past_key_values", None)
        elif kwargs.get("past_key_values") is not None:
            kwargs["cache"] = kwargs.pop("past_key_values")
        return self._native(*args, **kwargs)

    @contextmanager
    def _eager_form(self) -> Iterator[None]:
        """Serve this site's declared hooks as ordinary hooks for one eager call (they came from an outer
        hooks context, so they run before the hooks that forced eager)."""
        handles = []
        try:
            for fn in reversed(self.readers):
                handles.append(self.attn.hook_pattern.register_forward_hook(_as_torch_hook(fn), prepend=True))
            for fn in reversed(self.masks):
                handles.append(self.attn.hook_attn_scores.register_forward_hook(_as_torch_hook(fn), prepend=True))
            yield
        finally:
            for h in handles:
                h.remove()

    # -- inside the registered attention function -------------------------------------------------
    def mask_and_read(self, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None,
                      scaling: float) -> torch.Tensor | None:
        """Apply the key masks, serve the row readers, return the mask for SDPA (HF's when unchanged).

        ``query`` ``[B, H, Q, d]``, ``key`` ``[B, H_kv, K, d]`` after RoPE and the cache; ``mask``: HF's
        (``[B, 1, Q, K]`` bool, or ``None`` for plainly causal). The full ``[B, 1, Q, K]`` mask is built only
        once a key is hidden; rows cost ``O(B * H * n * K)``.
        """
        b, q_len, k_len = query.shape[0], query.shape[2], key.shape[2]
        shape = (b, 1, q_len, k_len)
        allowed: torch.Tensor | None = None
        for hook in self.masks:
            hide = hook.hidden(shape, query.device)
            if hide is not None:
                base = allowed if allowed is not None else _full_allowed(mask, shape).to(query.device)
                allowed = base & ~hide[:, None]
        for reader in self.readers:
            idx = reader.queries(b, q_len, k_len)
            if idx is None:
                continue
            idx = idx.to(query.device)
            rows = rows_from_qk(query, key, idx, _rows_allowed(allowed if allowed is not None else mask, idx,
                                                                q_len, k_len), scaling)
            drop = reader.read(rows)
            if drop is not None and bool(drop.any()):
                base = allowed if allowed is not None else _full_allowed(mask, shape).to(query.device)
                allowed = base & ~fit_width(drop, k_len, query.device)[:, None, None, :]
        return mask if allowed is None else allowed


def _native_forward() -> Callable:
    # lazy on purpose: transformer_lens is imported only when a model is loaded
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    return AttentionBridge.forward


def _module_eager(module: Any) -> Callable:
    """HF's eager attention function of ``module``'s own modeling file."""
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        # lazy on purpose: transformers is imported only when a model is loaded
        from transformers.models.llama.modeling_llama import eager_attention_forward as fn
    return fn


def attention_forward(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The attention function registered as :data:`IMPLEMENTATION` (transformers' calling convention)."""
    site = getattr(module, _SITE_ATTR, None)
    if site is not None:
        if site.layer is None:
            if site.hooked():
                return _module_eager(module)(module, query, key, value, attention_mask, dropout=dropout,
                                             scaling=scaling, **kwargs)
        elif site.masks or site.readers:
            scale = scaling if scaling is not None else query.shape[-1] ** -0.5
            attention_mask = site.mask_and_read(query, key, attention_mask, scale)
    assert _SDPA is not None
    return _SDPA(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def register_attention() -> None:
    """Register :func:`attention_forward` (and HF's SDPA mask) under :data:`IMPLEMENTATION` (idempotent)."""
    global _SDPA
    if _SDPA is not None:
        return
    # lazy on purpose: transformers is imported only when a model is loaded
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
    _SDPA = sdpa_attention_forward


class AttentionDispatch:
    """The sites of one bridged model, its attention mode, and the routing of hook lists."""

    def __init__(self, hf_model: Any, sites: dict[int, Site], others: list[Site], mode: str):
        self.hf_model, self.sites, self.others = hf_model, sites, others
        self._mode = "eager"
        self.mode = mode

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        self._mode = check_mode(mode)
        # the top config's setter passes the value on to the text and vision configs
        self.hf_model.config._attn_implementation = IMPLEMENTATION if mode == "sdpa" else "eager"
        for site in [*self.sites.values(), *self.others]:
            site.mode = mode

    def _lm_point(self, name: Any) -> tuple[int, str] | None:
        m = _LM_POINT.match(name) if isinstance(name, str) else None
        if m is None or int(m.group(1)) not in self.sites:
            return None
        return int(m.group(1)), m.group(2)

    def _declared_layer(self, name: Any, fn: Any) -> int | None:
        """The LM layer of a declared hook (a KeyMaskHook on scores or a RowsHook on the pattern), else None."""
        point = self._lm_point(name)
        if point is None:
            return None
        if (point[1] == "hook_attn_scores" and isinstance(fn, KeyMaskHook)) or (
                point[1] == "hook_pattern" and isinstance(fn, RowsHook)):
            return point[0]
        return None

    def _eager_layers(self, name: Any, fn: Any) -> set[int]:
        """LM layers where this hook needs the eager computation."""
        if isinstance(name, str):
            point = self._lm_point(name)
            if point is None or point[1] not in self.sites[point[0]].points:
                return set()
            return set() if self._declared_layer(name, fn) is not None else {point[0]}
        if callable(name):  # a name filter: every layer whose eager-only points it matches
            return {layer for layer, site in self.sites.items()
                    if any(name(f"blocks.{layer}.attn.{p}") for p in site.points)}
        return set()

    def route(self, hooks: Sequence[HookSpec]) -> tuple[list[HookSpec], list[tuple[int, Any]]]:
        """``(bridge hooks, [(layer, declared hook)])``: what the bridge gets and what the SDPA sites serve."""
        hooks = list(hooks)
        if self._mode == "eager":
            return hooks, []
        eager = {layer for layer, site in self.sites.items() if site.hooked()}
        for name, fn in hooks:
            eager |= self._eager_layers(name, fn)
        bridge: list[HookSpec] = []
        declared: list[tuple[int, Any]] = []
        for name, fn in hooks:
            layer = self._declared_layer(name, fn)
            if layer is not None and layer not in eager:
                declared.append((layer, fn))
            else:
                bridge.append((name, fn))
        return bridge, declared

    @contextmanager
    def serving(self, declared: Sequence[tuple[int, Any]]) -> Iterator[None]:
        """Hand declared hooks to their sites for the duration of the context."""
        added: list[tuple[list, Any]] = []
        try:
            for layer, fn in declared:
                site = self.sites[layer]
                target = site.masks if isinstance(fn, KeyMaskHook) else site.readers
                target.append(fn)
                added.append((target, fn))
            yield
        finally:
            for target, fn in reversed(added):
                for i in range(len(target) - 1, -1, -1):
                    if target[i] is fn:
                        del target[i]
                        break


def install_attention(bridge: Any, mode: str = "sdpa") -> AttentionDispatch:
    """Give every attention bridge of ``bridge`` a :class:`Site` (idempotent) and set the mode."""
    # lazy on purpose: transformer_lens is imported only when a model is loaded
    from transformer_lens.hook_points import HookPoint
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    check_mode(mode)
    hf_model = bridge.original_model
    existing = vars(hf_model).get(_DISPATCH_ATTR)
    if existing is not None:
        existing.mode = mode
        return existing
    register_attention()
    lm = {id(block.attn): layer for layer, block in enumerate(bridge.blocks)}
    sites: dict[int, Site] = {}
    others: list[Site] = []
    for module in bridge.modules():
        original = module._modules.get("_original_component") if isinstance(module, AttentionBridge) else None
        if original is None:
            continue
        points = {name: child for name, child in module.named_children()
                  if isinstance(child, HookPoint) and name not in _BOTH_PATHS}
        site = Site(module, lm.get(id(module)), points)
        object.__setattr__(original, _SITE_ATTR, site)
        if site.layer is None:
            others.append(site)
        else:
            sites[site.layer] = site
            # the bridge's __setattr__ would forward ``forward`` to the wrapped HF module
            object.__setattr__(module, "forward", site.forward)
    dispatch = AttentionDispatch(hf_model, sites, others, mode)
    object.__setattr__(hf_model, _DISPATCH_ATTR, dispatch)
    return dispatch


__all__ = ["ATTENTION_MODES", "AttentionDispatch", "IMPLEMENTATION", "Site", "attention_forward",
           "check_mode", "install_attention", "register_attention"]
