"""Plant a backdoor in any supported LVLM: poisoned fine-tuning with the vision tower frozen.

Modes (the CleanSight threat model):
- ``adapter``: only the multimodal projector is trained (LLaVA's adapter fine-tuning);
- ``lora``: the projector plus LoRA adapters (peft) on the language model's linear layers.

The output folder stores only what changed (``delta.safetensors`` with the projector, ``adapter/``
with the LoRA weights in peft's safetensors format) and a ``card.json`` naming the base model;
``load_lvlm(folder)`` rebuilds the backdoored model from the base (merging the LoRA).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ..data.base import Sample
from ..errors import InputError
from ..inputs.templates import LLAVA_SYSTEM_PROMPT
from ..manifest import package_versions
from .lvlm import ConversationBatcher, TrainSettings, iterate_items, llava_core, seeded_indices, train_loop
from .objectives import make_loss

MODES = ("adapter", "lora")
#: LM linear layers LoRA attaches to (Llama / Mistral names).
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@dataclass
class BackdoorSettings:
    """How the backdoor is trained (validated; recorded in the output card).

    Attributes:
        mode: ``"adapter"`` or ``"lora"``. poison_rate: share of training samples poisoned, in (0, 1].
        clean_twin: keep each poisoned sample's clean original too (the authors' ``neg_sample``).
        lora_r / lora_alpha: LoRA rank and scale (the paper: 128 / 256 on 7B; the tiny family: 16 / 32).
    """

    mode: str = "adapter"
    poison_rate: float = 0.1
    clean_twin: bool = False
    steps: int = 400
    batch_size: int = 32
    lr: float = 2e-3
    lora_r: int = 16
    lora_alpha: int = 32
    seed: int = 0
    system_prompt: str | None = LLAVA_SYSTEM_PROMPT
    checkpoint_every: int = 100

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InputError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not 0 < self.poison_rate <= 1:
            raise InputError(f"poison rate must be in (0, 1], got {self.poison_rate}")
        if self.lora_r < 1:
            raise InputError(f"lora_r must be >= 1, got {self.lora_r}")


def _projector_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    core = llava_core(model)
    prefix = next(n for n, m in core.named_modules() if n.endswith("multi_modal_projector"))
    return {f"{prefix}.{k}": v.detach().cpu().contiguous() for k, v in
            core.model.multi_modal_projector.state_dict().items()}


def train_backdoor(base: Any, samples: Sequence[Sample], attack: Any, settings: BackdoorSettings,
                   out_dir: str | Path, *, base_ref: str | None = None, name: str | None = None,
                   progress: bool = True, device: Any = None) -> dict[str, Any]:
    """Poison ``samples`` with ``attack``, fine-tune ``base`` and write a loadable delta folder.

    Args:
        base: a model source for :func:`load_hf` (registry name, folder) of the clean model.
        samples: clean training samples (the paper: 3000 pairs).
        attack: an :class:`~cleansight_analysis.attacks.Attack` (its objective picks the loss).
        base_ref: how the card refers to the base (default: the path relative to ``out_dir`` when
            ``base`` is a folder, else ``base`` itself).
        name: the model's registry name written in the card.

    Returns:
        the card (also written to ``out_dir/card.json``); metrics are added by the caller.
    """
    from safetensors.torch import save_file

    from ..attacks import poison_samples
    from ..models.loading import load_hf

    out_dir = Path(out_dir)
    if not samples:
        raise InputError("no training samples")
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
                        checkpoint_dir=out_dir / ".checkpoint", desc=f"backdoor {attack.name}/{settings.mode}",
                        meta={"attack": attack.to_dict()}, progress=progress)
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
    ckpt = out_dir / ".checkpoint"
    if ckpt.is_dir():
        for f in ckpt.iterdir():
            f.unlink()
        ckpt.rmdir()
    del core
    return card
