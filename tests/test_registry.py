"""The one registry pattern (attacks, defenses, perturbations, models), hook names and the final norm."""

from __future__ import annotations

import pytest
import torch

from cleansight_analysis.attacks import ATTACKS, get_attack
from cleansight_analysis.defenses import available_defenses, get_defense
from cleansight_analysis.defenses.base import DEFENSES
from cleansight_analysis.errors import AttackError, InputError, ModelSourceError
from cleansight_analysis.interventions.perturbations import PERTURBATIONS, PERTURBATION_KINDS, perturbation_class
from cleansight_analysis.models import hooknames, registry as model_registry
from cleansight_analysis.registry import Registry


def test_register_three_ways_and_lookup():
    reg: Registry = Registry("widget", aliases={"w": "wheel"})

    @reg.register
    class Wheel:
        name = "wheel"

    @reg.register("gear")
    class Gear:
        pass

    assert reg.register("bolt", 3) == 3
    assert reg.names() == ("wheel", "gear", "bolt") and list(reg) == ["wheel", "gear", "bolt"]
    assert reg.get(" Wheel ") is Wheel and reg.get("W") is Wheel and reg.get("gear") is Gear
    assert reg.get("nut", None) is None and "gear" in reg and "nut" not in reg
    with pytest.raises(InputError, match=r"unknown widget 'nut'; known widgets: wheel, gear, bolt"):
        reg.get("nut")
    with pytest.raises(InputError, match="widget name must be a string, got int"):
        reg.get(3)
    with pytest.raises(InputError, match="already registered"):
        reg.register("gear", 1)
    reg.register("gear", 1, overwrite=True)
    copy = reg.copy()
    copy.register("nut", 4)
    assert "nut" in copy and "nut" not in reg


def test_every_registry_is_a_registry():
    assert isinstance(ATTACKS, Registry) and isinstance(DEFENSES, Registry) and isinstance(PERTURBATIONS, Registry)
    assert isinstance(model_registry._REGISTRY, Registry)
    assert PERTURBATIONS.names() == PERTURBATION_KINDS
    assert perturbation_class("BLUR") is PERTURBATIONS["blur"]
    assert available_defenses()[:3] == ("none", "cleansight", "blur")
    assert get_defense("jpeg").to_dict()["name"] == "jpeg"
    with pytest.raises(InputError, match="unknown defense 'nope'; known defenses: none, cleansight"):
        get_defense("nope")
    with pytest.raises(AttackError, match="is not available"):
        get_attack("issba")
    assert get_attack("BadNets").name == "badnet"  # alias, case-insensitive
    with pytest.raises(ModelSourceError, match="already registered"):
        model_registry.register_model("tiny-random-llava", lambda: None)


def test_hook_names_are_hook_points_of_the_bridge(llava):
    names = [hooknames.hook_pattern(1), hooknames.hook_attn_scores(1), hooknames.hook_z(1),
             hooknames.hook_resid_post(1), hooknames.hook_block_out(1), hooknames.EMBED_IN,
             hooknames.FINAL_NORM_OUT, hooknames.UNEMBED_OUT]
    assert [n for n in names if n not in llava.bridge.hook_dict] == []
    assert llava.hook_name(2, "z") == hooknames.hook_z(2) == "blocks.2.attn.hook_z"


@pytest.mark.parametrize("fixture", ["llava", "llava_next"])
def test_final_norm_is_the_family_one(fixture, request):
    model = request.getfixturevalue(fixture)
    x = torch.randn(2, 3, model.text_config.hidden_size, dtype=model.dtype)
    family_norm = model.family.final_norm(model.hf_model)
    torch.testing.assert_close(model.final_norm(x), family_norm(x), rtol=0, atol=0)
    assert model.unembedding(model.final_norm(x)).shape[-1] == model.hf_model.get_output_embeddings().out_features
