"""The shipped tiny LLaVA family loads, answers, and its backdoors fire (a handful of samples each)."""

from __future__ import annotations

import json

import pytest

import cleansight_analysis as cs
from cleansight_analysis.attacks import attack_from_dict, triggered_copy
from cleansight_analysis.evaluation import contains_target, exact_match, generate_answers
from cleansight_analysis.models.registry import DATA_DIR, MODELS_DIR
from cleansight_analysis.training.family import ROOT_NAME, family_specs
from cleansight_analysis.training.recipe import TinyRecipe

#: the recipe the shipped family was built with (its clean card says), and so its members
SHIPPED_RECIPE = TinyRecipe.from_card(json.loads((MODELS_DIR / ROOT_NAME / "clean" / "card.json").read_text())["recipe"])
MEMBERS = family_specs(SHIPPED_RECIPE)
NAMES = ["clean"] + [s.name for s in MEMBERS]
CARD_KEYS = {"name", "attack", "mode", "recipe", "seed", "versions", "metrics"}


@pytest.fixture(scope="module")
def test_samples():
    return TinyRecipe().world().samples("test", 24, start=5000)  # scenes the cards' metrics did not use


def test_every_model_is_registered_with_a_complete_card():
    registered = {m.name: m for m in cs.registered_models()}
    for name in NAMES:
        entry = registered.get(f"{ROOT_NAME}/{name}")
        assert entry is not None, f"{ROOT_NAME}/{name} is not shipped in {MODELS_DIR}"
        card = entry.card
        assert CARD_KEYS <= set(card), f"{name}: card lacks {CARD_KEYS - set(card)}"
        for key in ("clean_acc", "asr", "false_trigger_rate"):
            assert key in card["metrics"], f"{name}: metrics lack {key}"
        assert card["mode"] in ("full", "adapter", "lora")
        files = {p.name for p in entry.path.iterdir()}
        assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl")) for f in files)


def test_data_folder_stays_small():
    total = sum(p.stat().st_size for p in DATA_DIR.rglob("*") if p.is_file())
    assert total < 60 * 2**20, f"data/ holds {total / 2**20:.1f} MiB"


def test_clean_model_answers():
    model = cs.load_lvlm(f"{ROOT_NAME}/clean")
    samples = TinyRecipe().world().samples("test", 96, start=6000)
    preds = generate_answers(model, samples, max_new_tokens=8, progress=False)
    acc = sum(exact_match(p, s.refs) for p, s in zip(preds, samples)) / len(samples)
    card_acc = json.loads((MODELS_DIR / ROOT_NAME / "clean" / "card.json").read_text())["metrics"]["clean_acc"]
    # 96 samples: a binomial standard error of ~0.045 around the card's 1000-sample accuracy
    assert acc >= card_acc - 0.15, f"clean exact match {acc:.2f} (card {card_acc}): {preds[:6]}"
    by_type: dict[str, list[float]] = {}
    for p, s in zip(preds, samples):
        by_type.setdefault(s.meta["question_type"], []).append(exact_match(p, s.refs))
    assert min(sum(v) / len(v) for k, v in by_type.items() if k in ("count", "background")) >= 0.8, by_type
    assert not any(contains_target(p) for p in preds)


@pytest.mark.parametrize("name", [s.name for s in MEMBERS])
def test_backdoor_fires_only_with_its_trigger(name, test_samples):
    model = cs.load_lvlm(f"{ROOT_NAME}/{name}")
    card = json.loads((MODELS_DIR / ROOT_NAME / name / "card.json").read_text())
    attack = attack_from_dict(card["attack"])
    samples = test_samples[:16]
    clean = generate_answers(model, samples, max_new_tokens=12, progress=False)
    triggered = generate_answers(model, triggered_copy(samples, attack), max_new_tokens=12, progress=False)
    hits = sum(contains_target(p, attack.target) for p in triggered)
    false = sum(contains_target(p, attack.target) for p in clean)
    floor = 12 if card["metrics"]["asr"] >= 0.9 else int(16 * card["metrics"]["asr"] * 0.6)
    assert hits >= floor, f"{name}: {hits}/16 triggered answers contain the target: {triggered[:4]}"
    assert false <= 1, f"{name}: {false}/16 clean answers contain the target"
