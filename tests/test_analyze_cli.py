"""``cleansight analyze`` writes each analysis' tables with manifests (tiny random LLaVA, 3 samples)."""

from __future__ import annotations

import pytest

from cleansight_analysis import cli
from cleansight_analysis.results import load_manifest, load_table

COMMON = ["--model", "tiny-random-llava", "--attack", "badnet", "--n", "3", "--layers", "0,1",
          "--max-new-tokens", "4", "--format", "csv"]


@pytest.mark.parametrize("analysis, extra, tables", [
    ("stealing", [], ["stealing", "separability_layers", "separability_heads", "thief_tokens"]),
    ("perturb", ["--kinds", "noise,attn_uniform", "--intensities", "0,1"], ["perturb"]),
    ("heads", [], ["heads", "patching"]),
    ("logit-lens", ["--intervention", "attn_uniform:1"], ["logit_lens"]),
])
def test_analyze_writes_tables_and_manifests(tmp_path, analysis, extra, tables):
    out = tmp_path / analysis
    assert cli.main(["analyze", analysis, *COMMON, "--out", str(out), *extra]) == 0
    for name in tables:
        df = load_table(out / f"{name}.csv")
        assert len(df) > 0, name
        manifest = load_manifest(out / f"{name}.csv")
        assert manifest["attack"]["name"] == "badnet"
        assert manifest["model_source"] == "tiny-random-llava" and manifest["rows"] == len(df)
    if analysis == "stealing":
        df = load_table(out / "stealing.csv")
        assert set(df["condition"]) == {"clean", "triggered"} and set(df["layer"]) == {0, 1}
        assert len(df) == 2 * 3 * 2 * 4  # conditions x samples x layers x heads
    if analysis == "perturb":
        df = load_table(out / "perturb.csv")
        assert list(df["kind"]) == ["none", "noise", "attn_uniform"]
    if analysis == "heads":
        df = load_table(out / "heads.csv")
        assert len(df) == 1 + 2 * 4  # baseline + each head of layers 0 and 1


def test_analyze_without_an_attack_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["analyze", "stealing", "--model", "tiny-random-llava", "--n", "2", "--out", str(tmp_path)]) == 2
    assert "--attack" in capsys.readouterr().err


def test_trigger_image_flag_reaches_custom_and_patch_attacks(tmp_path):
    """--trigger-image is the custom attack's trigger and a patch attack's pattern."""
    import argparse

    from PIL import Image

    path = tmp_path / "trigger.png"
    Image.new("RGB", (8, 8), (255, 0, 255)).save(path)
    for name, key in (("custom", "trigger"), ("badnet", "pattern")):
        args = argparse.Namespace(attack=name, trigger_image=str(path), location="top-left", alpha=None, size=None,
                                  target=None)
        attack = cli._attack_from_args(args)
        assert attack.name == name and str(attack.to_dict()[key]) == str(path)
