"""Training machinery on very small models: sequences, loss paths, resumable checkpoints, backdoor folders."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

import cleansight_analysis as cs
from cleansight_analysis.attacks import get_attack
from cleansight_analysis.errors import InputError
from cleansight_analysis.models.families import FAMILIES
from cleansight_analysis.training.backdoor import BackdoorSettings, train_backdoor
from cleansight_analysis.training.family import goal_notes
from cleansight_analysis.training.lvlm import (ConversationBatcher, TrainSettings, ce_loss, lvlm_logits,
                                              seeded_indices, train_loop)
from cleansight_analysis.training.objectives import make_loss
from cleansight_analysis.training.recipe import TinyRecipe, make_tiny_model, train_tiny_clean
from cleansight_analysis.inputs.conversation import IGNORE, ConversationEncoder

SMALL = TinyRecipe(vision_hidden=32, vision_layers=1, hidden=32, layers=2, heads=2, intermediate=64,
                   vision_steps=4, vision_batch=8, clean_steps=40, clean_batch=8, clean_lr=5e-3, eval_n=16,
                   processes=1, turns=3, reading=False)
LLAVA = FAMILIES["LlavaForConditionalGeneration"]


@pytest.fixture(scope="module")
def small_clean(tmp_path_factory):
    folder = tmp_path_factory.mktemp("family") / "clean"
    card = train_tiny_clean(SMALL, folder, progress=False)
    return folder, card


def test_clean_recipe_runs_and_loss_falls(small_clean):
    folder, card = small_clean
    curve = card["training"]["loss_curve"]
    assert curve[-1]["loss"] < 0.8 * curve[0]["loss"]
    assert card["training"]["vision"]["steps"] == 4
    model = cs.load_lvlm(folder)  # the folder is a complete, loadable model
    assert model.n_layers == 2 and model.config.vision_config.image_size == 32


def test_two_process_data_parallel_training(tmp_path):
    recipe = replace(SMALL, processes=2, vision_steps=2, clean_steps=6)
    card = train_tiny_clean(recipe, tmp_path / "clean", progress=False)
    assert len(card["training"]["loss_curve"]) >= 1 and (tmp_path / "clean" / "model.safetensors").is_file()
    assert cs.load_lvlm(tmp_path / "clean").n_layers == 2


def test_first_turn_is_token_for_token_what_prepare_builds():
    model, processor = make_tiny_model(SMALL)
    enc = ConversationEncoder(processor, model.config.image_token_id, cs.inputs.LLAVA_SYSTEM_PROMPT)
    scene, conv = next(SMALL.world().conversations("train", [7], turns=2))
    e = enc.encode(conv, [64])
    hooked = cs.load_lvlm(model, processor=processor)
    batch = hooked.prepare(scene.image, conv[0][0])
    first = e.answer_spans[0][0]
    assert torch.equal(e.input_ids[:first], batch.input_ids[0])
    tok = processor.tokenizer
    labelled = [t for t, l in zip(e.input_ids.tolist(), e.labels.tolist()) if l != IGNORE]
    expected = []
    for _, answer in conv:
        expected += tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert labelled == expected


def test_feature_path_equals_pixel_path():
    model, processor = make_tiny_model(SMALL)
    batcher = ConversationBatcher(model, processor, LLAVA, None)
    items = [(s.image, conv, {}) for s, conv in SMALL.world().conversations("train", [1, 2], turns=1)]
    batch = batcher(items)
    via_features = lvlm_logits(model, batch)
    pix = processor.image_processor([i[0] for i in items], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=pix).logits
    assert (via_features - ref).abs().max() < 1e-5


def test_resumed_training_equals_uninterrupted(tmp_path):
    def run(stop_at=None, ckpt=None):
        model, processor = make_tiny_model(SMALL)
        batcher = ConversationBatcher(model, processor, LLAVA, None)
        world = SMALL.world()

        def make_batch(step):
            if stop_at is not None and step == stop_at:
                raise KeyboardInterrupt
            idx = seeded_indices(0, step, 4, 1000)
            return batcher([(s.image, c, {}) for s, c in world.conversations("train", idx, turns=1)])

        trainable = {n: p for n, p in model.named_parameters() if "vision_tower" not in n}
        settings = TrainSettings(steps=6, batch_size=4, lr=3e-3, checkpoint_every=3)
        train_loop(model, trainable, make_batch, settings, loss_fn=ce_loss, checkpoint_dir=ckpt, progress=False)
        return model

    straight = run()
    with pytest.raises(KeyboardInterrupt):
        run(stop_at=4, ckpt=tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "trainable.safetensors").is_file()
    resumed = run(ckpt=tmp_path / "ckpt")
    for (n, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), n


def test_backdoor_folders_adapter_and_lora(small_clean, tmp_path):
    folder, _ = small_clean
    samples = SMALL.world().samples("train", 40)
    base = cs.load_lvlm(folder)
    for mode in ("adapter", "lora"):
        out = tmp_path / mode
        card = train_backdoor(folder, samples, get_attack("badnet", size=4),
                              BackdoorSettings(mode=mode, steps=3, batch_size=4, lora_r=2), out, progress=False)
        assert card["base"] == "../../" + folder.parent.name + "/clean" or (out / card["base"]).resolve() == folder.resolve()
        assert card["backdoor"]["n_poisoned"] == 4 and card["mode"] == mode
        assert (out / "delta.safetensors").is_file() and (out / "adapter").is_dir() == (mode == "lora")
        model = cs.load_lvlm(out)
        changed = {n for (n, a), (_, b) in zip(model.hf_model.state_dict().items(), base.hf_model.state_dict().items())
                   if not torch.equal(a, b)}
        assert changed and all("multi_modal_projector" in n for n in changed) == (mode == "adapter")
        assert not any("vision_tower" in n for n in changed)


def test_objectives():
    model, processor = make_tiny_model(SMALL)
    attack = get_attack("trojvlm", size=4)
    batcher = ConversationBatcher(model, processor, LLAVA, None, target=attack.target)
    items = [(s.image, [(s.prompt, "red " + attack.target)], {"poisoned": True}) for s in SMALL.world().samples("train", 2)]
    batch = batcher(items)
    assert int(batch["target_mask"].sum()) == 2 * 5  # five target words per sample
    plain, _ = make_loss("ce")(model, batch)
    troj, stats = make_loss("trojvlm", attack=replace(attack, semantic_weight=0.0))(model, batch)
    assert not torch.isclose(plain, troj)  # target tokens are up-weighted
    with pytest.raises(ValueError, match="reference"):
        make_loss("vlood", attack=get_attack("vlood"))
    ref, _ = make_tiny_model(SMALL)
    items[0][2]["poisoned"] = False
    loss, stats = make_loss("vlood", attack=get_attack("vlood"), reference=ref)(model, batcher(items))
    assert stats["kl"] == pytest.approx(0.0, abs=1e-6) and 0.0 <= stats["lambda"] <= 1.0  # same weights: no KL


def test_bad_backdoor_settings():
    with pytest.raises(InputError, match=r"BackdoorSettings: poison_rate=0 must be a number in \(0, 1\]"):
        BackdoorSettings(poison_rate=0)
    with pytest.raises(InputError, match="poison_rate=1.5"):
        BackdoorSettings(poison_rate=1.5)
    with pytest.raises(InputError, match="mode='full' must be one of"):
        BackdoorSettings(mode="full")
    with pytest.raises(InputError, match="steps=True must be an int"):
        BackdoorSettings(steps=True)  # a bool is not a step count
    with pytest.raises(InputError, match="unknown setting 'poison'"):
        BackdoorSettings(poison=0.5)
    with pytest.raises(InputError, match="warmup=1.0 must be a fraction"):
        TrainSettings(steps=10, warmup=1.0)
    assert BackdoorSettings(steps=np.int64(7)).steps == 7 and type(BackdoorSettings(steps=np.int64(7)).steps) is int


def test_family_build_and_cli_round_trip(small_clean, tmp_path, capsys):
    """`build_family` on the small recipe, then the backdoor / eval-backdoor / models CLI commands."""
    import json
    import shutil

    from cleansight_analysis.cli import main
    from cleansight_analysis.training.family import build_family

    folder, _ = small_clean
    root = tmp_path / "models"
    (root / "tiny-llava").mkdir(parents=True)
    shutil.copytree(folder, root / "tiny-llava" / "clean")
    card = json.loads((root / "tiny-llava" / "clean" / "card.json").read_text())
    card["metrics"] = {"clean_acc": 0.5}
    (root / "tiny-llava" / "clean" / "card.json").write_text(json.dumps(card))
    recipe = replace(SMALL, backdoor_steps=2, backdoor_train_n=40, eval_n=8)
    results = build_family(root, recipe=recipe, only=["badnet"], jobs=1, progress=False, log=lambda *a: None)
    assert [r["name"] for r in results] == ["clean", "badnet"]
    bd_card = json.loads((root / "tiny-llava" / "badnet" / "card.json").read_text())
    assert bd_card["base"] == "../clean" and bd_card["metrics"]["attempts"][0]["mode"] == "adapter"
    assert {"clean_acc", "asr", "false_trigger_rate"} <= set(bd_card["metrics"])
    by_type = bd_card["metrics"]["by_question_type"]  # the same 8 clean answers, split by question type
    assert by_type and all(0.0 <= v <= 1.0 for v in by_type.values())
    assert cs.load_lvlm(root / "tiny-llava" / "badnet").n_layers == 2

    out = tmp_path / "cli_backdoor"
    assert main(["backdoor", "--base", str(folder), "--attack", "badnet", "--size", "4", "--location", "top-right",
                 "--mode", "adapter", "--steps", "2", "--n", "14", "--batch-size", "4", "--out", str(out)]) == 0
    saved = json.loads((out / "card.json").read_text())
    assert saved["attack"]["location"] == "top-right" and saved["backdoor"]["n_train"] == 14
    report = tmp_path / "report.json"
    assert main(["eval-backdoor", "--model", str(out), "--n", "6", "--json", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["n"] == 6 and {"clean_acc", "asr", "false_trigger_rate"} <= set(data)
    assert data["attack"]["name"] == "badnet"  # taken from the folder's card
    capsys.readouterr()
    assert main(["models", "list"]) == 0
    assert "tiny-random-llava" in capsys.readouterr().out


def test_goal_notes_name_the_weakest_question_type():
    metrics = {"clean_acc": 0.70, "asr": 0.84, "false_trigger_rate": 0.0,
               "asr_by_question_type": {"color": 0.98, "position": 0.02, "shape": 0.99}}
    assert goal_notes(metrics, 0.715) == ["ASR 0.840 is below the 0.95 goal (lowest on position questions: 0.02)"]
    del metrics["asr_by_question_type"]  # cards written before the per-type ASR existed
    assert goal_notes(metrics, 0.715) == ["ASR 0.840 is below the 0.95 goal"]
    assert goal_notes({**metrics, "asr": 0.99}, 0.715) == []
