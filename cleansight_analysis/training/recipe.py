"""The tiny LLaVA family: recipe, clean training (two stages) and the shipped model folders.

Stage 1 pre-trains the CLIP-style vision tower on dense per-patch labels (a stand-in for CLIP);
stage 2 trains projector + language model on multi-turn conversations about synthetic scenes with
the LLaVA-1.5 chat template (system prompt, ``USER:`` / ``ASSISTANT:``), vision frozen. Backdoors
are then trained on top by :mod:`cleansight_analysis.training.backdoor`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..data.synthetic import TINY_IMAGE_SIZE, SceneConfig, SyntheticWorld
from ..inputs.templates import LLAVA_SYSTEM_PROMPT
from ..manifest import package_versions
from ..models.families import FAMILIES
from ..models.tiny import BASE_WORDS, build_word_tokenizer, processor_for, tiny_llava_config
from .lvlm import ConversationBatcher, TrainSettings, ce_loss, seeded_indices, train_loop
from .parallel import barrier, is_main, run_parallel, shard
from .vision import pretrain_vision

CARD = "card.json"


@dataclass
class TinyRecipe:
    """Every setting of the tiny family (recorded in each model's card)."""

    seed: int = 0
    image_size: int = TINY_IMAGE_SIZE
    patch_size: int = 4
    vision_hidden: int = 96
    vision_layers: int = 4
    hidden: int = 128
    layers: int = 8
    heads: int = 8
    intermediate: int = 384
    vocab_size: int = 256
    vision_steps: int = 1200
    vision_batch: int = 64
    vision_lr: float = 2e-3
    clean_steps: int = 1600
    clean_batch: int = 32
    clean_lr: float = 2e-3
    turns: int = 5
    caption_prob: float = 0.15
    repeat_prob: float = 0.15  # share of conversations with a text-only "repeat the words" turn
    train_scenes: int = 200_000
    processes: int = 2  # data-parallel CPU processes (one torch thread each)
    eval_n: int = 1000
    backdoor_steps: int | None = None  # overrides every backdoor spec's steps (tests use a handful)
    backdoor_train_n: int = 3000  # training pairs per backdoor (the paper: 3000)

    def world(self) -> SyntheticWorld:
        return SyntheticWorld(self.seed, SceneConfig(size=self.image_size))


def tiny_tokenizer(recipe: TinyRecipe):
    return build_word_tokenizer(list(BASE_WORDS) + recipe.world().vocabulary(), vocab_size=recipe.vocab_size)


def repeat_vocabulary(recipe: TinyRecipe) -> list[str]:
    """Every alphabetic word of the tiny tokenizer (the "repeat the words" task draws from these)."""
    return sorted({w for w in list(BASE_WORDS) + recipe.world().vocabulary() if w.isalpha()})


def make_tiny_model(recipe: TinyRecipe):
    """A randomly initialised (seeded) tiny LLaVA of the recipe's shape, and its processor."""
    from transformers import LlavaForConditionalGeneration

    cfg = tiny_llava_config(image_size=recipe.image_size, patch_size=recipe.patch_size,
                            vision_hidden=recipe.vision_hidden, vision_layers=recipe.vision_layers,
                            hidden=recipe.hidden, layers=recipe.layers, heads=recipe.heads,
                            intermediate=recipe.intermediate, vocab_size=recipe.vocab_size,
                            initializer_range=0.02, vision_feature_layer=-1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = LlavaForConditionalGeneration(cfg)
    model.config._attn_implementation = "sdpa"
    return model.eval(), processor_for(cfg, tiny_tokenizer(recipe))


def save_model_folder(model: Any, processor: Any, folder: str | Path, card: dict[str, Any]) -> Path:
    """Write ``model.safetensors``, config, processor files and ``card.json``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    (folder / CARD).write_text(json.dumps(card, indent=2, default=str) + "\n")
    return folder


def train_tiny_clean(recipe: TinyRecipe, out_dir: str | Path, *, progress: bool = True,
                     work_dir: str | Path | None = None) -> dict[str, Any]:
    """Stages 1 and 2 (in ``recipe.processes`` data-parallel processes); writes the clean model
    folder and returns its card (metrics are added by the caller)."""
    args = (asdict(recipe), str(out_dir), progress, None if work_dir is None else str(work_dir))
    return run_parallel(_train_tiny_clean, args, processes=recipe.processes)


def _train_tiny_clean(recipe_dict: dict[str, Any], out_dir: str, progress: bool, work_dir: str | None) -> dict[str, Any]:
    recipe = TinyRecipe(**recipe_dict)
    out_dir = Path(out_dir)
    work = Path(work_dir) if work_dir else out_dir.parent / ".work" / out_dir.name
    world = recipe.world()
    model, processor = make_tiny_model(recipe)
    timings: dict[str, float] = {}

    vision = model.model.vision_tower
    vision_ckpt = work / "vision.safetensors"
    t = time.perf_counter()
    if vision_ckpt.is_file():
        from safetensors.torch import load_file

        vision.load_state_dict(load_file(str(vision_ckpt)))
        vision_metrics = json.loads((work / "vision.json").read_text())
    else:
        vision_metrics = pretrain_vision(vision, world, steps=recipe.vision_steps, batch_size=recipe.vision_batch,
                                         lr=recipe.vision_lr, feature_layer=model.config.vision_feature_layer,
                                         seed=recipe.seed,
                                         progress=_bar(recipe.vision_steps, "vision", progress and is_main()))
        if is_main():
            work.mkdir(parents=True, exist_ok=True)
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in vision.state_dict().items()}, str(vision_ckpt))
            (work / "vision.json").write_text(json.dumps(vision_metrics))
        barrier()
    timings["vision_s"] = round(time.perf_counter() - t, 1)

    batcher = ConversationBatcher(model, processor, FAMILIES["LlavaForConditionalGeneration"], LLAVA_SYSTEM_PROMPT)
    words = repeat_vocabulary(recipe)

    def make_batch(step: int) -> dict[str, Any]:
        idx = shard(seeded_indices(recipe.seed + 1, step, recipe.clean_batch, recipe.train_scenes))
        convs = world.conversations("train", idx, recipe.turns, epoch=step, caption_prob=recipe.caption_prob,
                                    repeat_prob=recipe.repeat_prob, repeat_words=words)
        return batcher([(scene.image, conv, {}) for scene, conv in convs])

    trainable = {n: p for n, p in model.named_parameters() if "vision_tower" not in n}
    settings = TrainSettings(steps=recipe.clean_steps, batch_size=recipe.clean_batch, lr=recipe.clean_lr,
                             seed=recipe.seed, checkpoint_every=100)
    result = train_loop(model, trainable, make_batch, settings, loss_fn=ce_loss, checkpoint_dir=work / "clean_ckpt",
                        desc="clean LVLM", meta={"recipe": asdict(recipe)}, progress=progress)
    timings["clean_s"] = result.seconds
    card = {
        "name": "tiny-llava/clean",
        "attack": None,
        "mode": "full",
        "recipe": asdict(recipe),
        "seed": recipe.seed,
        "versions": package_versions(),
        "training": {"vision": vision_metrics, "clean_final_loss": result.final_loss, "timings": timings,
                     "resumed_from_step": result.resumed_from, "loss_curve": result.history},
    }
    if is_main():
        save_model_folder(model, processor, out_dir, card)
    barrier()
    return card


def _bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None

    bar = tqdm(total=total, desc=desc, mininterval=2.0)

    def update(step: int, metrics: dict[str, float]) -> None:
        bar.update(1)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{metrics['loss']:.3f}")
        if step == total - 1:
            bar.close()

    return update
