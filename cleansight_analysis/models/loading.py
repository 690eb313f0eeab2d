"""``load_lvlm``: one entry point for registered, on-disk and in-memory models. Never downloads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .._runtime import configure_environment, disable_torchvision_autoinstall, quiet_transformers
from ..errors import ModelSourceError
from .compat import install_kv_cache_shim
from .families import architecture_of, family_for
from .hooked import HookedLVLM
from .registry import lookup, registered_models

#: File names accepted as weights; pickled ``*.bin`` / ``*.pt`` files are refused.
SAFE_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _resolve_device(device: Any) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ModelSourceError(f"device {device!r} is not a torch device ({exc})") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelSourceError(f"device {device!r} requested but CUDA is not available on this machine")
    return dev


def _resolve_dtype(dtype: Any, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        named = getattr(torch, dtype.replace("torch.", ""), None)
        if not isinstance(named, torch.dtype):
            raise ModelSourceError(f"dtype {dtype!r} is not a torch dtype (e.g. 'float32', 'bfloat16')")
        dtype = named
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ModelSourceError(f"dtype must be a floating torch dtype, got {dtype!r}")
    return dtype


DELTA_FILE = "delta.safetensors"
ADAPTER_DIR = "adapter"
CARD_FILE = "card.json"


def read_card(folder: Path) -> dict[str, Any] | None:
    """The folder's ``card.json`` (model card of the embedded models and backdoor outputs), if any."""
    path = Path(folder) / CARD_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelSourceError(f"{str(path)!r} is not valid JSON ({exc})") from exc


def is_delta_folder(folder: Path) -> bool:
    """A delta folder stores only what a fine-tune changed, over a ``base`` named in its card."""
    card = read_card(folder)
    return bool(card and card.get("base")) and not (folder / "config.json").is_file()


def check_model_folder(folder: Path) -> None:
    """Raise a clear error unless ``folder`` holds a config and safetensors weights (or is a delta folder)."""
    if is_delta_folder(folder):
        if not (folder / DELTA_FILE).is_file() and not (folder / ADAPTER_DIR / "adapter_model.safetensors").is_file():
            raise ModelSourceError(f"{str(folder)!r} is a delta folder without {DELTA_FILE} or an adapter")
        return
    if not (folder / "config.json").is_file():
        raise ModelSourceError(f"{str(folder)!r} has no config.json; it is not a saved Hugging Face model")
    if not any((folder / name).is_file() for name in SAFE_WEIGHT_FILES):
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickled:
            raise ModelSourceError(
                f"{str(folder)!r} holds only pickled weights ({', '.join(pickled)}); cleansight-analysis loads "
                "safetensors only (pickle can run code). Convert once in a trusted environment with "
                "`model.save_pretrained(folder, safe_serialization=True)`."
            )
        raise ModelSourceError(f"{str(folder)!r} has no weights (expected one of {', '.join(SAFE_WEIGHT_FILES)})")


def resolve_base(folder: Path, base: str) -> Path | str:
    """A delta folder's base: a path relative to the folder, an absolute path, or a registry name."""
    candidate = (folder / base).resolve()
    if candidate.is_dir():
        return candidate
    if Path(base).is_dir():
        return Path(base)
    if lookup(base) is not None:
        return base
    raise ModelSourceError(f"{str(folder)!r}: base model {base!r} is neither a folder nor a registered model")


def apply_delta(model: Any, folder: Path) -> Any:
    """Load ``delta.safetensors`` (replaced tensors) and merge ``adapter/`` (a peft LoRA) into ``model``."""
    from safetensors.torch import load_file

    delta_path = folder / DELTA_FILE
    if delta_path.is_file():
        delta = load_file(str(delta_path))
        own = model.state_dict()
        unknown = sorted(k for k in delta if k not in own)
        if unknown:
            raise ModelSourceError(f"{str(delta_path)!r} has tensors the base model lacks: {unknown[:5]}")
        with torch.no_grad():
            for k, v in delta.items():
                if own[k].shape != v.shape:
                    raise ModelSourceError(f"{str(delta_path)!r}: {k} has shape {tuple(v.shape)}, base {tuple(own[k].shape)}")
                own[k].copy_(v.to(own[k].dtype))
    adapter = folder / ADAPTER_DIR
    if adapter.is_dir():
        from peft import PeftModel

        if not (adapter / "adapter_model.safetensors").is_file():
            raise ModelSourceError(f"{str(adapter)!r} has no adapter_model.safetensors (pickled adapters are refused)")
        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False).merge_and_unload()
    return model


def load_hf(source: Any, *, processor: Any = None, device: Any = None, dtype: Any = None,
            name: str | None = None) -> tuple[Any, Any, Any, str]:
    """Load the raw HF model (not bridged), its processor, its family and a label. See :func:`load_lvlm`."""
    configure_environment()
    quiet_transformers()
    dev = _resolve_device(device)
    if isinstance(source, torch.nn.Module):
        if processor is None:
            raise ModelSourceError("an in-memory model needs its processor: load_lvlm(model, processor=processor)")
        model, label = source, name or "<in-memory>"
        if dtype is not None:
            model = model.to(dtype=_resolve_dtype(dtype, dev))
    elif isinstance(source, (str, Path)):
        entry = lookup(str(source)) if isinstance(source, str) else None
        folder = Path(source).expanduser()
        if entry is not None:
            model, proc = entry.builder() if entry.builder is not None else _load_folder(
                entry.path, dev, _resolve_dtype(dtype, dev))
            if dtype is not None or entry.builder is None:
                model = model.to(dtype=_resolve_dtype(dtype, dev))
        elif folder.is_dir():
            model, proc = _load_folder(folder, dev, _resolve_dtype(dtype, dev))
        else:
            known = ", ".join(m.name for m in registered_models())
            raise ModelSourceError(
                f"model source {str(source)!r} is neither a registered model nor a local folder. Registered: "
                f"{known}. Downloads are disabled: download a checkpoint yourself and pass its folder."
            )
        processor = processor or proc
        label = name or str(source)
    else:
        raise ModelSourceError(
            f"model source must be a registered name, a folder path or an HF model; got {type(source).__name__}"
        )
    family = family_for(architecture_of(model))
    if getattr(model.config, "architectures", None) is None:
        model.config.architectures = [family.architecture]
    return model.to(dev).eval(), processor, family, label


def _load_folder(folder: Path, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoProcessor

    check_model_folder(folder)
    if is_delta_folder(folder):
        base = resolve_base(folder, read_card(folder)["base"])
        model, processor, _, _ = load_hf(base, device=device, dtype=dtype)
        return apply_delta(model, folder), processor
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    family = family_for(architecture_of(config))
    model = family.hf_class().from_pretrained(folder, dtype=dtype, attn_implementation="eager",
                                              use_safetensors=True, local_files_only=True)
    try:
        processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelSourceError(f"{str(folder)!r}: the processor (tokenizer + image processor) does not load: {exc}") from exc
    return model, processor


def load_lvlm(source: Any, *, processor: Any = None, device: Any = None, dtype: Any = None,
              name: str | None = None) -> HookedLVLM:
    """Load a LLaVA-style model as a :class:`HookedLVLM`, without touching the network.

    Args:
        source: (a) a registered name (``cleansight_analysis.models.registered_models()``), e.g.
            ``"tiny-random-llava"``; (b) a local folder with a saved HF model (safetensors) and
            processor, e.g. a downloaded ``llava-1.5-7b-hf``; or (c) an HF model object, with
            ``processor=``. Supported architectures: ``SUPPORTED_ARCHITECTURES``.
        processor: the processor of an in-memory model (required for (c)).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; default CUDA when available, else CPU.
        dtype: default float32 on CPU, bfloat16 on CUDA. (An in-memory model keeps its dtype unless
            one is given.)
        name: label recorded on the model (defaults to the source).

    The HF model is wrapped in place (its attention modules become TransformerLens bridges that
    compute exactly what HF eager attention computes); copy it first if you need it untouched.
    """
    disable_torchvision_autoinstall()
    model, processor, family, label = load_hf(source, processor=processor, device=device, dtype=dtype, name=name)
    from transformer_lens.model_bridge.sources import build_bridge_from_module

    # No tokenizer for the bridge: TL 4.3 re-loads it by name_or_path (a hub call for in-memory
    # tokenizers); all tokenisation here goes through the HF processor.
    bridge = build_bridge_from_module(model, family.architecture, hf_config=model.config, model_name=label)
    bridge.eval()
    install_kv_cache_shim(bridge)
    return HookedLVLM(bridge, processor, family, name=label)
