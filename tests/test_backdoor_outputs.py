"""``train_backdoor``'s output folder: refused unless overwrite / resume, never the base, resume only as started.

A tiny random LLaVA saved to disk is the base and every run is 3-5 optimizer steps (about a second).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import cleansight_analysis as cs
from cleansight_analysis.attacks import get_attack
from cleansight_analysis.errors import InputError, OutputExistsError
from cleansight_analysis.models import registry
from cleansight_analysis.training import backdoor as backdoor_module
from cleansight_analysis.training.backdoor import BackdoorSettings, train_backdoor
from cleansight_analysis.training.checkpoint import load_checkpoint, save_checkpoint
from cleansight_analysis.training.recipe import TinyRecipe, make_tiny_model, save_model_folder

TINY = TinyRecipe(vision_hidden=32, vision_layers=1, hidden=32, layers=2, heads=2, intermediate=64, processes=1,
                  eval_n=4)
BADNET = get_attack("badnet", size=4)


def settings(**kw) -> BackdoorSettings:
    return BackdoorSettings(**{"mode": "adapter", "steps": 3, "batch_size": 4, "lora_r": 2, "lora_alpha": 4,
                               "poison_rate": 0.5, **kw})


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A full model folder (random weights, the tiny recipe's shape) used as the clean base."""
    model, processor = make_tiny_model(TINY)
    folder = tmp_path_factory.mktemp("base") / "clean"
    save_model_folder(model, processor, folder, {"name": "outputs-test/clean", "attack": None, "mode": "full",
                                                 "metrics": {"clean_acc": 0.5}})
    return folder


@pytest.fixture(scope="module")
def samples():
    return TINY.world().samples("train", 16)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def interrupt_at(monkeypatch, stop: int) -> None:
    """Make the next backdoor run die (like Ctrl-C) when it asks for step ``stop``'s batch."""
    real = backdoor_module.seeded_indices

    def indices(seed, step, batch_size, population):
        if step == stop:
            raise KeyboardInterrupt
        return real(seed, step, batch_size, population)

    monkeypatch.setattr(backdoor_module, "seeded_indices", indices)


def logits(folder: Path, samples) -> torch.Tensor:
    model = cs.load_lvlm(folder, device="cpu")
    batch = model.prepare([s.image for s in samples[:2]], [s.prompt for s in samples[:2]])
    with torch.no_grad():
        return model.forward(batch)


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {f"delta/{k}": v for k, v in load_file(str(folder / "delta.safetensors")).items()}
    if (folder / "adapter").is_dir():
        out.update({f"adapter/{k}": v for k, v in load_file(str(folder / "adapter" / "adapter_model.safetensors")).items()})
    return out


def assert_same_model(a: Path, b: Path, samples) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    assert torch.equal(logits(a, samples), logits(b, samples))


def test_existing_folders_are_refused_and_left_untouched(base, samples, tmp_path):
    # a full model folder with a long card (the measured case: its card.json was replaced)
    model_folder = tmp_path / "other-model"
    shutil.copytree(base, model_folder)
    (model_folder / "card.json").write_text(json.dumps({"name": "other", "metrics": {"history": list(range(3000))}}))
    before = snapshot(model_folder)
    with pytest.raises(OutputExistsError, match="already exists and is not empty") as err:
        train_backdoor(base, samples, BADNET, settings(), model_folder, progress=False)
    message = str(err.value)
    assert "\n" not in message and str(model_folder) in message and "--overwrite" in message and "--resume" in message
    # overwrite replaces only a previous backdoor's outputs, never a model's own files
    with pytest.raises(OutputExistsError, match="did not write .*config.json"):
        train_backdoor(base, samples, BADNET, settings(), model_folder, progress=False, overwrite=True)
    assert snapshot(model_folder) == before

    card_only = tmp_path / "card-only"
    card_only.mkdir()
    (card_only / "card.json").write_text('{"name": "kept"}\n')
    with pytest.raises(OutputExistsError, match="not empty"):
        train_backdoor(base, samples, BADNET, settings(), card_only, progress=False)
    assert (card_only / "card.json").read_bytes() == b'{"name": "kept"}\n'

    empty = tmp_path / "empty"
    empty.mkdir()
    train_backdoor(base, samples, BADNET, settings(steps=1), empty, progress=False)  # an empty folder is fine
    assert (empty / "card.json").is_file()


def test_the_base_is_never_the_output(base, samples, tmp_path, monkeypatch):
    before = snapshot(base)
    for flags in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(OutputExistsError, match="is the base model's folder"):
            train_backdoor(base, samples, BADNET, settings(), base, progress=False, **flags)
    with pytest.raises(OutputExistsError, match="holds the base model's folder"):  # a folder above the base
        train_backdoor(base, samples, BADNET, settings(), base.parent, progress=False, overwrite=True)
    # a registry name resolving to the folder
    monkeypatch.setitem(registry._REGISTRY, "outputs-test/clean",
                        registry.RegisteredModel("outputs-test/clean", "", path=base))
    with pytest.raises(OutputExistsError, match="is the base model's folder"):
        train_backdoor("outputs-test/clean", samples, BADNET, settings(), base, progress=False, overwrite=True)
    # a delta folder as base: the full model it is built on is protected too
    delta = tmp_path / "delta"
    train_backdoor(base, samples, BADNET, settings(steps=1), delta, progress=False)
    with pytest.raises(OutputExistsError, match="is the base model's folder"):
        train_backdoor(delta, samples, BADNET, settings(), base, progress=False, overwrite=True)
    assert snapshot(base) == before


def test_overwrite_removes_the_old_adapter(base, samples, tmp_path):
    out = tmp_path / "out"
    train_backdoor(base, samples, BADNET, settings(mode="lora"), out, progress=False)
    assert (out / "adapter").is_dir()
    with pytest.raises(OutputExistsError):
        train_backdoor(base, samples, BADNET, settings(), out, progress=False)
    card = train_backdoor(base, samples, BADNET, settings(), out, progress=False, overwrite=True)
    assert card["mode"] == "adapter" and not (out / "adapter").exists()
    fresh = tmp_path / "fresh"
    train_backdoor(base, samples, BADNET, settings(), fresh, progress=False)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in fresh.iterdir())
    assert_same_model(out, fresh, samples)


@pytest.fixture
def interrupted(base, samples, tmp_path, monkeypatch):
    """A LoRA run of 5 steps killed at step 3; its checkpoint (step 2) is in ``out/.checkpoint``."""
    out = tmp_path / "interrupted"
    run = settings(mode="lora", steps=5, checkpoint_every=2)
    interrupt_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        train_backdoor(base, samples, BADNET, run, out, progress=False)
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == [".checkpoint"]
    return out, run


def test_resume_refuses_other_settings(base, samples, interrupted):
    out, run = interrupted
    state = (out / ".checkpoint" / "state.json").read_bytes()
    with pytest.raises(OutputExistsError, match=r"not empty \(\.checkpoint\)"):  # no flag: refused like any folder
        train_backdoor(base, samples, BADNET, run, out, progress=False)

    with pytest.raises(OutputExistsError) as err:
        train_backdoor(base, samples, get_attack("blended"), replace(run, lr=1e-2), out, progress=False, resume=True)
    message = str(err.value)
    assert "\n" not in message and "--overwrite" in message
    assert "lr: checkpoint 0.002, now 0.01" in message and "attack: checkpoint badnet, now blended" in message
    assert "mode" not in message and "steps" not in message  # only what differs

    with pytest.raises(OutputExistsError, match="attack.size: checkpoint 4, now 6"):
        train_backdoor(base, samples, get_attack("badnet", size=6), run, out, progress=False, resume=True)
    with pytest.raises(OutputExistsError, match=r"steps: checkpoint 5, now 8; batch_size: checkpoint 4, now 2; "
                                                r"lora_r: checkpoint 2, now 3; lora_alpha: checkpoint 4, now 6; "
                                                r"seed: checkpoint 0, now 1"):
        train_backdoor(base, samples, BADNET, replace(run, steps=8, batch_size=2, lora_r=3, lora_alpha=6, seed=1),
                       out, progress=False, resume=True)
    with pytest.raises(OutputExistsError, match="poison_rate: checkpoint 0.5, now 0.25; clean_twin: checkpoint "
                                                "false, now true"):
        train_backdoor(base, samples, BADNET, replace(run, poison_rate=0.25, clean_twin=True), out, progress=False,
                       resume=True)
    with pytest.raises(OutputExistsError, match="training samples: checkpoint 16 .*, now 16 "):  # same count, others
        train_backdoor(base, TINY.world().samples("train", 16, start=100), BADNET, run, out, progress=False,
                       resume=True)
    other_base = out.parent / "other-base"
    shutil.copytree(base, other_base)
    (other_base / "card.json").write_text('{"name": "retrained"}\n')
    with pytest.raises(OutputExistsError, match="base model: checkpoint .*clean .*, now .*other-base"):
        train_backdoor(other_base, samples, BADNET, run, out, progress=False, resume=True)
    with pytest.raises(InputError, match="exclude each other"):
        train_backdoor(base, samples, BADNET, run, out, progress=False, resume=True, overwrite=True)
    assert (out / ".checkpoint" / "state.json").read_bytes() == state  # every refusal left the checkpoint alone


def test_resume_with_another_mode_is_a_clear_error(base, samples, interrupted):
    out, run = interrupted
    with pytest.raises(OutputExistsError, match="mode: checkpoint lora, now adapter"):
        train_backdoor(base, samples, BADNET, replace(run, mode="adapter"), out, progress=False, resume=True)


def test_checkpoint_of_other_parameters_is_an_input_error(tmp_path):
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(a.parameters())
    save_checkpoint(tmp_path / "ckpt", dict(a.named_parameters()), opt, None, 1, {})
    named = {"lora_A.weight": b.weight}
    with pytest.raises(InputError, match="1 missing.*2 unexpected"):
        load_checkpoint(tmp_path / "ckpt", named, torch.optim.AdamW(named.values()), None)


def test_resume_without_checkpoint_is_refused(base, samples, tmp_path):
    with pytest.raises(InputError, match="nothing to resume"):
        train_backdoor(base, samples, BADNET, settings(), tmp_path / "new", progress=False, resume=True)


def test_resumed_run_equals_uninterrupted(base, samples, interrupted, tmp_path):
    out, run = interrupted
    card = train_backdoor(base, samples, BADNET, replace(run, checkpoint_every=0), out, progress=False, resume=True)
    assert card["training"]["resumed_from_step"] == 2 and not (out / ".checkpoint").exists()
    straight = tmp_path / "straight"
    torch.manual_seed(1234)  # another global RNG state: the LoRA initialisation must follow settings.seed alone
    assert train_backdoor(base, samples, BADNET, run, straight, progress=False)["training"]["resumed_from_step"] == 0
    assert_same_model(out, straight, samples)  # bit for bit (same process, LoRA initialised from the seed)


def test_tiny_build_resumes_an_interrupted_member(base, tmp_path, monkeypatch):
    from cleansight_analysis.training import family as family_module
    from cleansight_analysis.training.family import BackdoorSpec, build_backdoor, family_root

    root = family_root(tmp_path)
    root.mkdir(parents=True)
    shutil.copytree(base, root / "clean")
    recipe = replace(TINY, backdoor_steps=4, backdoor_train_n=16)
    spec = BackdoorSpec("badnet", "badnet", {"size": 4}, modes=("adapter",))
    real_settings = backdoor_module.BackdoorSettings
    monkeypatch.setattr(family_module, "BackdoorSettings", lambda **kw: real_settings(**{"checkpoint_every": 1, **kw}))
    interrupt_at(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        build_backdoor(spec, recipe, tmp_path)
    assert (root / ".badnet-adapter" / ".checkpoint").is_dir()
    monkeypatch.undo()
    monkeypatch.setattr(family_module, "BackdoorSettings", lambda **kw: real_settings(**{"checkpoint_every": 1, **kw}))
    card = build_backdoor(spec, recipe, tmp_path)
    assert card["training"]["resumed_from_step"] == 2 and card["metrics"]["attempts"][0]["mode"] == "adapter"
    assert not (root / ".badnet-adapter").exists() and (root / "badnet" / "delta.safetensors").is_file()

    interrupt_at(monkeypatch, 2)  # --force retrains from the start, even over an interrupted run
    with pytest.raises(KeyboardInterrupt):
        build_backdoor(spec, recipe, tmp_path, force=True)
    monkeypatch.undo()
    card = build_backdoor(spec, recipe, tmp_path, force=True)
    assert card["training"]["resumed_from_step"] == 0
