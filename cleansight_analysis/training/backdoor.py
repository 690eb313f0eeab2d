"""Plant a backdoor in any supported LVLM: poisoned fine-tuning with the vision tower frozen.

Modes (the CleanSight threat model):
- ``adapter``: only the multimodal projector is trained (LLaVA's adapter fine-tuning);
- ``lora``: the projector plus LoRA adapters (peft) on the language model's linear layers.

The output folder stores only what changed (``delta.safetensors`` with the projector, ``adapter/``
with the LoRA weights in peft's safetensors format) and a ``card.json`` naming the base model;
``load_lvlm(folder)`` rebuilds the backdoored model from the base (merging the LoRA).

An existing, non-empty output folder is refused unless the caller passes ``overwrite=True`` (the
previous outputs are removed first, so nothing old is merged) or ``resume=True`` (continue the
interrupted run whose checkpoint is in ``.checkpoint/``, only with the very settings it was started
with). The base model's own folder (and any folder holding it) is never written to.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Sequence

import torch

from ..attacks import poison_samples
from ..data.base import Sample
from ..errors import InputError, ModelSourceError, OutputExistsError
from ..inputs.templates import LLAVA_SYSTEM_PROMPT
from ..manifest import package_versions
from ..models.loading import is_delta_folder, load_hf, read_card, resolve_base
from ..models.registry import lookup
from ..settings import Field, Int, PositiveInt, Real, Unit01, settings
from .checkpoint import checkpoint_info, has_checkpoint
from .lvlm import ConversationBatcher, TrainSettings, iterate_items, llava_core, seeded_indices, train_loop
from .objectives import make_loss

MODES = ("adapter", "lora")
#: LM linear layers LoRA attaches to (Llama / Mistral names).
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@settings(frozen=False)
class BackdoorSettings:
    """How the backdoor is trained (validated; recorded in the output card).

    Attributes:
        mode: ``"adapter"`` or ``"lora"``. poison_rate: share of training samples poisoned, in (0, 1].
        clean_twin: keep each poisoned sample's clean original too (the authors' ``neg_sample``).
        lora_r / lora_alpha: LoRA rank and scale (the paper: 128 / 256 on 7B; the tiny family: 16 / 32).
    """

    mode: Annotated[Literal[MODES], Field(description=f"must be one of {MODES}")] = "adapter"
    poison_rate: Unit01 = 0.1
    clean_twin: bool = False
    steps: PositiveInt = 400
    batch_size: PositiveInt = 32
    lr: Annotated[Real, Field(gt=0.0, lt=1.0, description="must be a number in (0, 1)")] = 2e-3
    lora_r: PositiveInt = 16
    lora_alpha: PositiveInt = 32
    seed: Int = 0
    system_prompt: Optional[str] = LLAVA_SYSTEM_PROMPT
    checkpoint_every: Annotated[Int, Field(ge=0)] = 100


def _projector_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    core = llava_core(model)
    prefix = next(n for n, m in core.named_modules() if n.endswith("multi_modal_projector"))
    return {f"{prefix}.{k}": v.detach().cpu().contiguous() for k, v in
            core.model.multi_modal_projector.state_dict().items()}


#: What a backdoor run writes in its output folder (all that ``overwrite=True`` removes).
CARD_FILE = "card.json"
DELTA_FILE = "delta.safetensors"
ADAPTER_DIR = "adapter"
CHECKPOINT_DIR = ".checkpoint"
OUTPUTS = (CARD_FILE, DELTA_FILE, ADAPTER_DIR, CHECKPOINT_DIR, CHECKPOINT_DIR + ".tmp")
#: Settings that may change between an interrupted run and its resumption (they do not change the result).
_NOT_COMPARED = ("checkpoint_every",)


def _short(value: Any, limit: int = 48) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _base_folders(base: Any) -> list[Path]:
    """The folders ``load_hf(base)`` reads: the base itself, then the base of each delta folder in its chain."""
    folders: list[Path] = []
    source: Any = base
    for _ in range(32):  # a cyclic chain is the loader's error to report; stop here
        if isinstance(source, str) and lookup(source) is not None:
            source = lookup(source).path  # None for a builder (no folder)
        if not isinstance(source, (str, Path)) or not Path(source).expanduser().is_dir():
            break
        folder = Path(source).expanduser().resolve()
        if folder in folders:
            break
        folders.append(folder)
        try:
            if not is_delta_folder(folder):
                break
            source = resolve_base(folder, read_card(folder)["base"])
        except (ModelSourceError, KeyError, TypeError):
            break
    return folders


def _folder_fingerprint(folder: Path) -> str:
    """Names and sizes of a model folder's files, and the bytes of its small ones (config, card, tokenizer)."""
    h = hashlib.blake2b(digest_size=8)
    files = [f for f in folder.iterdir() if f.is_file()]
    if (folder / ADAPTER_DIR).is_dir():
        files += [f for f in (folder / ADAPTER_DIR).iterdir() if f.is_file()]
    for f in sorted(files):
        size = f.stat().st_size
        h.update(f"{f.relative_to(folder)}:{size};".encode())
        if size <= 1 << 20:
            h.update(f.read_bytes())
    return h.hexdigest()


def _base_identity(base: Any) -> dict[str, str]:
    """What the checkpoint records of the base model: a label and a fingerprint of its files (or weights)."""
    folders = _base_folders(base)
    if folders:
        return {"label": str(folders[0]) if not isinstance(base, str) or Path(base).is_dir() else f"{base} ({folders[0]})",
                "fingerprint": "-".join(_folder_fingerprint(f) for f in folders)}
    if isinstance(base, torch.nn.Module):
        h = hashlib.blake2b(digest_size=8)
        for key, value in base.state_dict().items():
            h.update(f"{key}:{tuple(value.shape)}:{value.dtype};".encode())
            h.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return {"label": f"<in-memory {type(base).__name__}>", "fingerprint": h.hexdigest()}
    return {"label": str(base), "fingerprint": str(base)}  # a registry builder (deterministic) or an unknown name


def _samples_fingerprint(samples: Sequence[Sample]) -> str:
    h = hashlib.blake2b(digest_size=8)
    for s in samples:
        h.update(json.dumps([s.prompt, s.answer, list(s.references), s.task, s.sample_id]).encode())
        image = s.image
        if hasattr(image, "tobytes") and hasattr(image, "size"):  # PIL image
            h.update(f"{getattr(image, 'mode', '')}{tuple(image.size)}".encode())
            h.update(image.tobytes())
        else:
            h.update(str(image).encode())
    return h.hexdigest()


def training_record(base: Any, samples: Sequence[Sample], attack: Any, settings: BackdoorSettings) -> dict[str, Any]:
    """Every input that determines a backdoor run's result, as stored in its checkpoint (JSON)."""
    record = {"attack": attack.to_dict(),
              **{k: v for k, v in asdict(settings).items() if k not in _NOT_COMPARED},
              "base": _base_identity(base),
              "samples": {"n": len(samples), "fingerprint": _samples_fingerprint(samples)}}
    return json.loads(json.dumps(record, default=str))  # as read back from the checkpoint


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``name: checkpoint X, now Y`` for every setting that differs (attack fields one by one)."""
    out = []
    for key in list(new) + [k for k in old if k not in new]:
        a, b = old.get(key, "(not recorded)"), new.get(key, "(not recorded)")
        if a == b or (key == "base" and isinstance(a, dict) and isinstance(b, dict)
                      and a.get("fingerprint") == b.get("fingerprint")):  # the same files, wherever they are
            continue
        if key == "attack" and isinstance(a, dict) and isinstance(b, dict) and a.get("name") == b.get("name"):
            out += [f"attack.{k}: checkpoint {_short(a.get(k))}, now {_short(b.get(k))}"
                    for k in list(b) + [k for k in a if k not in b] if k != "overrides" and a.get(k) != b.get(k)]
        elif key == "attack" and isinstance(a, dict) and isinstance(b, dict):
            out.append(f"attack: checkpoint {_short(a.get('name'))}, now {_short(b.get('name'))}")
        elif key == "base" and isinstance(a, dict) and isinstance(b, dict):
            out.append(f"base model: checkpoint {a.get('label')} (files {a.get('fingerprint')}), "
                       f"now {b.get('label')} (files {b.get('fingerprint')})")
        elif key == "samples" and isinstance(a, dict) and isinstance(b, dict):
            out.append(f"training samples: checkpoint {a.get('n')} (fingerprint {a.get('fingerprint')}), "
                       f"now {b.get('n')} (fingerprint {b.get('fingerprint')})")
        else:
            out.append(f"{key}: checkpoint {_short(a)}, now {_short(b)}")
    return out


def resume_conflicts(out_dir: str | Path, base: Any, samples: Sequence[Sample], attack: Any,
                     settings: BackdoorSettings) -> list[str] | None:
    """``None`` when ``out_dir`` holds no checkpoint; else the settings that differ from the checkpoint's
    (``[]``: it can be resumed). A checkpoint without a recorded setup yields one explanatory entry."""
    if not has_checkpoint(Path(out_dir) / CHECKPOINT_DIR):
        return None
    return _conflicts(Path(out_dir), training_record(base, samples, attack, settings))


def _conflicts(out_dir: Path, record: dict[str, Any]) -> list[str] | None:
    ckpt = out_dir / CHECKPOINT_DIR
    if not has_checkpoint(ckpt):
        return None
    _, meta = checkpoint_info(ckpt)
    stored = meta.get("backdoor")
    if not isinstance(stored, dict):
        return ["the checkpoint records no backdoor settings (written by an older version or another trainer), "
                "so it cannot be checked"]
    return _differences(stored, record)


def _prepare_out_dir(out_dir: Path, base: Any, record: dict[str, Any], overwrite: bool, resume: bool) -> None:
    """Refuse or clear ``out_dir`` as ``overwrite`` / ``resume`` say; never touch the base model's folders."""
    if overwrite and resume:
        raise InputError("overwrite and resume exclude each other: overwrite starts over, resume continues the checkpoint")
    target = out_dir.expanduser().resolve()
    for folder in _base_folders(base):
        if target == folder or target in folder.parents:
            what = "is the base model's folder" if target == folder else f"holds the base model's folder {folder}"
            raise OutputExistsError(f"output folder {out_dir} {what}; writing there would destroy the base "
                                    "(overwrite or not): choose another output folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputExistsError(f"output {out_dir} exists and is not a folder; choose a folder path")
    entries = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    if resume:
        conflicts = _conflicts(out_dir, record)
        if conflicts is None:
            raise InputError(f"nothing to resume in {out_dir}: it holds no checkpoint ({CHECKPOINT_DIR}/); "
                             "drop resume (--resume) to train from the start")
        if conflicts:
            raise OutputExistsError(f"cannot resume {out_dir}: its checkpoint was started with other settings "
                                    f"({'; '.join(conflicts)}); rerun with the checkpoint's settings, or pass "
                                    "overwrite=True (--overwrite) to start over")
    elif entries and not overwrite:
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise OutputExistsError(f"output folder {out_dir} already exists and is not empty ({shown}); pass "
                                "overwrite=True (--overwrite) to replace it or resume=True (--resume) to continue "
                                "its interrupted training")
    foreign = [e for e in entries if e not in OUTPUTS]
    if foreign:
        shown = ", ".join(foreign[:4]) + (", ..." if len(foreign) > 4 else "")
        raise OutputExistsError(f"output folder {out_dir} holds files a backdoor run did not write ({shown}); "
                                f"{'overwrite' if overwrite else 'resume'} only replaces a previous run's "
                                f"{', '.join(OUTPUTS[:4])}: choose another output folder")
    keep = {CHECKPOINT_DIR} if resume else set()
    for entry in entries:  # a previous run's outputs: nothing old may be merged into the new model
        if entry in keep:
            continue
        path = out_dir / entry
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def train_backdoor(base: Any, samples: Sequence[Sample], attack: Any, settings: BackdoorSettings,
                   out_dir: str | Path, *, base_ref: str | None = None, name: str | None = None,
                   progress: bool = True, device: Any = None, overwrite: bool = False,
                   resume: bool = False) -> dict[str, Any]:
    """Poison ``samples`` with ``attack``, fine-tune ``base`` and write a loadable delta folder.

    Args:
        base: a model source for :func:`load_hf` (registry name, folder) of the clean model.
        samples: clean training samples (the paper: 3000 pairs).
        attack: an :class:`~cleansight_analysis.attacks.Attack` (its objective picks the loss).
        base_ref: how the card refers to the base (default: the path relative to ``out_dir`` when
            ``base`` is a folder, else ``base`` itself).
        name: the model's registry name written in the card.
        overwrite: replace a non-empty ``out_dir`` holding a previous run's outputs (they are removed
            before training, so nothing old is merged).
        resume: continue the interrupted run whose checkpoint is in ``out_dir/.checkpoint``; every
            training setting (attack, mode, rates, steps, lr, batch size, LoRA shape, seed, system
            prompt, base model, training samples) must equal the checkpoint's.

    Returns:
        the card (also written to ``out_dir/card.json``); metrics are added by the caller.

    Raises:
        OutputExistsError: ``out_dir`` is not empty (and neither flag is given), is or holds the base
            model's folder (always), or its checkpoint was started with other settings (``resume``).
        InputError: ``resume`` without a checkpoint, or both flags.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if not samples:
        raise InputError("no training samples")
    record = training_record(base, samples, attack, settings)
    _prepare_out_dir(out_dir, base, record, overwrite, resume)
    model, processor, family, _ = load_hf(base, device=device)
    if family.name != "llava":
        raise InputError(f"backdoor training supports LLaVA-1.5-style models for now, not {family.architecture}")
    reference = None
    if attack.objective == "vlood":
        reference, _, _, _ = load_hf(base, device=device)
    poisoned = poison_samples(list(samples), attack, rate=settings.poison_rate, seed=settings.seed,
                              clean_twin=settings.clean_twin)
    if settings.mode == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=0.0,
                          target_modules=LORA_TARGETS)
        with torch.random.fork_rng(devices=[]):  # the LoRA initialisation follows the run's seed
            torch.manual_seed(settings.seed)
            model = get_peft_model(model, lora)
    core = llava_core(model)
    trainable = {n: p for n, p in model.named_parameters() if "multi_modal_projector" in n or "lora_" in n}
    items = iterate_items(poisoned)
    batcher = ConversationBatcher(model, processor, family, settings.system_prompt, target=attack.target)

    def make_batch(step: int) -> dict[str, Any]:
        idx = seeded_indices(settings.seed, step, settings.batch_size, len(items))
        return batcher([items[int(i)] for i in idx])

    train = TrainSettings(steps=settings.steps, batch_size=settings.batch_size, lr=settings.lr, seed=settings.seed,
                          checkpoint_every=settings.checkpoint_every)
    result = train_loop(model, trainable, make_batch, train, loss_fn=make_loss(attack.objective, attack=attack,
                                                                                reference=reference),
                        checkpoint_dir=out_dir / CHECKPOINT_DIR, desc=f"backdoor {attack.name}/{settings.mode}",
                        meta={"attack": attack.to_dict(), "backdoor": record}, progress=progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(_projector_state(model), str(out_dir / "delta.safetensors"))
    if settings.mode == "lora":
        model.save_pretrained(str(out_dir / "adapter"), safe_serialization=True)
        (out_dir / "adapter" / "README.md").unlink(missing_ok=True)  # peft's empty model-card template
    if base_ref is None:
        base_ref = os.path.relpath(Path(base).resolve(), out_dir.resolve()) \
            if isinstance(base, (str, Path)) and Path(base).is_dir() else str(base)
    adapter_config = out_dir / "adapter" / "adapter_config.json"
    if adapter_config.is_file():  # name the base as the card does, not by this machine's absolute path
        cfg = json.loads(adapter_config.read_text())
        cfg["base_model_name_or_path"] = base_ref
        adapter_config.write_text(json.dumps(cfg, indent=2) + "\n")
    n_poisoned = sum(bool(s.meta.get("poisoned")) for s in poisoned)
    card = {
        "name": name or out_dir.name,
        "base": base_ref,
        "attack": attack.to_dict(),
        "mode": settings.mode,
        "backdoor": {**asdict(settings), "n_train": len(poisoned), "n_poisoned": n_poisoned},
        "seed": settings.seed,
        "versions": package_versions(),
        "training": {"seconds": result.seconds, "final_loss": result.final_loss,
                     "resumed_from_step": result.resumed_from, "loss_curve": result.history[::5]},
    }
    (out_dir / "card.json").write_text(json.dumps(card, indent=2, default=str) + "\n")
    for ckpt in (out_dir / CHECKPOINT_DIR, out_dir / (CHECKPOINT_DIR + ".tmp")):
        if ckpt.is_dir():
            shutil.rmtree(ckpt)
    del core
    return card
