"""Figs. 6, 7 and 9 (pruning threshold, logit lens, per-head ablation): experiment helpers with known
answers, the plotting functions on hand-made tables, and the composition with CleanSight's pruning on the
tiny random LLaVA."""

from __future__ import annotations

import warnings

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from cleansight_analysis.attacks import get_attack  # noqa: E402
from cleansight_analysis.defenses import ablations as A  # noqa: E402
from cleansight_analysis.errors import InputError  # noqa: E402
from cleansight_analysis.evaluation import runner as R  # noqa: E402
from cleansight_analysis.experiments import heads as EH  # noqa: E402
from cleansight_analysis.experiments import lens as EL  # noqa: E402
from cleansight_analysis.experiments import pruning as EP  # noqa: E402
from cleansight_analysis.plotting.heads import head_grid, plot_head_ablation  # noqa: E402
from cleansight_analysis.plotting.lens import plot_logit_lens  # noqa: E402
from cleansight_analysis.plotting.pruning import attack_colors, plot_pruning_threshold  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


# ------------------------------------------------------------------ hand-made tables
def _tau_table() -> pd.DataFrame:
    """Two attacks; 'a' reaches ASR 0 at tau <= 1e-3, 'b' never; auto tau 0.5 for both."""
    rows = []
    for attack, asrs in (("a", [0.0, 0.0, 0.5, 1.0, 1.0]), ("b", [0.4, 0.6, 0.8, 0.9, 1.0])):
        for tau, asr, auto in zip([1e-4, 1e-3, 1e-2, 0.5, 1.0], asrs, [False, False, False, True, False]):
            pruned = 64 * (1 - np.log10(tau) / np.log10(1e-4)) if tau < 1 else 0.0
            rows.append(dict(attack=attack, mask_scope="reference", tau=tau, is_auto=auto, asr=asr,
                             poisoned_utility=1 - asr, mean_pruned=64 - pruned, image_tokens=64.0,
                             pruned_share=(64 - pruned) / 64, layer=3, detection_layers="1,2,3", tau_auto=0.5, n=8,
                             n_val=4))
    return pd.DataFrame(rows)


def _lens_table() -> pd.DataFrame:
    """One attack, 4 layers, 2 samples; poisoned diff drops 0.5 below clean from layer 2 on."""
    rows = []
    for cond, shift in (("clean", 0.0), ("triggered", 0.5), ("reference", 0.5), ("all_layers", 0.0)):
        for s in range(2):
            for layer in range(4):
                pc = 0.2 * layer + 0.05 * s
                pt = shift if layer >= 2 else 0.0
                rows.append(dict(attack="x", condition=cond, sample=s, sample_id=f"s{s}", layer=layer,
                                 p_correct=pc, p_target=pt, diff=pc - pt, n_pruned=0, pruning_layer=2,
                                 mask_from_layer=-1, tau=0.1, n=2))
    return pd.DataFrame(rows)


def _head_tables() -> tuple[pd.DataFrame, pd.DataFrame]:
    """2 layers x 3 heads; ablating (0, 1) kills the backdoor, patching (1, 2) restores 0.8."""
    abl = [dict(attack="badnet", layer=-1, head=-1, kind="baseline", method="none", asr=1.0, clean_acc=0.75,
                asr_drop=0.0, clean_drop=0.0, n=4)]
    pat = []
    for layer in range(2):
        for head in range(3):
            asr = 0.0 if (layer, head) == (0, 1) else 1.0
            abl.append(dict(attack="badnet", layer=layer, head=head, kind="ablate", method="zero", asr=asr,
                            clean_acc=0.5 + 0.1 * head, asr_drop=1.0 - asr, clean_drop=0.25 - 0.1 * head, n=4))
            pat.append(dict(attack="badnet", direction="triggered->clean", layer=layer, head=head,
                            restored=0.8 if (layer, head) == (1, 2) else 0.01 * head))
    return pd.DataFrame(abl), pd.DataFrame(pat)


# ------------------------------------------------------------------ experiment helpers
def test_default_head_layers_window_from_the_layer_count():
    assert EH.default_head_layers(8) == list(range(8))
    assert EH.default_head_layers(3, max_layers=8) == [0, 1, 2]
    assert EH.default_head_layers(32) == [0, 4, 9, 13, 18, 22, 27, 31]
    assert EH.default_head_layers(40, max_layers=2) == [0, 39]
    assert EH.default_head_layers(10, max_layers=1) == [9]
    for bad in (0, -1, 2.5, True):
        with pytest.raises(InputError):
            EH.default_head_layers(bad)


def test_scope_plan_assigns_scopes_per_attack_and_rejects_unknown_attacks():
    plan = EP._scope_plan(["badnet", "blended"], {"reference": None, "all_layers": ["badnet"]})
    assert plan == {"badnet": ["reference", "all_layers"], "blended": ["reference"]}
    assert EP._scope_plan(["a", "b"], {"all_layers": ["b"]}) == {"b": ["all_layers"]}
    with pytest.raises(InputError, match="sig"):
        EP._scope_plan(["badnet"], {"reference": ["sig"]})
    with pytest.raises(InputError):
        EP.with_mask_scope(object(), "everywhere")


def test_pruning_summary_known_values():
    out = EP.pruning_summary(_tau_table(), taus=(1e-3,)).set_index("attack")
    assert out.loc["a", "asr_at_auto"] == 1.0 and out.loc["b", "asr_at_auto"] == 0.9
    assert out.loc["a", "asr_at_0.001"] == 0.0 and out.loc["b", "asr_at_0.001"] == 0.6
    assert out.loc["a", "largest_tau_asr0"] == 1e-3 and np.isnan(out.loc["b", "largest_tau_asr0"])
    assert out.loc["a", "tau_auto"] == 0.5 and out.loc["b", "asr_undefended"] == 1.0


def test_divergence_layer_and_lens_summary_known_values():
    table = _lens_table()
    summary = EL.lens_summary(table)
    assert len(summary) == 4 * 4
    clean0 = summary[(summary.condition == "clean") & (summary.layer == 0)]
    assert float(clean0["p_correct"].iloc[0]) == pytest.approx(0.025)
    div = EL.divergence_layer(table, threshold=0.1).iloc[0]
    assert div["first_divergent_layer"] == 2
    assert div["last_layer_diff[clean]"] == pytest.approx(0.625)
    assert div["last_layer_diff[poisoned]"] == pytest.approx(0.125)
    flat = table.copy()
    flat.loc[flat.condition == "triggered", "diff"] = flat.loc[flat.condition == "clean", "diff"].to_numpy()
    assert EL.divergence_layer(flat).iloc[0]["first_divergent_layer"] == -1


def test_top_heads_and_head_grid():
    abl, pat = _head_tables()
    top = EH.top_heads(abl, pat, k=1)
    assert top["head"].tolist() == ["L0H1", "L1H2"]
    assert top["value"].tolist() == [0.0, 0.8]
    grid = head_grid(abl, "asr")
    assert grid.shape == (2, 3) and grid.loc[0, 1] == 0.0 and grid.loc[1, 1] == 1.0  # baseline row dropped
    with pytest.raises(InputError):
        head_grid(abl[abl.layer < 0], "asr")


# ------------------------------------------------------------------ plotting
def test_plot_pruning_threshold_axes_and_markers():
    fig = plot_pruning_threshold(_tau_table())
    axes = fig.axes
    assert [a.get_title() for a in axes] == ["Attack success rate", "Poisoned utility", "Image tokens pruned"]
    assert all(a.get_xscale() == "log" for a in axes)
    assert "tau" in axes[0].get_xlabel() and "ASR" in axes[0].get_ylabel()
    # per attack: one line and one star (calibrated tau) per panel
    stars = [l for l in axes[0].get_lines() if l.get_marker() == "*"]
    assert len(stars) == 2 and {float(s.get_ydata()[0]) for s in stars} == {1.0, 0.9}
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "a" in legend and "b" in legend and any("calibrated" in t for t in legend)
    bad = _tau_table()
    bad.loc[0, "tau"] = 0.0
    with pytest.raises(InputError, match="log"):
        plot_pruning_threshold(bad)
    with pytest.raises(InputError, match="asr"):
        plot_pruning_threshold(_tau_table().drop(columns="asr"))


def test_plot_pruning_threshold_labels_a_scope_shown_for_some_attacks():
    extra = _tau_table()
    extra = extra[extra.attack == "a"].assign(mask_scope="all_layers")
    fig = plot_pruning_threshold(pd.concat([_tau_table(), extra], ignore_index=True))
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "mask every layer (a)" in legend
    assert any(l.get_linestyle() == "--" for l in fig.axes[0].get_lines())


def test_attack_colors_are_stable_across_figures():
    c1, c2 = attack_colors(["blended", "badnet"]), attack_colors(["badnet", "sig", "custom"])
    assert c1["badnet"] == c2["badnet"] and len(set(map(tuple, c2.values()))) == 3


def test_plot_logit_lens_layout_and_means():
    fig = plot_logit_lens(_lens_table())
    assert len(fig.axes) == 2
    top, bottom = fig.axes
    assert "p(correct) - p(target)" in top.get_ylabel() and "layer" in bottom.get_xlabel().lower()
    # the clean diff line (first condition drawn) carries the mean over the two samples
    clean = top.get_lines()[0]
    np.testing.assert_allclose(clean.get_ydata(), [0.025, 0.225, 0.425, 0.625])
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels[:4] == ["clean", "poisoned", "poisoned + CleanSight", "poisoned + CleanSight (mask every layer)"]
    with pytest.raises(InputError):
        plot_logit_lens(_lens_table().drop(columns="diff"))


def test_plot_head_ablation_panels_and_titles():
    abl, pat = _head_tables()
    fig = plot_head_ablation(abl, pat)
    main = [a for a in fig.axes if a.get_title()]
    assert len(main) == 3  # ASR, clean accuracy, patching (colour bars have no title)
    assert "ASR" in main[0].get_title() and "1.00" in main[0].get_title()
    assert "clean accuracy" in main[1].get_title() and "triggered->clean" in main[2].get_title()
    assert main[0].get_ylabel() == "LM layer" and main[0].get_xlabel() == "head"
    assert len(plot_head_ablation(abl).axes) == 4  # two heatmaps + two colour bars
    with pytest.raises(InputError, match="restored"):
        plot_head_ablation(abl, pat.drop(columns="restored"))


# ------------------------------------------------------------------ composition on the tiny random LLaVA
@pytest.fixture(scope="module")
def tiny():
    import cleansight_analysis as cs

    return cs.load_lvlm("tiny-random-llava")


@pytest.fixture(scope="module")
def samples():
    return R.synthetic_samples("test", 3)


@pytest.fixture(scope="module")
def fitted(tiny):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fit_cleansight silences only the few-samples warning
        return EP.fit_cleansight(tiny, R.synthetic_samples("calibration", 4), layers=[1], tau=0.02)


def test_cleansight_pruning_prunes_what_the_defense_prunes(tiny, samples, fitted):
    batch = tiny.prepare([s.image for s in samples], [s.prompt for s in samples])
    oracle = A.with_calibration(fitted, gamma=float("-inf"))
    out = oracle.generate(tiny, batch, max_new_tokens=2)
    pruning = EL.CleanSightPruning(fitted)
    hooks = pruning.hooks(tiny, batch)
    assert pruning.layer == 1 and pruning.tau == 0.02 and pruning.mask_from() == 1
    assert pruning.pruned == [int(p.numel()) for p in out.pruned] and sum(pruning.pruned) > 0
    assert {name for name, _ in hooks} == {f"blocks.{l}.attn.hook_attn_scores" for l in range(1, tiny.n_layers)}
    assert EL.CleanSightPruning(fitted, scope="all_layers").mask_from() == 0


def test_lens_with_pruning_leaves_layers_before_l_e_alone(tiny, samples, fitted):
    frame = EL.lens_with_pruning(tiny, get_attack("badnet"), samples, fitted, scopes=("reference", "all_layers"))
    assert set(frame.condition) == {"clean", "triggered", "reference", "all_layers"}
    assert len(frame) == 4 * len(samples) * tiny.n_layers
    wide = frame.pivot_table(index=["sample", "layer"], columns="condition", values="p_correct")
    before = wide.xs(0, level="layer")  # l_e = 1: the residual after layer 0 is not touched by the default mask
    np.testing.assert_allclose(before["reference"], before["triggered"], rtol=0, atol=1e-6)
    assert (frame.loc[frame.condition == "reference", "mask_from_layer"] == 1).all()
    assert (frame.loc[frame.condition == "all_layers", "mask_from_layer"] == 0).all()
    assert (frame.loc[frame.condition.isin(["clean", "triggered"]), "n_pruned"] == 0).all()
    assert frame.loc[frame.condition == "reference", "n_pruned"].sum() > 0
    after = wide.xs(tiny.n_layers - 1, level="layer")
    assert not np.allclose(after["reference"], after["triggered"])  # the mask does act from l_e on


def test_sweep_taus_adds_the_calibrated_tau_and_prunes_less_as_tau_grows(tiny, samples, fitted):
    out = EP.sweep_taus(tiny, get_attack("badnet"), fitted, samples, taus=(1e-6, 1.0), max_new_tokens=2)
    assert list(out["tau"]) == [1e-6, 0.02, 1.0] and out["is_auto"].tolist() == [False, True, False]
    assert np.all(np.diff(out["pruned_share"]) <= 0) and out["pruned_share"].iloc[-1] == 0
    assert out["pruned_share"].iloc[0] > 0.9 and (out["layer"] == 1).all()
    assert out["detection_layers"].iloc[0] == "1" and out["mask_scope"].iloc[0] == "reference"
    with pytest.raises(InputError):
        EP.sweep_taus(tiny, get_attack("badnet"), fitted, samples, taus=(0.0,))
