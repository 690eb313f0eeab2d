"""Process-wide safety settings, applied once when the package is imported.

- ``HF_HUB_OFFLINE=1`` (unless the caller set it): nothing in this package ever downloads.
- One torch thread on small machines: on 2-core machines two OpenMP threads stall tiny forward
  passes by two orders of magnitude. ``CLEANSIGHT_THREADS`` or ``OMP_NUM_THREADS`` override.
- TransformerLens 4.3 pip-installs torchvision by itself when a processor fails to load; torchvision
  breaks transformers on CPU-only torch builds, so that code path is switched off.
"""

from __future__ import annotations

import os
import sys

_CONFIGURED = False


def configure_environment() -> None:
    """Set offline mode and the thread count before torch / transformers are used."""
    global _CONFIGURED
    if _CONFIGURED:
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    threads = os.environ.get("CLEANSIGHT_THREADS") or os.environ.get("OMP_NUM_THREADS")
    if threads is None and (os.cpu_count() or 1) <= 4:
        threads = "1"
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch  # lazy on purpose: the environment above must be set before torch is first imported

    if threads is not None:
        try:
            torch.set_num_threads(max(1, int(threads)))
        except ValueError:
            pass
    _CONFIGURED = True


def quiet_transformers() -> None:
    """Hide transformers' per-load "Loading weights" / "Writing model shards" bars (tiny models load in ms).

    Set ``CLEANSIGHT_HF_PROGRESS=1`` to keep them (useful for 7B checkpoints).
    """
    if os.environ.get("CLEANSIGHT_HF_PROGRESS") == "1":
        return
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def disable_torchvision_autoinstall() -> None:
    """Stop TransformerLens from running ``pip install torchvision`` behind the user's back."""
    try:
        from transformer_lens.model_bridge.sources.transformers import check_model_support
    except ImportError:  # pragma: no cover - other TL layouts
        return
    module = sys.modules.get(check_model_support.__module__)
    if module is not None and hasattr(module, "_ensure_torchvision"):
        module._ensure_torchvision = lambda *a, **k: False
