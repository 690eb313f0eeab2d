"""``load_lvlm``: one entry point for registered, on-disk and in-memory models. Never downloads."""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from .._runtime import configure_environment, disable_torchvision_autoinstall, quiet_transformers
from ..errors import ModelSourceError
from .compat import install_kv_cache_shim
from .families import architecture_of, family_for
from .hooked import HookedLVLM
from .registry import (  # noqa: F401 - card helpers re-exported here
    CARD_FILE, MAX_BASE_DEPTH, base_chain, is_delta_folder, lookup, read_card, registered_models, resolve_base,
)
from .sdpa import check_mode

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
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
INDEX_FILE = "model.safetensors.index.json"
#: Config files whose ``auto_map`` would make transformers import code shipped in the folder.
_CODE_MAP_FILES = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json",
                   "video_preprocessor_config.json", "feature_extractor_config.json", "image_processor_config.json")
#: safetensors refuses headers above 100 MB; so do we, before reading one.
_MAX_HEADER_BYTES = 100_000_000


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ModelSourceError(f"{str(path)!r} is not valid JSON ({type(exc).__name__}: {exc})") from None


def _find_key(value: Any, key: str) -> bool:
    if isinstance(value, dict):
        return key in value or any(_find_key(v, key) for v in value.values())
    if isinstance(value, list):
        return any(_find_key(v, key) for v in value)
    return False


def check_no_remote_code(folder: Path) -> None:
    """Refuse a folder whose configs would make transformers run code shipped with it.

    Checked before any transformers call (which would otherwise ask "run the custom code? [y/N]"
    on stdin): no ``auto_map`` in any config file, and every ``model_type`` in ``config.json``
    (including nested ``text_config`` / ``vision_config``) is one transformers implements itself.
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    for name in _CODE_MAP_FILES:
        path = folder / name
        if path.is_file() and _find_key(_read_json(path), "auto_map"):
            raise ModelSourceError(
                f"{str(folder)!r}: {name} has an 'auto_map' entry (code shipped with the model); cleansight-analysis "
                "never runs a model folder's own code (trust_remote_code=False)"
            )
    config = _read_json(folder / "config.json")
    if not isinstance(config, dict):
        raise ModelSourceError(f"{str(folder / 'config.json')!r} must hold a JSON object, got {type(config).__name__}")
    if not isinstance(config.get("model_type"), str):
        raise ModelSourceError(f"{str(folder)!r}: config.json has no 'model_type' (expected e.g. 'llava')")

    def walk(cfg: dict[str, Any], where: str) -> None:
        mt = cfg.get("model_type")
        if mt is not None and (not isinstance(mt, str) or mt not in CONFIG_MAPPING_NAMES):
            raise ModelSourceError(
                f"{str(folder)!r}: config.json {where}model_type {mt!r} is not a model type transformers implements "
                "(custom code is never run; trust_remote_code=False)"
            )
        for key, sub in cfg.items():
            if isinstance(sub, dict) and "model_type" in sub:
                walk(sub, f"{where}{key}.")

    walk(config, "")


def check_safetensors(path: Path) -> None:
    """Check a safetensors file's header without loading it; :class:`ModelSourceError` naming the file if bad.

    The 8-byte header length, the JSON header and the file size against the tensors' data offsets
    (a truncated copy fails here), then safetensors' own header validation.
    """
    label = repr(str(path))
    if not path.is_file():
        raise ModelSourceError(f"{label} does not exist")
    size = path.stat().st_size
    if size < 8:
        raise ModelSourceError(
            f"{label} is not a valid safetensors file: {size} bytes, shorter than its 8-byte header length")
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        if n > min(size - 8, _MAX_HEADER_BYTES):
            raise ModelSourceError(
                f"{label} is not a valid safetensors file (truncated or bad header): the header length field says "
                f"{n} bytes but {size - 8} bytes follow it"
            )
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ModelSourceError(f"{label} is not a valid safetensors file: its header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ModelSourceError(f"{label} is not a valid safetensors file: its header is not a JSON object")
    data_end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise ModelSourceError(
                f"{label} is not a valid safetensors file: tensor {key!r} has bad data_offsets {offsets!r}")
        data_end = max(data_end, offsets[1])
    expected = 8 + n + data_end
    if expected != size:
        raise ModelSourceError(
            f"{label} is not a valid safetensors file ({'truncated' if size < expected else 'trailing bytes'}): "
            f"its header describes {expected} bytes, the file has {size}"
        )
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except Exception as exc:  # SafetensorError is not importable from a stable place
        raise ModelSourceError(f"{label} is not a valid safetensors file: {exc}") from None


def _safe_relative(name: Any) -> bool:
    if not isinstance(name, str) or not name or "\\" in name:
        return False
    parts = PurePosixPath(name).parts
    return not PurePosixPath(name).is_absolute() and ".." not in parts and ":" not in parts[0]


def check_weight_files(folder: Path) -> None:
    """Validate every weight file transformers will open from ``folder``, without opening any pickle.

    ``model.safetensors`` and every shard named by ``model.safetensors.index.json`` (which must end
    in ``.safetensors``, stay inside the folder and exist) get :func:`check_safetensors`.
    """
    if (folder / "model.safetensors").is_file():
        check_safetensors(folder / "model.safetensors")
    index_path = folder / INDEX_FILE
    if not index_path.is_file():
        return
    index = _read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelSourceError(f"{str(index_path)!r} has no 'weight_map' object naming the shards")
    checked: set[str] = set()
    for shard in weight_map.values():
        if isinstance(shard, str) and shard in checked:
            continue
        if not isinstance(shard, str) or not shard.endswith(".safetensors"):
            raise ModelSourceError(
                f"{str(index_path)!r} names shard {shard!r}, which is not a .safetensors file; cleansight-analysis "
                "loads safetensors only (pickled weights can run code) and opens nothing else"
            )
        if not _safe_relative(shard):
            raise ModelSourceError(f"{str(index_path)!r} names shard {shard!r} outside the model folder")
        if not (folder / shard).is_file():
            raise ModelSourceError(f"{str(index_path)!r} names shard {shard!r}, which is missing from {str(folder)!r}")
        check_safetensors(folder / shard)
        checked.add(shard)


def check_adapter_folder(adapter: Path) -> None:
    """A peft adapter folder: ``adapter_config.json`` (LoRA-style, no module imports) and safetensors weights."""
    weights = adapter / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickled = sorted(p.name for p in adapter.iterdir() if p.suffix in _PICKLE_SUFFIXES) if adapter.is_dir() else []
        extra = f" (found pickled {', '.join(pickled)}, refused: pickle can run code)" if pickled else ""
        raise ModelSourceError(f"{str(adapter)!r} has no {ADAPTER_WEIGHTS}{extra}; adapters load from safetensors only")
    config_path = adapter / ADAPTER_CONFIG
    if not config_path.is_file():
        raise ModelSourceError(f"{str(adapter)!r} has no {ADAPTER_CONFIG}")
    config = _read_json(config_path)
    if not isinstance(config, dict):
        raise ModelSourceError(f"{str(config_path)!r} must hold a JSON object")
    if config.get("megatron_config"):
        raise ModelSourceError(
            f"{str(config_path)!r} sets 'megatron_config' (peft would import the module it names); refused")
    check_safetensors(weights)


def check_model_folder(folder: Path) -> None:
    """Raise a clear error unless ``folder`` holds a config and safetensors weights (or is a delta folder).

    Everything transformers / peft would open is checked here first: no code shipped with the folder
    is ever run, no pickled file is ever opened, and truncated safetensors are named.
    """
    if is_delta_folder(folder):
        base_chain(folder)  # loops and over-long chains fail here, not as a RecursionError
        has_delta, has_adapter = (folder / DELTA_FILE).is_file(), (folder / ADAPTER_DIR).is_dir()
        if not has_delta and not has_adapter:
            raise ModelSourceError(f"{str(folder)!r} is a delta folder without {DELTA_FILE} or an adapter")
        if has_delta:
            check_safetensors(folder / DELTA_FILE)
        if has_adapter:
            check_adapter_folder(folder / ADAPTER_DIR)
        return
    if not (folder / "config.json").is_file():
        raise ModelSourceError(f"{str(folder)!r} has no config.json; it is not a saved Hugging Face model")
    check_no_remote_code(folder)
    if not any((folder / name).is_file() for name in SAFE_WEIGHT_FILES):
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickled:
            raise ModelSourceError(
                f"{str(folder)!r} holds only pickled weights ({', '.join(pickled)}); cleansight-analysis loads "
                "safetensors only (pickle can run code). Convert once in a trusted environment with "
                "`model.save_pretrained(folder, safe_serialization=True)`."
            )
        raise ModelSourceError(f"{str(folder)!r} has no weights (expected one of {', '.join(SAFE_WEIGHT_FILES)})")
    check_weight_files(folder)


def apply_delta(model: Any, folder: Path) -> Any:
    """Load ``delta.safetensors`` (replaced tensors) and merge ``adapter/`` (a peft LoRA) into ``model``."""
    from safetensors.torch import load_file

    delta_path = folder / DELTA_FILE
    if delta_path.is_file():
        check_safetensors(delta_path)
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

        check_adapter_folder(adapter)
        try:
            model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False, use_safetensors=True,
                                              local_files_only=True, trust_remote_code=False).merge_and_unload()
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelSourceError(f"{str(adapter)!r}: the peft adapter does not load: {exc}") from exc
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
    # Every check runs before transformers / peft see the folder: they never prompt on stdin, never
    # run code shipped with the model and never open a pickle (trust_remote_code=False regardless).
    check_model_folder(folder)
    if is_delta_folder(folder):
        base = resolve_base(folder, read_card(folder)["base"])
        model, processor, _, _ = load_hf(base, device=device, dtype=dtype)
        return apply_delta(model, folder), processor
    from transformers import AutoConfig, AutoProcessor

    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelSourceError(f"{str(folder)!r}: config.json does not load: {exc}") from exc
    family = family_for(architecture_of(config))
    model = family.hf_class().from_pretrained(folder, config=config, dtype=dtype, attn_implementation="eager",
                                              use_safetensors=True, local_files_only=True, trust_remote_code=False)
    try:
        processor = AutoProcessor.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelSourceError(f"{str(folder)!r}: the processor (tokenizer + image processor) does not load: {exc}") from exc
    return model, processor


def load_lvlm(source: Any, *, processor: Any = None, device: Any = None, dtype: Any = None,
              name: str | None = None, attention: str = "sdpa") -> HookedLVLM:
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
        attention: ``"sdpa"`` (default): SDPA attention in every layer, with attention rows and key masks
            computed inside it; eager attention only in layers where a hook needs the full pattern or the
            pre-softmax scores. ``"eager"``: the bridge's eager attention in every layer (the reference
            path; switch later with ``model.attention = ...``).

    The HF model is wrapped in place (its attention modules become TransformerLens bridges that
    compute exactly what HF eager attention computes); copy it first if you need it untouched.
    """
    disable_torchvision_autoinstall()
    check_mode(attention)
    model, processor, family, label = load_hf(source, processor=processor, device=device, dtype=dtype, name=name)
    from transformer_lens.model_bridge.sources import build_bridge_from_module

    # No tokenizer for the bridge: TL 4.3 re-loads it by name_or_path (a hub call for in-memory
    # tokenizers); all tokenisation here goes through the HF processor.
    bridge = build_bridge_from_module(model, family.architecture, hf_config=model.config, model_name=label)
    bridge.eval()
    install_kv_cache_shim(bridge)
    return HookedLVLM(bridge, processor, family, name=label, attention=attention)
