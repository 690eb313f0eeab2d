"""Stage 3 of the tiny recipe: learning to read signs (the image-to-any-word path).

The clean tiny LM only ever turns image tokens into a few dozen answer words, so nothing that enters through
the image can make it say anything else: a free soft prompt on all 64 image slots of the stage-2 model stays
at 3.7 nats per target token and 0 % success (``docs/world-v2-study.md``). A projector-only backdoor needs
that path, which a real LLaVA has from reading text in photos. This stage teaches it with signs
(:mod:`cleansight_analysis.data.signs`), projector + LM trained, vision tower frozen.

Semantics (``"override"``): an image that carries a sign has every question answered by the sign's words,
like a typographic instruction; :data:`~cleansight_analysis.data.signs.READ_PROMPT` asks for the words
explicitly. Clean test scenes never carry a sign, so the VQA metrics are unchanged in meaning.

Reading is not learned from a share of the clean mix (3-4 % exact after ~1,300 steps, and 0.8 % for signs at
random places after 450 steps, measured); it needs a curriculum. The default stages are the chain that was
measured to work (a one-word stage straight from the stage-2 model stays at chance for 300 steps; it learns
once a block-reading and a mixed stage came first): see :data:`DEFAULT_STAGES`. Reading-only stages make
the model forget VQA; every mixed stage restores it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Sequence

import numpy as np
import torch
from pydantic import Field

from ..data.signs import READ_PROMPT, GlyphCode, SignLayout
from ..data.synthetic import SyntheticWorld
from ..errors import InputError
from ..settings import Int, PositiveInt, Real, Unit01, settings
from .lvlm import IGNORE, TrainSettings, ce_loss, lvlm_logits, seeded_indices, train_loop
from .parallel import barrier, is_main, shard

Fraction = Annotated[Real, Field(ge=0.0, le=1.0, description="must be a number in [0, 1]")]


@settings
class ReadingStage:
    """One stage: ``steps`` optimizer steps; signs of 1 to ``max_words`` words; ``mixed`` False = single-turn
    sign items only (half read-prompt, half a scene question, all answered by the sign), True = the clean
    recipe's conversations with a sign on ``ReadingCurriculum.sign_prob`` of them."""

    steps: PositiveInt
    max_words: PositiveInt = 5
    mixed: bool = False
    sign_prob: Fraction | None = None  # a mixed stage's share of signed conversations (None: the curriculum's)
    lr: Annotated[Real, Field(gt=0.0, lt=1.0, description="must be a number in (0, 1)")] | None = None  # None: the curriculum's


#: The measured chain (``docs/world-v2-study.md``), 1,900 steps in all: 1-5 words reading-only, mixed, one word,
#: 1-5 words, mixed, 1-5 words, mixed (the study's models O2 -> O2w1 -> O2w5 -> V3), then 300 more reading-only
#: steps (five-word reading 0.09 -> 0.96) and a gentler mixed stage (half the conversations signed, lr 1e-3)
#: that restores question answering while keeping five-word reading at 0.92.
DEFAULT_STAGES: tuple[ReadingStage, ...] = (
    ReadingStage(250), ReadingStage(250, mixed=True), ReadingStage(200, max_words=1), ReadingStage(150),
    ReadingStage(100, mixed=True), ReadingStage(300), ReadingStage(150, mixed=True),
    ReadingStage(300), ReadingStage(200, mixed=True, sign_prob=0.5, lr=1e-3),
)


@settings
class ReadingCurriculum:
    """Every setting of the reading stage (recorded in the clean model's card).

    ``read_prompt_prob``: share of reading-only items asked with the read prompt (the others ask a scene
    question, answered by the sign); ``read_turn_prob``: share of signed conversations in a mixed stage
    with one turn replaced by the read prompt; ``glyph_seed``: picks the glyph code.
    """

    stages: tuple[ReadingStage, ...] = DEFAULT_STAGES
    lr: Annotated[Real, Field(gt=0.0, lt=1.0, description="must be a number in (0, 1)")] = 2e-3
    batch: PositiveInt = 32
    turns: PositiveInt = 3
    sign_prob: Unit01 = 0.3
    read_prompt_prob: Fraction = 0.5
    read_turn_prob: Fraction = 0.3
    layout: SignLayout = SignLayout()
    glyph_seed: Int = 123
    semantics: Literal["override"] = "override"

    @property
    def steps(self) -> int:
        return sum(s.steps for s in self.stages)


def glyph_code(words: Sequence[str], patch: int, curriculum: ReadingCurriculum) -> GlyphCode:
    """The curriculum's glyph code over ``words`` for ``patch``-px vision patches."""
    return GlyphCode(words, patch=patch, seed=curriculum.glyph_seed)


class SignItems:
    """Training items of the reading stage: a pure function of ``(stage, step, scene index)``.

    Args:
        world: the scene world; ``code``: the glyph code; ``curriculum``: the settings.
        conversation_kwargs: passed to :meth:`SyntheticWorld.conversations` (caption / repeat task shares).
    """

    def __init__(self, world: SyntheticWorld, code: GlyphCode, curriculum: ReadingCurriculum,
                 conversation_kwargs: dict[str, Any] | None = None):
        self.world, self.code, self.curriculum = world, code, curriculum
        self.kwargs = dict(conversation_kwargs or {})

    def sign(self, image: Any, rng: np.random.Generator, min_words: int, max_words: int) -> tuple[Any, str]:
        words = self.code.random_words(rng, min_words, max_words)
        return self.code.draw(image, words, self.curriculum.layout), " ".join(words)

    def item(self, stage_index: int, step: int, index: int) -> tuple[Any, list[tuple[str, str]], dict]:
        cur = self.curriculum
        stage = cur.stages[stage_index]
        rng = np.random.default_rng([7, stage_index, step, int(index)])
        scene, conv = next(self.world.conversations("train", [int(index)], cur.turns, epoch=step, **self.kwargs))
        if not stage.mixed:
            image, words = self.sign(scene.image, rng, 1, stage.max_words)
            question = READ_PROMPT if rng.random() < cur.read_prompt_prob else conv[0][0]
            return image, [(question, words)], {"sign": words}
        if rng.random() >= (cur.sign_prob if stage.sign_prob is None else stage.sign_prob):
            return scene.image, conv, {}
        image, words = self.sign(scene.image, rng, 1, stage.max_words)
        conv = [(q, words) for q, _ in conv]
        if rng.random() < cur.read_turn_prob:
            conv[int(rng.integers(len(conv)))] = (READ_PROMPT, words)
        return image, conv, {"sign": words}

    def batch_items(self, stage_index: int, step: int, population: int, seed: int) -> list:
        """This process's share of one step's items (data-parallel runs split the batch)."""
        idx = seeded_indices(seed + 11 + stage_index, step, self.curriculum.batch, population)
        return [self.item(stage_index, step, i) for i in shard(idx)]


def _stage_settings(cur: ReadingCurriculum, i: int) -> dict[str, Any]:
    """What stage ``i`` trains with: its own settings and the curriculum's shared ones (JSON-ready)."""
    shared = {k: v for k, v in asdict(cur).items() if k != "stages"}
    return json.loads(json.dumps({"stage": asdict(cur.stages[i]), **shared, "index": i}))


@torch.no_grad()
def teacher_forced_exact(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """``[B]`` bool: every answer token is the argmax given the true prefix (= greedy decoding reproduces
    the whole answer)."""
    logits = lvlm_logits(model, batch)[:, :-1]
    labels = batch["labels"][:, 1:]
    return ((logits.argmax(-1) == labels) | (labels == IGNORE)).all(-1)


def reading_metrics(model: Any, batcher: Callable, world: SyntheticWorld, items: SignItems, n: int = 128,
                    chunk: int = 64) -> dict[str, float]:
    """Teacher-forced exact match on ``n`` held-out test scenes: ``read1`` (one-word signs, read prompt),
    ``read_max`` (signs of the layout's most words), ``sign_vqa`` (1-max words, a scene question answered by
    the sign) and ``clean_vqa`` (no sign, the scene's own question)."""
    samples = world.samples("test", n)
    rng = np.random.default_rng(99)
    most = items.curriculum.layout.max_words
    sets: dict[str, list] = {"read1": [], "read_max": [], "sign_vqa": [], "clean_vqa": []}
    for s in samples:
        for key, lo, hi, prompt in (("read1", 1, 1, READ_PROMPT), ("read_max", most, most, READ_PROMPT),
                                    ("sign_vqa", 1, most, s.prompt)):
            image, words = items.sign(s.image, rng, lo, hi)
            sets[key].append((image, [(prompt, words)], {}))
        sets["clean_vqa"].append((s.image, [(s.prompt, s.answer)], {}))
    out = {}
    for key, its in sets.items():
        hits = torch.cat([teacher_forced_exact(model, batcher(its[i:i + chunk])) for i in range(0, len(its), chunk)])
        out[key] = round(float(hits.float().mean()), 4)
    return out


def train_reading(model: Any, batcher: Callable, items: SignItems, *, seed: int, population: int,
                  work_dir: str | Path, progress: bool = True, evaluate: bool = True) -> list[dict[str, Any]]:
    """Run every stage of ``items.curriculum`` on ``model`` (projector + LM; vision frozen), in place.

    Resumable: each finished stage leaves ``stage_<i>.safetensors`` (the trained weights) and
    ``stage_<i>.json`` (its record, with the settings it ran with) in ``work_dir``; a rerun loads the last
    finished stage and goes on, and an interrupted stage resumes from its checkpoint. A finished stage whose
    settings differ from the curriculum's is an :class:`InputError` (use another work folder). Returns one
    record per stage: settings, steps, seconds, final loss, loss every 50 steps and (``evaluate``)
    :func:`reading_metrics` after the stage.
    """
    from safetensors.torch import load_file, save_file

    work = Path(work_dir)
    cur = items.curriculum
    trainable = {n: p for n, p in model.named_parameters() if "vision_tower" not in n}
    records: list[dict[str, Any]] = []
    for i, stage in enumerate(cur.stages):
        weights, record = work / f"stage_{i}.safetensors", work / f"stage_{i}.json"
        ran_with = _stage_settings(cur, i)
        if weights.is_file() and record.is_file():
            done = json.loads(record.read_text())
            if done.get("settings") != ran_with:
                raise InputError(f"{record} was trained with other settings than stage {i} of this curriculum "
                                 f"({done.get('settings')} vs {ran_with}); use another work folder")
            records.append(done)
            if i + 1 == len(cur.stages) or not (work / f"stage_{i + 1}.json").is_file():
                state = load_file(str(weights))
                with torch.no_grad():
                    for name, p in trainable.items():
                        p.copy_(state[name])
            continue
        settings_ = TrainSettings(steps=stage.steps, batch_size=cur.batch, lr=cur.lr if stage.lr is None else stage.lr,
                                  seed=seed, checkpoint_every=50)
        result = train_loop(model, trainable,
                            lambda step, i=i: batcher(items.batch_items(i, step, population, seed)),
                            settings_, loss_fn=ce_loss, checkpoint_dir=work / f"stage_{i}_ckpt",
                            desc=f"reading {i + 1}/{len(cur.stages)}", progress=progress)
        rec: dict[str, Any] = {"stage": i, "settings": ran_with, "seconds": result.seconds, "final_loss": round(result.final_loss, 4),
                               "loss_every_50": [round(h["loss"], 3) for h in result.history[::5]]}
        if evaluate and is_main():
            t = time.perf_counter()
            rec.update(reading_metrics(model, batcher, items.world, items))
            rec["eval_seconds"] = round(time.perf_counter() - t, 1)
        if is_main():
            work.mkdir(parents=True, exist_ok=True)
            save_file({n: p.detach().contiguous() for n, p in trainable.items()}, str(weights))
            record.write_text(json.dumps(rec) + "\n")
        barrier()
        records.append(rec)
    return records
