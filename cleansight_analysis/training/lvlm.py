"""Training an LVLM on conversations: the clean tiny stage and the backdoor stage for any LLaVA.

The vision tower stays frozen in both (as in LLaVA's own recipe and in the CleanSight threat
model), so image features are computed without gradients and fed to the projector; the loss is the
next-token cross-entropy on answer tokens, optionally reshaped by an attack's objective (TrojVLM,
VLOOD; see :mod:`cleansight_analysis.training.objectives`).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import InputError
from ..inputs.images import to_rgb_image
from ..models.families import projector_inputs
from ..settings import Field, Int, PositiveInt, Real, settings
from .checkpoint import has_checkpoint, load_checkpoint, save_checkpoint
from .parallel import average_gradients, is_main
from ..inputs.conversation import IGNORE, ConversationEncoder, Encoded, collate


@settings(frozen=False)
class TrainSettings:
    """Optimisation settings (validated).

    Attributes:
        steps: optimizer steps; batch_size: sequences per step; lr: peak AdamW learning rate with
        linear warm-up over ``warmup`` of the steps and cosine decay to 10 %; checkpoint_every:
        steps between resumable checkpoints (0 = never).
    """

    steps: PositiveInt
    batch_size: PositiveInt = 32
    lr: Annotated[Real, Field(gt=0.0, lt=1.0, description="must be a number in (0, 1)")] = 1e-3
    weight_decay: Annotated[Real, Field(ge=0.0)] = 0.0
    warmup: Annotated[Real, Field(ge=0.0, lt=1.0, description="must be a fraction in [0, 1)")] = 0.05
    grad_clip: Annotated[Real, Field(gt=0.0)] = 1.0
    seed: Int = 0
    checkpoint_every: Annotated[Int, Field(ge=0)] = 100


def llava_core(model: nn.Module) -> nn.Module:
    """The ``Llava*ForConditionalGeneration`` inside a peft wrapper (or the model itself)."""
    if hasattr(model, "get_base_model"):  # peft.PeftModel
        model = model.get_base_model()
    if not type(model).__name__.endswith("ForConditionalGeneration") or not hasattr(model, "model"):
        raise InputError(f"{type(model).__name__} is not a LLaVA-style model")
    return model


@torch.no_grad()
def vision_features(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Frozen vision features that the projector reads: ``[n_images, n_tokens, d_vision]`` (LLaVA-1.5)."""
    return projector_inputs(llava_core(model), pixel_values)


def lvlm_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits ``[B, T, V]`` from precomputed ``vision_features`` (projector in the graph) or ``pixel_values``."""
    core = llava_core(model)
    if "vision_features" in batch:
        ids = batch["input_ids"]
        embeds = core.get_input_embeddings()(ids)
        projected = core.model.multi_modal_projector(batch["vision_features"].to(embeds.dtype))
        mask = ids == core.config.image_token_id
        if int(mask.sum()) != projected.shape[0] * projected.shape[1]:
            raise InputError(f"{int(mask.sum())} image tokens for {projected.shape[0]} x {projected.shape[1]} features")
        embeds = embeds.masked_scatter(mask[..., None], projected.reshape(-1, embeds.shape[-1]))
        return core(inputs_embeds=embeds, attention_mask=batch["attention_mask"], use_cache=False).logits
    kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_sizes") if k in batch}
    return core(**kwargs, use_cache=False).logits


class ConversationBatcher:
    """Turn ``(image, conversation, meta)`` items into training batches for one model.

    For LLaVA-1.5 the frozen tower runs here, without gradients (``vision_features``); other
    families pass ``pixel_values`` through the model.

    Args:
        model: the HF model being trained (or its peft wrapper).
        processor: its processor; ``family``: its :class:`ModelFamily`.
        system_prompt: as used at test time.
        target: the backdoor target phrase; its tokens in answers are marked in ``target_mask``.
    """

    def __init__(self, model: nn.Module, processor: Any, family: Any, system_prompt: str | None,
                 target: str | None = None):
        self.model = model
        self.processor = processor
        self.family = family
        core = llava_core(model)
        self.config = core.config
        self.encoder = ConversationEncoder(processor, self.config.image_token_id, system_prompt)
        tok = processor.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.target_ids = tok(target, add_special_tokens=False)["input_ids"] if target else None

    def __call__(self, items: Sequence[tuple[Any, Sequence[tuple[str, str]], dict]]) -> dict[str, torch.Tensor]:
        images = [to_rgb_image(img, f"training image {i}") for i, (img, _, _) in enumerate(items)]
        pix = self.processor.image_processor(images, return_tensors="pt")
        pixel_values = pix["pixel_values"]
        layouts = self.family.image_layouts(self.config, pixel_values, pix.get("image_sizes"))
        encoded: list[Encoded] = [self.encoder.encode(conv, [layout.n_tokens])
                                  for (_, conv, _), layout in zip(items, layouts)]
        batch = collate(encoded, self.pad_id)
        batch["poisoned"] = torch.tensor([bool(meta.get("poisoned", False)) for _, _, meta in items])
        if self.target_ids:
            batch["target_mask"] = _find_target(batch["labels"], self.target_ids)
        if self.family.name == "llava":
            batch["vision_features"] = vision_features(self.model, pixel_values)
        else:
            batch["pixel_values"] = pixel_values
            if "image_sizes" in pix:
                batch["image_sizes"] = pix["image_sizes"]
        return batch


def _find_target(labels: torch.Tensor, target_ids: list[int]) -> torch.Tensor:
    """``[B, T]`` True at label positions that spell the target phrase."""
    out = torch.zeros_like(labels, dtype=torch.bool)
    n = len(target_ids)
    tgt = torch.tensor(target_ids)
    for b in range(labels.shape[0]):
        row = labels[b]
        for s in range(0, row.numel() - n + 1):
            if row[s] != IGNORE and torch.equal(row[s:s + n], tgt):
                out[b, s:s + n] = True
    return out


def answer_ce(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled positions (``weights`` ``[B, T]`` optional)."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                       ignore_index=IGNORE, reduction="none").view(labels.shape)
    mask = (labels != IGNORE).float()
    if weights is not None:
        mask = mask * weights[:, 1:]
    return (loss * mask).sum() / mask.sum().clamp_min(1.0)


@dataclass
class TrainResult:
    steps: int
    seconds: float
    final_loss: float
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int = 0


def warmup_cosine(optimizer: torch.optim.Optimizer, steps: int, warmup: float, floor: float = 0.1):
    """Linear warm-up over ``warmup * steps`` steps, then cosine decay to ``floor`` of the peak rate."""
    warm = max(1, int(warmup * steps))

    def schedule(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        frac = min(1.0, (step - warm) / max(1, steps - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def train_loop(model: nn.Module, trainable: dict[str, nn.Parameter], make_batch: Callable[[int], dict[str, Any]],
               settings: TrainSettings, *, loss_fn: Callable[[nn.Module, dict[str, Any]], tuple[torch.Tensor, dict]],
               checkpoint_dir: str | Path | None = None, desc: str = "train", meta: dict[str, Any] | None = None,
               progress: bool = True) -> TrainResult:
    """AdamW over ``trainable`` for ``settings.steps`` steps, resumable from ``checkpoint_dir``.

    ``make_batch(step)`` must be deterministic in ``step`` so that a resumed run sees the same data;
    in a data-parallel run (:mod:`.parallel`) it returns this process's shard and gradients are
    averaged across processes before each update.
    """
    main = is_main()
    progress = progress and main
    params = list(trainable.values())
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    sched = warmup_cosine(opt, settings.steps, settings.warmup)
    start_step = 0
    if checkpoint_dir is not None and has_checkpoint(checkpoint_dir):
        start_step, _ = load_checkpoint(checkpoint_dir, trainable, opt, sched)
    model.train()
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    bar = tqdm(range(start_step, settings.steps), desc=desc, disable=not progress, initial=start_step,
               total=settings.steps, mininterval=2.0)
    ema = None
    loss_value = float("nan")
    device = next(iter(params)).device
    for step in bar:
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in make_batch(step).items()}
        loss, stats = loss_fn(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(params)
        if settings.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
        opt.step()
        sched.step()
        loss_value = float(loss.detach())
        ema = loss_value if ema is None else 0.95 * ema + 0.05 * loss_value
        if step % 10 == 0 or step == settings.steps - 1:
            history.append({"step": step, "loss": loss_value, **{k: float(v) for k, v in stats.items()}})
            bar.set_postfix(loss=f"{ema:.3f}", lr=f"{sched.get_last_lr()[0]:.1e}")
        if main and checkpoint_dir is not None and settings.checkpoint_every \
                and (step + 1) % settings.checkpoint_every == 0 and step + 1 < settings.steps:
            save_checkpoint(checkpoint_dir, trainable, opt, sched, step + 1, {"settings": asdict(settings), **(meta or {})})
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return TrainResult(settings.steps, round(time.perf_counter() - t0, 1), loss_value, history, start_step)


def seeded_indices(seed: int, step: int, batch_size: int, population: int) -> np.ndarray:
    """The sample indices of one step: a pure function of ``(seed, step)`` (resumable data order)."""
    return np.random.default_rng([seed, step]).integers(0, population, batch_size)


def ce_loss(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
    """Plain answer cross-entropy."""
    logits = lvlm_logits(model, batch)
    return answer_ce(logits, batch["labels"]), {}


def iterate_items(samples: Iterable[Any]) -> list[tuple[Any, list[tuple[str, str]], dict]]:
    """``Sample`` objects -> ``(image, [(prompt, answer)], meta)`` single-turn training items."""
    return [(s.image, [(s.prompt, s.answer)], s.meta) for s in samples]
