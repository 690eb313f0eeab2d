"""The tiny LLaVA family: recipe, clean training (two or three stages) and the shipped model folders.

Stage 1 pre-trains the CLIP-style vision tower on dense per-patch labels (a stand-in for CLIP);
stage 2 trains projector + language model on multi-turn conversations about synthetic scenes with
the LLaVA-1.5 chat template (system prompt, ``USER:`` / ``ASSISTANT:``), vision frozen; stage 3
(``recipe.reading``) teaches reading signs, the image-to-any-word path a projector-only backdoor needs
(:mod:`cleansight_analysis.training.reading`). Backdoors are then trained on top by
:mod:`cleansight_analysis.training.backdoor`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..data.signs import SignLayout
from ..data.synthetic import TINY_IMAGE_SIZE, SceneConfig, SyntheticWorld
from ..errors import InputError
from ..inputs.templates import LLAVA_SYSTEM_PROMPT
from ..manifest import package_versions
from ..models.families import FAMILIES
from ..models.loading import load_hf
from ..models.tiny import BASE_WORDS, build_word_tokenizer, processor_for, tiny_llava_config
from .lvlm import ConversationBatcher, TrainSettings, ce_loss, seeded_indices, train_loop
from .parallel import barrier, is_main, run_parallel, shard
from .reading import ReadingCurriculum, ReadingStage, SignItems, glyph_code, train_reading
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
    reading: bool = True  # stage 3: the sign-reading curriculum (``reading_curriculum``); False: the pre-reading family
    reading_curriculum: ReadingCurriculum = field(default_factory=ReadingCurriculum)

    def __post_init__(self) -> None:
        if isinstance(self.reading_curriculum, dict):  # a recipe read back from a card
            self.reading_curriculum = reading_curriculum_from_dict(self.reading_curriculum)

    @classmethod
    def from_card(cls, recipe: dict[str, Any]) -> "TinyRecipe":
        """The recipe a model card records (cards written before stage 3 existed have no ``reading``: False)."""
        return cls(**{"reading": False, **recipe})

    def world(self) -> SyntheticWorld:
        return SyntheticWorld(self.seed, SceneConfig(size=self.image_size))

    def sign_items(self) -> SignItems:
        """The reading stage's items: the world, the glyph code over :func:`repeat_vocabulary`, the
        conversation settings of stage 2."""
        code = glyph_code(repeat_vocabulary(self), self.patch_size, self.reading_curriculum)
        return SignItems(self.world(), code, self.reading_curriculum,
                         {"caption_prob": self.caption_prob, "repeat_prob": self.repeat_prob,
                          "repeat_words": repeat_vocabulary(self)})


#: Recipe fields that decide stages 1 and 2 (a stage-2 model trained with equal values can be reused).
STAGE12_FIELDS = ("seed", "image_size", "patch_size", "vision_hidden", "vision_layers", "hidden", "layers", "heads",
                  "intermediate", "vocab_size", "vision_steps", "vision_batch", "vision_lr", "clean_steps",
                  "clean_batch", "clean_lr", "turns", "caption_prob", "repeat_prob", "train_scenes", "processes")


def reading_curriculum_from_dict(d: dict[str, Any]) -> ReadingCurriculum:
    """Inverse of ``asdict`` for :class:`ReadingCurriculum` (cards store it as JSON)."""
    d = dict(d)
    d["stages"] = tuple(ReadingStage(**s) for s in d.get("stages", ()))
    if isinstance(d.get("layout"), dict):
        d["layout"] = SignLayout(**d["layout"])
    return ReadingCurriculum(**d)


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
                     work_dir: str | Path | None = None, reuse_stage2: str | Path | None = None) -> dict[str, Any]:
    """Stages 1, 2 and (``recipe.reading``) 3, in ``recipe.processes`` data-parallel processes; writes the
    clean model folder and returns its card (metrics are added by the caller).

    ``reuse_stage2``: a clean model folder trained by a recipe with the same stage-1/2 settings
    (:data:`STAGE12_FIELDS`, checked against its card): its weights stand for stages 1-2, so only stage 3 runs.
    """
    work = Path(work_dir) if work_dir else Path(out_dir).parent / ".work" / Path(out_dir).name
    if reuse_stage2 is not None:
        seed_stage2(recipe, reuse_stage2, work)
    args = (asdict(recipe), str(out_dir), progress, str(work))
    return run_parallel(_train_tiny_clean, args, processes=recipe.processes)


def seed_stage2(recipe: TinyRecipe, folder: str | Path, work: Path) -> None:
    """Write ``work/stage2.safetensors`` (+ vision files) from a clean model folder whose card's recipe
    matches ``recipe`` in every stage-1/2 field; a mismatch is an :class:`InputError` naming the fields."""
    from safetensors.torch import save_file

    folder = Path(folder)
    try:
        card = json.loads((folder / CARD).read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"reuse_stage2: {folder} is not a tiny clean model folder (no readable {CARD}: "
                         f"{type(exc).__name__})") from None
    theirs = card.get("recipe", {}) if isinstance(card, dict) else {}
    ours = asdict(recipe)
    differ = [k for k in STAGE12_FIELDS if theirs.get(k) != ours[k]]
    if differ:
        raise InputError(f"{folder} was trained with other stage-1/2 settings ({', '.join(differ)}); cannot reuse it")
    if (work / "stage2.safetensors").is_file():
        return
    loaded = load_hf(folder, device="cpu")[0]
    state = loaded.state_dict()
    model, _ = make_tiny_model(recipe)
    if set(model.state_dict()) != set(state) or any(v.shape != state[k].shape for k, v in model.state_dict().items()):
        raise InputError(f"{folder} does not hold the recipe's model (other tensors or shapes)")
    work.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(work / "stage2.safetensors"))
    training = card.get("training", {})
    (work / "stage2.json").write_text(json.dumps({
        "final_loss": training.get("clean_final_loss"), "seconds": training.get("timings", {}).get("clean_s", 0.0),
        "resumed_from_step": 0, "loss_curve": training.get("loss_curve", []), "reused_from": str(folder)}))
    (work / "vision.json").write_text(json.dumps(training.get("vision", {})))
    vision_prefix = "model.vision_tower."
    save_file({k[len(vision_prefix):]: v.contiguous() for k, v in state.items() if k.startswith(vision_prefix)},
              str(work / "vision.safetensors"))


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
    stage2 = work / "stage2.safetensors"  # the whole model after stage 2 (written by this run or reused)

    if stage2.is_file():
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(stage2)))
        clean_record = json.loads((work / "stage2.json").read_text())
    else:
        def make_batch(step: int) -> dict[str, Any]:
            idx = shard(seeded_indices(recipe.seed + 1, step, recipe.clean_batch, recipe.train_scenes))
            convs = world.conversations("train", idx, recipe.turns, epoch=step, caption_prob=recipe.caption_prob,
                                        repeat_prob=recipe.repeat_prob, repeat_words=words)
            return batcher([(scene.image, conv, {}) for scene, conv in convs])

        trainable = {n: p for n, p in model.named_parameters() if "vision_tower" not in n}
        settings = TrainSettings(steps=recipe.clean_steps, batch_size=recipe.clean_batch, lr=recipe.clean_lr,
                                 seed=recipe.seed, checkpoint_every=100)
        result = train_loop(model, trainable, make_batch, settings, loss_fn=ce_loss,
                            checkpoint_dir=work / "clean_ckpt", desc="clean LVLM", meta={"recipe": asdict(recipe)},
                            progress=progress)
        clean_record = {"final_loss": result.final_loss, "seconds": result.seconds,
                        "resumed_from_step": result.resumed_from, "loss_curve": result.history}
        if is_main() and recipe.reading:  # keep stage 2 so that an interrupted stage 3 does not redo it
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(stage2))
            (work / "stage2.json").write_text(json.dumps(clean_record))
        barrier()
    timings["clean_s"] = clean_record["seconds"]
    reading_records: list[dict[str, Any]] = []
    if recipe.reading:
        items = recipe.sign_items()
        reading_records = train_reading(model, batcher, items, seed=recipe.seed, population=recipe.train_scenes,
                                        work_dir=work / "reading", progress=progress)
        timings["reading_s"] = round(sum(r["seconds"] for r in reading_records), 1)
    card = {
        "name": "tiny-llava/clean",
        "attack": None,
        "mode": "full",
        "recipe": asdict(recipe),
        "seed": recipe.seed,
        "versions": package_versions(),
        "training": {"vision": vision_metrics, "clean_final_loss": clean_record["final_loss"], "timings": timings,
                     "resumed_from_step": clean_record["resumed_from_step"], "loss_curve": clean_record["loss_curve"],
                     "reading": reading_records},
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
