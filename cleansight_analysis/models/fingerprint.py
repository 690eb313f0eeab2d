"""A fingerprint of a model's weights, to bind a saved calibration to the exact weights it was fitted on.

:func:`weights_fingerprint` hashes (SHA-256) what the HF module's ``state_dict()``
holds, in sorted name order: per tensor the name, dtype, shape and raw bytes (moved to the CPU one
tensor at a time, so peak extra memory is one tensor). Parameters and persistent buffers count;
non-persistent buffers (e.g. rotary caches) do not. Each tensor counts once, under its HF name (the
TransformerLens bridge's ``_original_component`` alias paths are folded away; see :func:`_weights`).

What it does and does not distinguish:

* The same weights on another device give the same fingerprint (bytes are read on the CPU).
* The same weights in another dtype give a *different* fingerprint (the dtype and bytes are hashed):
  a calibration fitted in float32 on the CPU is refused for the bfloat16 CUDA copy of the model,
  whose attention statistics differ by the rounding. Calibrate in the dtype you evaluate in.
* One changed bit in any tensor changes it.

Cost: one pass over every weight byte (plus the device-to-host copy on a GPU). ``tiny-llava/badnet``
(151 tensors, 8.4 MB in float32) takes about 20 ms on one busy CPU core (10 ms in bfloat16: the cost
is per byte, about 0.4-0.5 GB/s here, whatever the dtype), and a cached check about 5 ms. A 7B model
in 16-bit (14 GB) therefore takes tens of seconds, once per process; hence the cache below.

Cache: the digest is stored on the model object (``HookedLVLM`` or the bare module) together with a
cheap signature of its state dict: per tensor the name, storage address, shape, dtype, device and
autograd version counter. The digest is recomputed when the signature changes, i.e. when a tensor is
replaced, moved, cast, or modified in place by a torch operation (``p.add_()``, ``p.copy_()``,
``load_state_dict``, ``torch.nn.init.*``, all bump the version counter, with or without ``no_grad``).
**Assumption:** writes that bypass the version counter are not seen: ``p.data.add_()``, writes through
a NumPy/DLPack view, or weights created under ``torch.inference_mode`` (which have no version counter;
then nothing is cached and every call rehashes). After such an edit call
``weights_fingerprint(model, refresh=True)``.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from ..errors import CalibrationError

#: Algorithm tag, the prefix of every fingerprint string.
ALGORITHM = "sha256"
_CACHE_ATTR = "_cleansight_weights_fingerprint"


def _module(model: Any) -> torch.nn.Module:
    module = getattr(model, "hf_model", model)
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"weights_fingerprint: expected a HookedLVLM or torch.nn.Module, got {type(model).__name__}")
    return module


def _canonical(name: str) -> str:
    """The HF name of a weight: the TransformerLens bridge's ``_original_component`` segments removed."""
    return ".".join(part for part in name.split(".") if part != "_original_component")


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer once (as in ``state_dict()``), under its HF name.

    ``state_dict()`` of a bridge-wrapped model lists each weight under several alias paths (726 entries
    for 151 tensors on the tiny LLaVA); this walk keeps each tensor object once, under the first path
    (the HF one), so the cost is one pass over the real weights and the names do not depend on the bridge.
    Non-persistent buffers (rotary ``inv_freq``, ``position_ids``) are derived state and are skipped.
    """
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for prefix, mod in module.named_modules():
        items = [(n, p) for n, p in mod._parameters.items() if p is not None]
        items += [(n, b) for n, b in mod._buffers.items()
                  if b is not None and n not in mod._non_persistent_buffers_set]
        for n, t in items:
            if id(t) in seen:
                continue
            seen.add(id(t))
            name = _canonical(f"{prefix}.{n}" if prefix else n)
            while name in out:  # two tensors under one HF name (never seen): keep both, deterministically
                name += "'"
            out[name] = t.detach()
    return out


def _signature(state: dict[str, torch.Tensor]) -> tuple | None:
    try:
        return tuple((name, t.data_ptr(), tuple(t.shape), t.dtype, t.device, t._version)
                     for name, t in state.items())
    except RuntimeError:  # inference tensors have no version counter: do not cache
        return None


def _hash(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()  # SHA-NI: about twice as fast as blake2b here
    for name in sorted(state):
        t = state[name]
        if t.is_meta:
            raise CalibrationError(f"weights_fingerprint: tensor {name!r} is on the meta device (offloaded or not "
                             "loaded); load the weights before fitting or checking a calibration")
        cpu = t.to("cpu").contiguous()
        h.update(f"{name}\0{cpu.dtype}\0{tuple(cpu.shape)}\0{cpu.numel() * cpu.element_size()}\0".encode())
        if cpu.numel():
            h.update(cpu.reshape(-1).view(torch.uint8).numpy().data)
        del cpu
    return f"{ALGORITHM}:{h.hexdigest()}"


def weights_fingerprint(model: Any, *, refresh: bool = False) -> str:
    """``"sha256:<64 hex digits>"`` over the names, dtypes, shapes and bytes of every weight.

    Args:
        model: a :class:`~cleansight_analysis.models.hooked.HookedLVLM` (its ``hf_model`` is hashed)
            or a ``torch.nn.Module``.
        refresh: ignore the cached value (see the module docstring for what the cache assumes).
    """
    state = _weights(_module(model))
    sig = _signature(state)
    cached = getattr(model, _CACHE_ATTR, None)
    if not refresh and sig is not None and cached is not None and cached[0] == sig:
        return cached[1]
    digest = _hash(state)
    if sig is not None:
        try:
            setattr(model, _CACHE_ATTR, (sig, digest))
        except AttributeError:  # an object that refuses new attributes: no cache
            pass
    return digest


def short(fingerprint: Any, n: int = 12) -> str:
    """The first ``n`` hex digits of a fingerprint (for messages)."""
    text = str(fingerprint)
    return text.split(":", 1)[-1][:n]
