"""Fig. 1 (pixel vs attention perturbation) and Fig. 2 (attention stealing): experiments and plots."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cleansight_analysis.errors import InputError
from cleansight_analysis.experiments import FigureContext
from cleansight_analysis.experiments import perturbation as xp
from cleansight_analysis.experiments import stealing as xs
from cleansight_analysis.plotting import perturbation as pp
from cleansight_analysis.plotting import stealing as ps


class FakeLVLM:
    """An 8-layer model as far as layer checking goes."""

    def check_layers(self, layers):
        return [int(x) % 8 for x in layers]


class FakeCtx:
    """Just what the experiment functions use, with a pass-through cache that records its calls."""

    def __init__(self, attacks=("badnet",), smoke=False, n=4, seed=7):
        self.attacks, self.smoke, self.n, self.seed = list(attacks), smoke, n, seed
        self.cache_calls = []

    def count(self, n=None):
        return self.n

    def load(self, attack):
        return FakeLVLM(), f"attack:{attack}", {}

    def samples(self, split="test", n=None):
        return [f"s{i}" for i in range(n or self.n)]

    def cached(self, name, compute, **params):
        self.cache_calls.append((name, params))
        return compute()


# ------------------------------------------------------------------------------------- hand-made tables
def shares_table(rises=None, n_samples=3, n_layers=4, attacks=("badnet",)):
    """Clean image share 0.2 everywhere; triggered adds ``rises[layer]``; the rest split prompt/system/tail."""
    rises = rises or {2: 0.3}
    rows = []
    for attack in attacks:
        for cond in ("clean", "triggered", "triggered + ST 0.5"):
            for s in range(n_samples):
                for layer in range(n_layers):
                    img = 0.2 + (rises.get(layer, 0.0) if cond == "triggered" else 0.0) + 0.01 * s
                    rest = 1.0 - img
                    rows.append({"attack": attack, "condition": cond, "sample_id": f"id{s}", "layer": layer,
                                 "share_system": 0.5 * rest, "share_image": img, "share_prompt": 0.4 * rest,
                                 "share_template_tail": 0.1 * rest})
    return pd.DataFrame(rows)


def sweep_table(attacks=("badnet", "blended")):
    rows = []
    for attack in attacks:
        for variant, asr_at_1 in (("pixel ST", 0.9), ("attention, text queries (paper)", 0.8),
                                  ("attention, all queries (ours)", 0.1)):
            for level in (0.0, 0.5, 1.0):
                asr = 1.0 + (asr_at_1 - 1.0) * level
                rows.append({"attack": attack, "variant": variant, "kind": "x", "domain": "x", "queries": "-",
                             "intensity": level, "asr": asr, "clean_acc": 0.75 - 0.2 * level, "poisoned_acc": 0.0,
                             "n": 16})
    return pd.DataFrame(rows)


def thumbs_table(levels=(0.0, 0.5, 1.0)):
    return pd.DataFrame([{"attack": "badnet", "sample_id": "id0", "intensity": v, "shrink_scale": 1 - 0.2 * v,
                          "angle_deg": 30 * v, "image": json.dumps(np.full((6, 6, 3), 100 + int(50 * v)).tolist())}
                         for v in levels])


def thief_and_examples(attacks=("badnet", "blended"), layer=3, n_layers=4):
    grid = np.zeros((4, 4), dtype=np.float32)
    grid[0, 0] = 1.0
    cells = np.zeros((4, 4), dtype=bool)
    cells[0, :2] = True
    thief, examples = [], []
    for attack in attacks:
        patch = attack == "badnet"
        for cond in ("triggered", "clean"):
            for lay in range(n_layers):
                thief.append({"attack": attack, "condition": cond, "layer": lay, "n": 8,
                              "top1_hit_rate": (0.75 if cond == "triggered" else 0.125) if patch else np.nan,
                              "topk_hit_rate": 1.0 if patch else np.nan, "trigger_share": 0.4 if patch else np.nan,
                              "chance_share": 2 / 16 if patch else np.nan, "top1_share": 0.5, "k": 5,
                              "example_id": "id0",
                              "example_map": grid.copy(), "mean_map": grid / grid.sum(),
                              "trigger_cells": cells if patch else None})
        for cond in ("clean", "triggered", "triggered + ST 0.5"):
            examples.append({"attack": attack, "condition": cond, "sample_id": "id0", "question": "q?",
                             "answer": "a", "image": np.full((8, 8, 3), 120, dtype=np.uint8)})
    return pd.DataFrame(thief), pd.DataFrame(examples)


def tokens_table(layer=3):
    groups = ["system"] * 3 + ["image"] * 4 + ["prompt"] * 2 + ["template_tail"]
    rows = []
    for cond, att in (("clean", [.1, .1, .1, .1, .1, .1, .1, .2, .05, .05]),
                      ("triggered", [.05, .05, .05, .5, .05, .05, .05, .1, .05, .05])):
        for pos, (g, a) in enumerate(zip(groups, att)):
            rows.append({"attack": "badnet", "condition": cond, "sample_id": "id0", "layer": layer, "position": pos,
                         "token": "<image>" if g == "image" else f"t{pos}", "group": g, "attention": a})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------- experiments: Fig. 1
def test_sweep_intensities_smoke_default_and_validation():
    assert xp.sweep_intensities(FakeCtx(smoke=True), [0.3, 0.6]) == [0.0, 1.0]
    assert xp.sweep_intensities(FakeCtx()) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert xp.sweep_intensities(FakeCtx(), [1.0, 0.5]) == [0.0, 0.5, 1.0]  # baseline always added, sorted
    with pytest.raises(InputError):
        xp.sweep_intensities(FakeCtx(), [0.5, 1.5])


def test_perturbation_table_shares_one_baseline_and_routes_settings(monkeypatch):
    calls, chosen = [], []

    def fake_sweep(model, samples, attack, kinds, points, **kw):
        calls.append((kinds[0], sorted(points), dict(kw)))
        rows = [{"kind": "none" if p == 0 else kinds[0], "domain": "none" if p == 0 else "d", "intensity": p,
                 "asr": 1.0 - p * (0.9 if kw.get("queries") == "all" else 0.1), "clean_acc": 0.7, "poisoned_acc": 0.0,
                 "n": len(samples)} for p in sorted(points)]
        return pd.DataFrame(rows)

    def fake_choose(self, model, samples):
        chosen.append(list(samples))
        return [5, 6, -1], "fusion_onset"

    monkeypatch.setattr(xp, "perturbation_sweep", fake_sweep)  # the name experiments.perturbation calls
    monkeypatch.setattr(xp.CleanSight, "choose_layers", fake_choose)
    ctx = FakeCtx(n=4, seed=7)
    table = xp.perturbation_table(ctx, "badnet", [0.0, 0.5, 1.0])
    assert list(table.columns) == list(xp.PERTURBATION_COLUMNS)
    labels = [v[0] for v in xp.DEFAULT_VARIANTS]
    assert [c[0] for c in calls] == [v[1] for v in xp.DEFAULT_VARIANTS]
    # the baseline is measured once (by the first variant) and repeated for every variant
    assert [sorted(c[1]) for c in calls] == [[0.0, 0.5, 1.0]] + [[0.5, 1.0]] * (len(labels) - 1)
    pixel = [c for c in calls if c[0] in ("st", "noise", "jpeg")]
    assert len(pixel) == 3 and all(c[2]["seed"] == 7 and "queries" not in c[2] for c in pixel)
    by_label = dict(zip(labels, calls))
    assert by_label["attention, text queries (paper)"][2] == {"queries": "text", "max_new_tokens": 12,
                                                              "batch_size": 32, "progress": True}
    assert by_label["attention, all queries (ours)"][2]["queries"] == "all"
    # the detection layers are chosen once, by CleanSight's own rule, on the calibration split
    assert by_label["attention, detection layers"][2]["layers"] == [5, 6, -1] and len(chosen) == 1
    assert len(table) == len(labels) * 3
    base = table[table["intensity"] == 0.0]
    assert len(base) == len(labels) and (base["asr"] == 1.0).all() and (base["kind"] == "none").all()
    ours = table[(table["variant"] == "attention, all queries (ours)") & (table["intensity"] == 1.0)]
    assert ours["asr"].item() == pytest.approx(0.1) and ours["queries"].item() == "all"
    assert set(table.loc[table["variant"] == "pixel ST", "queries"]) == {"-"}
    layers = table.groupby("variant")["layers"].agg(set).to_dict()
    assert layers["attention, detection layers"] == {"5,6,7"} and layers["attention, all queries (ours)"] == {"all"}
    assert layers["pixel JPEG"] == {"-"}
    name, params = ctx.cache_calls[0]
    assert name == "perturbation_sweep_badnet" and params["intensities"] == [0.0, 0.5, 1.0] and params["n"] == 4


def test_sweep_summary_reads_first_and_last_intensity():
    summary = xp.sweep_summary(sweep_table(("badnet",)))
    row = summary[summary["variant"] == "attention, all queries (ours)"].iloc[0]
    assert row["ASR @0 %"] == 100.0 and row["ASR @max %"] == pytest.approx(10.0)
    assert row["clean acc @max %"] == pytest.approx(55.0) and row["max intensity"] == 1.0


def test_thumbnail_limits_the_longest_side():
    from PIL import Image

    arr = xp.thumbnail(Image.new("RGB", (400, 200), (10, 20, 30)), side=100)
    assert arr.shape == (50, 100, 3) and arr.dtype == np.uint8 and tuple(arr[0, 0]) == (10, 20, 30)
    assert xp.thumbnail(Image.new("RGB", (32, 32)), side=100).shape == (32, 32, 3)  # never enlarged


# ------------------------------------------------------------------------------------- experiments: Fig. 2
@pytest.mark.parametrize("n, expected", [(8, [2, 3, 4, 5]), (32, list(range(10, 22))), (1, [0]), (3, [1])])
def test_middle_layers(n, expected):
    assert xs.middle_layers(n) == expected


def test_middle_layers_rejects_bad_counts():
    with pytest.raises(InputError):
        xs.middle_layers(0)


def test_stealing_layer_is_the_largest_image_rise():
    shares = shares_table({1: 0.05, 2: 0.3, 3: -0.1}, attacks=("badnet", "sig"))
    change = xs.image_share_change(shares)
    assert list(change.columns) == ["attack", "layer", "clean", "triggered", "triggered + ST 0.5", "rise"]
    assert change.loc[(change.attack == "badnet") & (change.layer == 2), "rise"].item() == pytest.approx(0.3)
    assert xs.stealing_layer(shares, "badnet") == 2
    assert xs.stealing_layers(shares) == {"badnet": 2, "sig": 2}


def test_share_summary_means_and_bars_sum_to_one():
    shares = shares_table({2: 0.3}, n_samples=3, n_layers=6)
    summary = xs.share_summary(shares, stealing={"badnet": 2})
    assert set(summary["window"]) == {"middle", "stealing"}
    assert set(summary.loc[summary.window == "middle", "layers"]) == {"layers 2-3"}  # middle third of 6 layers
    assert set(summary.loc[summary.window == "stealing", "layers"]) == {"layer 2"}
    bars = summary.groupby(["window", "condition"])["share"].sum()
    assert np.allclose(bars.to_numpy(), 1.0)
    # clean image share: mean of 0.20, 0.21, 0.22 in any window
    pick = summary[(summary.condition == "clean") & (summary.group == "image")]
    assert np.allclose(pick["share"], 0.21)
    trig = summary[(summary.condition == "triggered") & (summary.group == "image")].set_index("window")["share"]
    assert trig["stealing"] == pytest.approx(0.51) and trig["middle"] == pytest.approx(0.21 + 0.15)
    assert (summary["n"] == 3).all()
    assert summary.loc[(summary.condition == "clean") & (summary.group == "image"), "sem"].iloc[0] == \
        pytest.approx(0.01 / np.sqrt(3))


def test_paper_shares_and_comparison():
    paper = xs.paper_shares()
    assert np.allclose(paper.groupby(["attack", "condition"])["share"].sum(), [1.01, 1.0, 1.0, 1.0], atol=1e-9)
    row = paper[(paper.attack == "badnet") & (paper.condition == "triggered") & (paper.group == "image")]
    assert row["share"].item() == pytest.approx(0.32)
    summary = xs.share_summary(shares_table({2: 0.3}, attacks=("badnet", "sig")), stealing={"badnet": 2, "sig": 2})
    comp = xs.paper_comparison(summary)
    bad = comp[(comp.attack == "badnet") & (comp.condition == "clean")].iloc[0]
    assert bad["paper image %"] == 11.0 and bad["paper prompt %"] == 48.0
    assert bad["ours stealing layer: layers"] == "2"
    assert bad["ours middle: image %"] + bad["ours middle: prompt %"] + bad["ours middle: system+tail %"] == \
        pytest.approx(100.0, abs=0.2)
    assert np.isnan(comp[(comp.attack == "sig") & (comp.condition == "clean")]["paper image %"].item())


def test_thief_summary_keeps_the_chosen_layers_and_as_array_reads_json():
    thief, _ = thief_and_examples()
    out = xs.thief_summary(thief, {"badnet": 3, "blended": 1})
    assert list(zip(out.attack, out.layer, out.condition)) == [("badnet", 3, "triggered"), ("badnet", 3, "clean"),
                                                               ("blended", 1, "triggered"), ("blended", 1, "clean")]
    assert "example_map" not in out
    assert xs.as_array(json.dumps([[1, 2], [3, 4]])).shape == (2, 2)
    assert xs.as_array(None) is None and xs.as_array("null") is None


def test_experiments_reject_bad_arguments():
    ctx = FakeCtx()
    with pytest.raises(InputError):
        xs.group_share_table(ctx, "badnet", st_intensity=0.0)
    with pytest.raises(InputError):
        xs.thief_table(ctx, "badnet", example=10)  # beyond the 4 samples
    with pytest.raises(InputError):
        xs.attention_stealing_tables(ctx, token_attack="wanet")


# ------------------------------------------------------------------------------------- plots
def test_plot_pixel_vs_attention_axes_and_lines():
    from matplotlib.figure import Figure

    sweep = sweep_table()
    fig = pp.plot_pixel_vs_attention(sweep, thumbs_table())
    assert isinstance(fig, Figure)
    axes = fig.get_axes()
    assert len(axes) == 2 * 2 + 4  # ASR + clean accuracy per attack; 3 thumbnails + the attention note
    asr_ax = next(a for a in axes if a.get_title() == "BadNet (n = 16)")
    assert asr_ax.get_ylabel() == "attack success rate (%)"
    lines = {ln.get_label(): ln for ln in asr_ax.get_lines()}
    assert set(lines) == set(sweep["variant"]) and set(lines) <= set(pp.VARIANT_STYLES)
    assert all(ln.get_color() == pp.VARIANT_STYLES[name]["color"] for name, ln in lines.items())
    assert np.allclose(lines["attention, all queries (ours)"].get_ydata(), [100, 55, 10])
    assert any(a.get_ylabel() == "clean accuracy (%)" for a in axes)
    titles = [a.get_title() for a in axes]
    assert any("pixels unchanged" in t for t in titles) and any(t.startswith("ST ρ = 0.5") for t in titles)
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_plot_share_bars_heights_follow_the_table():
    import matplotlib.pyplot as plt

    summary = xs.share_summary(shares_table({2: 0.3}), stealing={"badnet": 2})
    fig, ax = plt.subplots()
    ps.plot_share_bars(summary, xs.paper_shares(), attack="badnet", ax=ax)
    # 2 paper bars x 3 groups + 2 windows x 3 conditions x 4 groups
    assert len(ax.patches) == 2 * 3 + 2 * 3 * 4
    assert [t.get_text() for t in ax.get_xticklabels()][:3] == ["clean", "poisoned", "clean"]
    assert ax.get_title() == "BadNet"
    first_image_bar = ax.patches[0]
    assert first_image_bar.get_height() == pytest.approx(0.11)  # the paper's clean BadNet image share
    plt.close(fig)


def test_plot_token_attention_and_thief_maps():
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1)
    ps.plot_token_attention(tokens_table(), 3, axes=axes)
    assert sum(len(c.patches) for c in axes[1].containers) == 10
    assert "65 %" in axes[1].get_title(loc="left")  # triggered image share 0.5 + 3 x 0.05
    assert any(t.get_text() == "patch (0,0)" for t in axes[1].texts)  # 4 image tokens -> 2 x 2 grid
    plt.close(fig)

    thief, examples = thief_and_examples()
    fig, axes = plt.subplots(2, 2)
    out, mappable = ps.plot_thief_maps(thief, examples, {"badnet": 3, "blended": 3}, axes=axes)
    assert mappable is not None
    # the BadNet trigger (two cells in a row) is outlined by 6 segments; Blended has no outline
    assert len(out[1, 0].get_lines()) == 6 and len(out[1, 1].get_lines()) == 0
    assert "75 %" in out[1, 0].get_title() and "no region" in out[1, 1].get_title()
    assert "top patch: 50 % of image attention" in out[1, 1].get_title()
    assert out[0, 0].get_title().startswith("BadNet, layer 3")
    plt.close(fig)


def test_plot_attention_stealing_assembles_three_panels():
    import matplotlib.pyplot as plt

    shares = shares_table({3: 0.3}, attacks=("badnet", "blended"))
    layers = xs.stealing_layers(shares)
    thief, examples = thief_and_examples()
    fig = ps.plot_attention_stealing(xs.share_summary(shares, stealing=layers), xs.paper_shares(), tokens_table(),
                                     thief, examples, layers)
    axes = fig.get_axes()
    assert len(axes) == 2 + 2 + 4 + 1  # (a) per attack, (b) two rows, (c) 2 x 2 maps, colorbar
    labels = {a.get_xlabel() for a in axes}
    assert "position in the input sequence (layer 3; heads averaged)" in labels
    plt.close(fig)


# ------------------------------------------------------------------------------------- on the tiny model
def test_tables_on_the_tiny_model_are_consistent_and_cached(tmp_path):
    ctx = FigureContext(model="tiny-llava", attacks=["badnet"], n_samples=3, results_dir=tmp_path, figures_dir=tmp_path,
                        smoke=True)
    tables = xs.attention_stealing_tables(ctx)
    shares = tables["shares"]
    lvlm, _, _ = ctx.load("badnet")
    assert len(shares) == 3 * 3 * lvlm.n_layers  # conditions x samples x layers
    total = shares[[f"share_{g}" for g in xs.SHARE_GROUPS]].sum(axis=1)
    assert np.allclose(total, 1.0, atol=1e-4)
    tokens = tables["tokens"]
    per_layer = tokens.groupby(["condition", "layer"])["attention"].sum()
    assert np.allclose(per_layer, 1.0, atol=1e-4)
    # the token table and the share table agree on the example's image share
    ex_id = tokens["sample_id"].iloc[0]
    img_tok = tokens[(tokens.group == "image")].groupby(["condition", "layer"])["attention"].sum()
    img_sh = shares[shares.sample_id == ex_id].set_index(["condition", "layer"])["share_image"]
    for key, value in img_tok.items():
        assert value == pytest.approx(img_sh[key], abs=1e-4)
    thief = tables["thief"]
    assert set(thief["condition"]) == {"triggered", "clean"} and len(thief) == 2 * lvlm.n_layers
    assert thief["top1_hit_rate"].between(0, 1).all()
    assert set(tables["examples"]["condition"]) == {"clean", "triggered", "triggered + ST 0.5"}
    again = xs.attention_stealing_tables(ctx)  # from the cache: same numbers, maps as JSON text
    pd.testing.assert_frame_equal(again["shares"], shares)
    assert np.allclose(xs.as_array(again["thief"]["example_map"].iloc[0]), thief["example_map"].iloc[0])
