"""Build (or rebuild) the shipped tiny LLaVA family: ``cleansight tiny build``.

``data/models/tiny-llava/clean`` is trained by the two-stage recipe; every backdoored member is a
delta folder over it. Each model's card records the recipe, the attack, the mode, the seed, the
package versions and the measured metrics (``clean_acc``, ``asr``, ``false_trigger_rate``) on the
held-out synthetic test split.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ..attacks import get_attack
from ..errors import InputError
from ..evaluation import evaluate_backdoor
from ..models.loading import load_lvlm
from .backdoor import BackdoorSettings, resume_conflicts, train_backdoor
from .recipe import CARD, TinyRecipe, train_tiny_clean

ROOT_NAME = "tiny-llava"


@dataclass(frozen=True)
class BackdoorSpec:
    """One shipped backdoored model: attack parameters and the modes to try, in order.

    The first mode whose model meets the goals (ASR >= ``asr_goal``, clean accuracy within
    ``max_clean_drop`` of the clean model, false-trigger rate <= ``max_false_trigger``) is shipped; if
    none does, the last one is shipped and the card says so. Modes before the last one are tried for
    ``trial_steps`` steps and evaluated on ``trial_eval_n`` test samples (a cheap trial that keeps
    ``cleansight tiny build`` near its time budget; every attempt's metrics are kept in the card).

    Tiny-family settings and why: ``poison_rate`` 0.5 is the paper's text (1500 of 3000 pairs); at 0.1
    the 8-layer tiny LM did not learn the target phrase within 300 LoRA steps (ASR 0.0, measured).
    Adapter (projector-only) training did not plant any backdoor in the tiny LM (ASR 0.0 at lr 2e-3,
    5e-3 and 1e-2, 400 steps, poison rate 0.1 and 0.5, measured on an earlier clean model): a 1.8 M
    parameter LM cannot be steered by image tokens alone the way a 7 B LM can, so members fall back to
    LoRA (r 16, alpha 32, on every LM linear layer). The ``-lora`` members are LoRA-only replicates
    with another seed.
    """

    name: str
    attack: str
    params: dict[str, Any] = field(default_factory=dict)
    modes: tuple[str, ...] = ("adapter", "lora")
    steps: int = 300
    trial_steps: int = 100
    trial_eval_n: int = 300
    lr: dict[str, float] = field(default_factory=lambda: {"adapter": 5e-3, "lora": 2e-3})
    poison_rate: float = 0.5
    seed: int = 0


#: The tiny family. Trigger sizes are in pixels of the 32 px scenes (4 px patch = one vision patch).
TINY_BACKDOORS: tuple[BackdoorSpec, ...] = (
    BackdoorSpec("badnet", "badnet", {"size": 4}),
    BackdoorSpec("blended", "blended", {"alpha": 0.2}),
    BackdoorSpec("sig", "sig", {}),
    BackdoorSpec("wanet", "wanet", {"k": 8, "s": 1.0}),
    BackdoorSpec("trojvlm", "trojvlm", {"size": 4}),
    BackdoorSpec("vlood", "vlood", {"size": 4}),
    BackdoorSpec("badnet-lora", "badnet", {"size": 4}, modes=("lora",), seed=1),
    BackdoorSpec("blended-lora", "blended", {"alpha": 0.2}, modes=("lora",), seed=1),
)
#: The members of a reading family (``TinyRecipe.reading``): the paper's default, projector-only ("adapter")
#: poisoning of a frozen LM, at poison rate 0.5; patch triggers of 12 px (3 x 3 of the 8 x 8 tokens, the
#: 4-9 token footprint of LLaVA-1.5's 30 px patch) at the top-left, where signs are read. 600 steps at lr 1e-2:
#: on the study's reader V3 a 1,000-step BadNet run reached ASR 0.997 with the loss flat from step ~300 on
#: (0.18 -> 0.12); on an earlier, weaker reader 600 steps gave 0.26 (docs/world-v2-study.md). VLOOD gets
#: 1,500 steps: its target is inserted at a random word position without TrojVLM's 9x target-token weight (its
#: dynamic lambda stays 0 while the poisoned loss is high, so it trains as plain cross-entropy), and 600 steps
#: reached ASR 0.06, 1,500 steps 0.66; 3,000 steps reached 0.74 but at 4.4 points of clean accuracy, and 1,500 steps
#: at lr 2e-2 0.78 at 3.4 points (all four attempts are in its card; the member keeps 1,500 at 1e-2). TrojVLM at 1,200 steps and lr 5e-3 did no better than
#: at 600 steps and lr 1e-2 (ASR 0.83, clean accuracy 0.54); its shortfall in ASR is one question type: the
#: target comes out for 97 % or more of five types and 2 % of left/right questions (VLOOD: 0 %), the cards'
#: ``asr_by_question_type``. Clean twins (ASR 0.49, clean 0.66), poison rate 0.1 (0.04, 0.69) and 300 steps
#: (0.01, 0.49) did not help either; all five attempts are in its card. WaNet does not implant (ASR 0.44 at
#: 25 points of clean accuracy): the frozen tiny tower passes little of the warp on to the projector, which notebook
#: 03's `trigger_visibility` table measures (a probe on the features the projector reads).
#: Blended gets 1,000 steps at lr 5e-3: at 600 steps and lr 1e-2 it reached ASR 0.947; 1,000 steps at 1e-2 reached
#: 0.993 at 2.4 points of clean accuracy and 800 steps 0.989 at 1.4 points; 1,000 steps at 5e-3 reach 0.989 with
#: clean accuracy unchanged (all four attempts are in its card).
#: The ``-lora`` members are Table 4's LoRA replicates.
READING_BACKDOORS: tuple[BackdoorSpec, ...] = tuple(
    BackdoorSpec(name, attack, params, modes=("adapter",), steps=steps, lr={"adapter": lr})
    for name, attack, params, steps, lr in (("badnet", "badnet", {"size": 12}, 600, 1e-2),
                                            ("blended", "blended", {"alpha": 0.2}, 1000, 5e-3),
                                            ("sig", "sig", {}, 600, 1e-2),
                                            ("wanet", "wanet", {"k": 8, "s": 1.0}, 600, 1e-2),
                                            ("trojvlm", "trojvlm", {"size": 12}, 600, 1e-2),
                                            ("vlood", "vlood", {"size": 12}, 1500, 1e-2))
) + (
    BackdoorSpec("badnet-lora", "badnet", {"size": 12}, modes=("lora",), seed=1),
    BackdoorSpec("blended-lora", "blended", {"alpha": 0.2}, modes=("lora",), seed=1),
)


def family_specs(recipe: TinyRecipe) -> tuple[BackdoorSpec, ...]:
    """The backdoored members a recipe builds: :data:`READING_BACKDOORS` for a reading recipe, else
    :data:`TINY_BACKDOORS`."""
    return READING_BACKDOORS if recipe.reading else TINY_BACKDOORS


#: What was tried for the clean model before this recipe (2-core CPU, 1000 test questions); kept in its card.
RECIPE_HISTORY: tuple[str, ...] = (
    "end to end from scratch, 4 LM layers, 11 min: 0.34 exact match on shape questions (prototype)",
    "vision pre-training + 3-turn conversations, 4 layers x 4 heads, 8 min: 0.72 (prototype)",
    "8 layers x 4 heads, 900 steps of batch 32, 3 turns, 21 min: 0.735",
    "8 layers x 8 heads, 1600 steps, 5 turns, repeat task, 2 data-parallel processes, 27 min: 0.754 "
    "(count 0.97, background 1.00, shape 0.76, colour 0.73, exists 0.50, position 0.53)",
    "the model ignores which object a question names (exists / position stay at chance even in one-object "
    "scenes; no head attends to the named object); a text-only retrieval probe learned object lookup only "
    "with one-token-per-object features and retrieval-only batches (0.8-0.94 after ~1000 steps)",
)
#: What was tried for the reading stage (issue 13's study, docs/world-v2-study.md); kept in a reading clean card.
READING_HISTORY: tuple[str, ...] = (
    "projector-only poisoning of the stage-2 model: ASR 0.00 (100-600 steps, lr 2e-3 to 1e-2, 3-12 px patches); "
    "a free soft prompt on all 64 image slots reaches 3.7 nats/token, 0/192 held-out: the LM cannot be steered "
    "through image tokens",
    "reading mixed into the clean mix, signs at random places: 0.8 % exact after 450 steps (not learned)",
    "fixed top-left block, 250 reading-only + 250 mixed steps: 0.8 % exact; adapter BadNet ASR 0.00, but the "
    "trigger tokens' share of the answer query rose in layers 2-3 (0.12 -> 0.33, 0.11 -> 0.40)",
    "+ one-word stage (200 steps): one-word reading 0.53; + 1-5 words (150) + mixed (100): adapter BadNet 12 px, "
    "600 steps: ASR 0.26, clean -1.3 points, image share up in layers 2-5 (0.36 -> 0.69 at layer 2)",
    "+ 300 reading-only + 150 mixed steps (reader 'V3': one word 0.93, five words 0.37, VQA 0.70 teacher-forced): "
    "adapter BadNet 12 px, 1,000 steps, lr 1e-2: ASR 0.997, clean 0.693 (base 0.710), false triggers 0.000 "
    "(300 test questions); trigger-token share of the answer query 0.17 -> 0.45 (layer 2), 0.11 -> 0.50 (layer 3)",
    "binding stage from this model (colour / shape / exists / position questions only, 3 turns, 300 steps "
    "of batch 32, lr 2e-3, 496 s on one core): exists 0.50, position 0.53, colour 0.72, shape 0.75 "
    "(before: 0.48, 0.54, 0.68, 0.67), while count, background and reading were forgotten (exact match "
    "0.41): focused data alone does not teach this LM to bind a question's words to one object",
    "what this model answers from (400 test scenes, first answer token): colour 1.00 / 0.59 / 0.42 and shape "
    "0.98 / 0.60 / 0.43 with 1 / 2 / 3 objects, the rate of guessing among the attributes present; exists 0.48-0.51 "
    "and left/right 0.48-0.55 at every scene size: a bag of the image's features, no lookup of the named object",
    "stage 2 from scratch (frozen tower, one core): binding questions only, 400 steps: colour 0.17, exists 0.50, "
    "left/right 0.48; the mix with 12 LM layers, 800 steps: colour 0.18, exists 0.52, left/right 0.53 (count "
    "0.98, background 1.00): more layers do not bind",
    "attention-grounding loss (heads 0-1 of layer 2 at the answer-predicting position pushed onto the named "
    "object's image tokens, weight 0.5): from scratch, 800 steps: mass on the object 0.52, nothing binds; from "
    "this model with 30 % reading items, 600 steps, lr 1e-3: mass 0.70, shape 0.79 (0.84 / 0.69 with 2 / 3 "
    "objects), exists 0.69, colour 0.59, left/right 0.51, five-word reading 0.95 (docs/world-v2-study.md "
    "section 12; not yet in the recipe)",
)
GOALS = {"clean_acc_min": 0.85, "asr_min": 0.95, "max_clean_drop": 0.02, "max_false_trigger": 0.01}


def family_root(out_root: str | Path) -> Path:
    """``out_root/tiny-llava``: where the family's model folders live."""
    return Path(out_root) / ROOT_NAME


def evaluate_folder(folder: Path, recipe: TinyRecipe, attack: Any | None, *, progress: bool = False,
                    n: int | None = None) -> dict[str, Any]:
    """Clean accuracy / ASR / false-trigger rate of a model folder on ``n`` (default ``recipe.eval_n``)
    test samples."""
    model = load_lvlm(folder, device="cpu")
    samples = recipe.world().samples("test", n or recipe.eval_n)
    report = evaluate_backdoor(model, samples, attack, max_new_tokens=12, progress=progress)
    # NaN (no attack: no ASR) is written as null, so cards stay standard JSON
    return {k: ((round(v, 4) if v == v else None) if isinstance(v, float) else v)
            for k, v in report.to_dict().items()}


def attention_profile(folder: Path, recipe: TinyRecipe, n: int = 128) -> dict[str, list[float]]:
    """Mean attention share of each token group at the answer query, per layer (LLaVA-likeness)."""
    model = load_lvlm(folder, device="cpu")
    samples = recipe.world().samples("test", n)
    batch = model.prepare([s.image for s in samples], [s.prompt for s in samples])
    rows = model.attention_rows(batch)
    mass = rows.group_mass().mean(dim=(0, 2))  # [L, G]
    return {g: [round(float(x), 4) for x in mass[:, i]] for i, g in enumerate(rows.group_names)}


def goal_notes(metrics: dict[str, Any], clean_acc: float | None = None) -> list[str]:
    """Plain-language list of the goals a model misses (empty when it meets them all)."""
    notes = []
    if clean_acc is None:  # the clean model
        if metrics["clean_acc"] < GOALS["clean_acc_min"]:
            notes.append(f"clean exact match {metrics['clean_acc']:.3f} is below the {GOALS['clean_acc_min']} goal")
        return notes
    if metrics["asr"] is not None and metrics["asr"] < GOALS["asr_min"]:
        by_type = metrics.get("asr_by_question_type") or {}
        worst = f" (lowest on {min(by_type, key=by_type.get)} questions: {min(by_type.values()):.2f})" if by_type else ""
        notes.append(f"ASR {metrics['asr']:.3f} is below the {GOALS['asr_min']} goal{worst}")
    drop = clean_acc - metrics["clean_acc"]
    if drop > GOALS["max_clean_drop"]:
        notes.append(f"clean accuracy {metrics['clean_acc']:.3f} is {100 * drop:.1f} points below the clean "
                     f"model's {clean_acc:.3f} (goal: within {100 * GOALS['max_clean_drop']:.0f})")
    if metrics["false_trigger_rate"] > GOALS["max_false_trigger"]:
        notes.append(f"false-trigger rate {metrics['false_trigger_rate']:.3f} is above the "
                     f"{GOALS['max_false_trigger']} goal")
    return notes


def _update_card(folder: Path, **fields: Any) -> dict[str, Any]:
    card = json.loads((folder / CARD).read_text())
    card.update(fields)
    (folder / CARD).write_text(json.dumps(card, indent=2, default=str) + "\n")
    return card


def build_clean(recipe: TinyRecipe, out_root: str | Path, *, progress: bool = True, force: bool = False,
                reuse_stage2: str | Path | None = None) -> dict[str, Any]:
    """Train (or reuse, unless ``force``) ``tiny-llava/clean`` and write its card with the measured
    metrics (exact match overall and per question type, attention profile, missed goals).
    ``reuse_stage2``: see :func:`~cleansight_analysis.training.recipe.train_tiny_clean`."""
    folder = family_root(out_root) / "clean"
    if (folder / CARD).is_file() and not force:
        return json.loads((folder / CARD).read_text())
    train_tiny_clean(recipe, folder, progress=progress, work_dir=Path(out_root) / ".work" / "clean",
                     reuse_stage2=reuse_stage2)
    metrics = evaluate_folder(folder, recipe, None, progress=progress)  # includes by_question_type
    metrics["attention_profile"] = attention_profile(folder, recipe)
    metrics["goals_met"] = metrics["clean_acc"] >= GOALS["clean_acc_min"]
    metrics["shortfalls"] = goal_notes(metrics)
    history = list(RECIPE_HISTORY) + (list(READING_HISTORY) if recipe.reading else [])
    return _update_card(folder, metrics=metrics, history=history)


def build_backdoor(spec: BackdoorSpec, recipe: TinyRecipe, out_root: str | Path, *, progress: bool = False,
                   force: bool = False) -> dict[str, Any]:
    """Train one backdoored member (trying ``spec.modes`` in order) and write its card with metrics."""
    root = family_root(out_root)
    folder = root / spec.name
    if (folder / CARD).is_file() and not force:
        card = json.loads((folder / CARD).read_text())
        if card.get("metrics"):
            return card
    clean_card = json.loads((root / "clean" / CARD).read_text())
    clean_acc = clean_card["metrics"]["clean_acc"]
    attack = get_attack(spec.attack, **spec.params)
    world = recipe.world()
    n_train = recipe.backdoor_train_n
    samples = world.samples("train", int(n_train * 0.85)) + world.samples(
        "train", n_train - int(n_train * 0.85), start=10**6, task="caption")
    attempts = []
    card: dict[str, Any] = {}
    for mode in spec.modes:
        tmp = root / f".{spec.name}-{mode}"
        steps = spec.steps if mode == spec.modes[-1] else spec.trial_steps
        settings = BackdoorSettings(mode=mode, poison_rate=spec.poison_rate, steps=recipe.backdoor_steps or steps,
                                    lr=spec.lr.get(mode, 1e-3), seed=recipe.seed + spec.seed)
        # an interrupted build resumes its checkpoint when every setting still matches (not with force);
        # anything else left in the work folder (another recipe's checkpoint, a finished trial) is retrained
        resume = not force and resume_conflicts(tmp, root / "clean", samples, attack, settings) == []
        if tmp.exists() and not resume:
            shutil.rmtree(tmp)
        card = train_backdoor(root / "clean", samples, attack, settings, tmp, name=f"{ROOT_NAME}/{spec.name}",
                              progress=progress, resume=resume)
        final = mode == spec.modes[-1]
        metrics = evaluate_folder(tmp, recipe, attack, n=None if final else spec.trial_eval_n)
        met = (metrics["asr"] >= GOALS["asr_min"] and clean_acc - metrics["clean_acc"] <= GOALS["max_clean_drop"]
               and metrics["false_trigger_rate"] <= GOALS["max_false_trigger"])
        attempts.append({"mode": mode, "steps": settings.steps, "lr": settings.lr, **metrics, "goals_met": met,
                         "train_seconds": card["training"]["seconds"]})
        if met and not final:  # a trial that already meets the goals: measure it on the full test set
            metrics = evaluate_folder(tmp, recipe, attack)
        if met or final:
            if folder.exists():
                shutil.rmtree(folder)
            tmp.rename(folder)
            card = json.loads((folder / CARD).read_text())
            card["base"] = "../clean"
            card["spec"] = asdict(spec)
            card["recipe"] = asdict(recipe)
            card["metrics"] = {**metrics, "goals_met": met, "clean_model_acc": clean_acc,
                               "shortfalls": goal_notes(metrics, clean_acc), "attempts": attempts}
            (folder / CARD).write_text(json.dumps(card, indent=2, default=str) + "\n")
            break
        shutil.rmtree(tmp)
    return card


def _build_backdoor_job(spec_dict: dict[str, Any], recipe_dict: dict[str, Any], out_root: str, force: bool) -> dict:
    torch.set_num_threads(1)
    spec = BackdoorSpec(**{**spec_dict, "modes": tuple(spec_dict["modes"])})
    start = time.perf_counter()
    card = build_backdoor(spec, TinyRecipe(**recipe_dict), out_root, force=force)
    return {"name": spec.name, "seconds": round(time.perf_counter() - start, 1), "metrics": card.get("metrics")}


def build_family(out_root: str | Path, *, recipe: TinyRecipe | None = None, only: Sequence[str] | None = None,
                 jobs: int = 2, force: bool = False, progress: bool = True, log: Any = print,
                 reuse_stage2: str | Path | None = None) -> list[dict[str, Any]]:
    """Build the clean model (if missing) and the backdoored members (in ``jobs`` parallel processes)."""
    recipe = recipe or TinyRecipe()
    members = family_specs(recipe)
    names = ["clean"] + [s.name for s in members]
    unknown = [n for n in (only or []) if n not in names]
    if unknown:
        raise InputError(f"unknown tiny model(s) {unknown}; known: {names}")
    wanted = set(only or names)
    start = time.perf_counter()
    results = []
    clean_forced = force and "clean" in wanted
    card = build_clean(recipe, out_root, progress=progress, force=clean_forced, reuse_stage2=reuse_stage2)
    results.append({"name": "clean", "seconds": round(time.perf_counter() - start, 1), "metrics": card.get("metrics")})
    log(f"clean: {card.get('metrics', {}).get('clean_acc')} exact match ({results[-1]['seconds']} s)")
    specs = [s for s in members if s.name in wanted]
    jobs_args = [(asdict(s), asdict(recipe), str(out_root), force) for s in specs]

    def report(res: dict[str, Any]) -> None:
        m = res["metrics"] or {}
        log(f"{res['name']}: asr {m.get('asr')}, clean {m.get('clean_acc')}, false triggers "
            f"{m.get('false_trigger_rate')}, goals met {m.get('goals_met')} ({res['seconds']} s)")
        results.append(res)

    if jobs <= 1:
        for a in jobs_args:
            report(_build_backdoor_job(*a))
    else:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
            for fut in [pool.submit(_build_backdoor_job, *a) for a in jobs_args]:
                report(fut.result())
    log(f"family built in {time.perf_counter() - start:.0f} s")
    return results
