"""Figs. 3-5 (detection): experiment tables on hand-made stealing rows, sibling-cache adoption, plots."""

from __future__ import annotations


import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from cleansight_analysis.errors import InputError  # noqa: E402
from cleansight_analysis.evaluation.sweeps import layer_window_sweep  # noqa: E402
from cleansight_analysis.experiments import FigureContext  # noqa: E402
from cleansight_analysis.experiments import detection as det  # noqa: E402
from cleansight_analysis.plotting import detection as pdet  # noqa: E402

N_LAYERS, N_HEADS = 3, 2


def _rows(attack: str = "badnet", n_cal: int = 40, n_test: int = 30, signal_layer: int = 1, seed: int = 0):
    """Rows like ``detection_rows``: ratios ~ N(1, 0.1); triggered inputs get +5 on head 0 of ``signal_layer``."""
    rng = np.random.default_rng(seed)
    parts = []
    for cond, n in (("calibration", n_cal), ("clean", n_test), ("triggered", n_test)):
        split = "cal" if cond == "calibration" else "test"
        vals = rng.normal(1.0, 0.1, size=(n, N_LAYERS, N_HEADS))
        if cond == "triggered":
            vals[:, signal_layer, 0] += 5.0
        ids = np.repeat([f"{split}/{i}" for i in range(n)], N_LAYERS * N_HEADS)
        parts.append(pd.DataFrame({
            "attack": attack, "sample_id": ids, "condition": cond,
            "layer": np.tile(np.repeat(np.arange(N_LAYERS), N_HEADS), n),
            "head": np.tile(np.arange(N_HEADS), n * N_LAYERS), "ratio": vals.reshape(-1),
            # image share 0.3 (+0.2 on head 0 of the signal layer under the trigger: +0.1 over the heads)
            "mass_image": (0.3 + 0.2 * (vals > 3.0)).reshape(-1)}))
    return pd.concat(parts, ignore_index=True)


def _onset(attack: str, chosen: list[int]):
    effect = np.array([0.0, 0.5, 1.0])
    return pd.DataFrame({"attack": attack, "layer": np.arange(N_LAYERS), "effect": effect, "relative_effect": effect,
                         "detection_layer": np.isin(np.arange(N_LAYERS), chosen), "window": len(chosen),
                         "onset_fraction": 0.5, "n_samples": 4})


@pytest.fixture()
def ctx(tmp_path):
    return FigureContext(attacks=["badnet", "sig"], n_samples=30, results_dir=tmp_path / "03_x",
                         figures_dir=tmp_path / "fig", log=lambda msg: None)


@pytest.fixture()
def inputs():
    rows = {"badnet": _rows("badnet", signal_layer=1), "sig": _rows("sig", signal_layer=2, seed=1)}
    onset = pd.concat([_onset("badnet", [1, 2]), _onset("sig", [0, 1])], ignore_index=True)
    return det.DetectionInputs(rows, onset, {"n_val": 40, "window": 2, "n_onset": 4})


# ------------------------------------------------------------------ experiment tables


def test_layerwise_auroc_calibrates_on_the_calibration_rows_only(inputs):
    rows = inputs.rows["badnet"]
    table = det.layerwise_auroc(rows)
    assert table["layer"].tolist() == [0, 1, 2]
    assert table[["n_calibration", "n_clean_test", "n_poisoned_test"]].iloc[0].tolist() == [40, 30, 30]
    vec = table.set_index("layer")["auroc_head_vector"]
    assert vec[1] == pytest.approx(1.0)
    assert abs(vec[0] - 0.5) < 0.3 and abs(vec[2] - 0.5) < 0.3   # no signal: near chance
    # the single-layer windows of the harness sweep are the same detector: identical AUROCs
    sweep = layer_window_sweep(rows, lengths=[1], settings=det.figure_detector()).set_index("start")["auroc"]
    np.testing.assert_allclose(vec.to_numpy(), sweep.loc[[0, 1, 2]].to_numpy(), rtol=0, atol=1e-12)


def test_layerwise_auroc_rejects_rows_without_calibration_or_with_shared_ids(inputs):
    rows = inputs.rows["badnet"]
    with pytest.raises(InputError, match="calibration"):
        det.layerwise_auroc(rows[rows["condition"] != "calibration"])
    shared = rows.copy()
    shared.loc[shared["condition"] == "calibration", "sample_id"] = shared.loc[
        shared["condition"] == "calibration", "sample_id"].str.replace("cal/", "test/")
    with pytest.raises(InputError, match="share sample ids"):
        det.layerwise_auroc(shared)


def test_layerwise_detection_table_marks_the_fusion_onset_layers(ctx, inputs):
    table = det.layerwise_detection_table(ctx, inputs)
    assert table["attack"].unique().tolist() == ["badnet", "sig"]
    marked = table[table["detection_layer"]].groupby("attack")["layer"].apply(list).to_dict()
    assert marked == {"badnet": [1, 2], "sig": [0, 1]}
    assert (ctx.results_dir / "layerwise_detection.manifest.json").is_file()


def test_mechanism_table_marks_the_layers_where_the_image_share_rises_and_separates(ctx, inputs):
    table = det.layerwise_detection_table(ctx, inputs)
    mech = det.mechanism_table(ctx, inputs, table)
    assert list(mech.columns) == ["attack", "layer", "image_share_clean", "image_share_triggered", "rise",
                                  "auroc_head_vector", "early", "steals"]
    rise = mech.set_index(["attack", "layer"])["rise"]
    assert rise[("badnet", 1)] == pytest.approx(0.1) and rise[("sig", 2)] == pytest.approx(0.1)
    assert rise[("badnet", 0)] == pytest.approx(0.0) and rise[("sig", 1)] == pytest.approx(0.0)
    assert mech["early"].all()  # 3 layers: the last quarter holds no whole layer
    assert mech[mech["steals"]][["attack", "layer"]].values.tolist() == [["badnet", 1], ["sig", 2]]
    # a rise below the bound, or a layer whose AUROC is below it, does not count
    assert not det.mechanism_table(ctx, inputs, table, min_rise=0.2)["steals"].any()
    low = table.assign(auroc_head_vector=0.9)
    assert not det.mechanism_table(ctx, inputs, low, min_rise=0.05, min_auroc=0.95 - 1e-9)["steals"].any()
    with pytest.raises(InputError, match="min_rise"):
        det.mechanism_table(ctx, inputs, table, min_rise=2.0)
    bare = det.DetectionInputs({"badnet": inputs.rows["badnet"].drop(columns="mass_image")}, inputs.onset,
                               {"n_val": 41})
    with pytest.raises(InputError, match="mass_image"):
        det.mechanism_table(ctx, bare, table)


def test_mechanism_summary_names_where_the_mechanism_shows(ctx, inputs):
    from cleansight_analysis.plotting.summaries import layerwise_detection_summary

    table = det.layerwise_detection_table(ctx, inputs)
    mech = det.mechanism_table(ctx, inputs, table)
    line = [ln for ln in layerwise_detection_summary(table, mech).splitlines() if "paper sees it" in ln][0]
    assert "by at least 0.05 in a layer before the last quarter (layers 0-2)" in line
    assert "for 2 of 2 attacks (BadNet, SIG)" in line and "BadNet layer 1 (largest: 0.30 -> 0.40 in layer 1)" in line
    mech.loc[mech["attack"] == "sig", "steals"] = False
    line = [ln for ln in layerwise_detection_summary(table, mech).splitlines() if "paper sees it" in ln][0]
    assert "for 1 of 2 attacks (BadNet)" in line and "SIG none (largest rise 0.10 in layer 2, AUROC 1.00)" in line
    assert "paper sees it" not in layerwise_detection_summary(table)


def test_layer_window_table_flags_detector_choice_and_best_window(ctx, inputs):
    windows = det.layer_window_table(ctx, inputs)
    assert sorted(windows["length"].unique()) == [1, 2, 3]      # window_lengths(3 layers)
    assert (windows.groupby("attack").size() == 3 + 2 + 1).all()  # windows past the last layer skipped
    for attack, sub in windows.groupby("attack"):
        assert sub["detector_choice"].sum() == 1 and sub["best"].sum() == 1
        auto = sub[sub["detector_choice"]].iloc[0]
        assert auto["layers"] == ",".join(map(str, inputs.detector_layers(attack)))
        best = sub[sub["best"]].iloc[0]
        top = sub[sub["auroc"] == sub["auroc"].max()].sort_values(["start", "length"]).iloc[0]
        assert (best["start"], best["length"]) == (top["start"], top["length"])
    # badnet's signal is in layer 1: every window holding layer 1 separates perfectly, the earliest shortest wins
    bad = windows[windows["attack"] == "badnet"]
    assert bad[bad["best"]][["start", "length"]].iloc[0].tolist() == [0, 2]
    assert bad[bad["layers"] == "0"]["auroc"].iloc[0] < 0.8


def test_detector_window_length_is_always_swept(ctx, inputs):
    windows = det.layer_window_table(ctx, inputs, lengths=[1])
    assert sorted(windows["length"].unique()) == [1, 2]


def test_choices_threshold_and_val_size_tables(ctx, inputs):
    windows = det.layer_window_table(ctx, inputs)
    choices = det.detection_layer_choices(ctx, inputs, windows)
    assert choices["choice"].tolist() == [det.CHOICE_AUTO, det.CHOICE_BEST] * 2
    assert choices.set_index(["attack", "choice"]).loc[("badnet", det.CHOICE_AUTO), "layers"] == "1,2"
    # sig's signal is in layer 2: windows (0, 3), (1, 2), (2, 1) tie at 1.0, the earliest start wins
    assert choices.set_index(["attack", "choice"]).loc[("sig", det.CHOICE_BEST), "layers"] == "0,1,2"

    q = det.threshold_table(ctx, inputs, choices, quantiles=[0.5, 0.9, 0.99])
    assert len(q) == 4 * 3
    for _, sub in q.groupby(["attack", "choice"]):
        assert np.all(np.diff(sub.sort_values("quantile")["fpr"]) <= 0)
        assert np.all(np.diff(sub.sort_values("quantile")["tpr"]) <= 0)
    best = q[(q["attack"] == "badnet") & (q["choice"] == det.CHOICE_BEST) & (q["quantile"] == 0.99)].iloc[0]
    assert best["tpr"] == 1.0 and best["n_val"] == 40
    half = q[q["quantile"] == 0.5]["fpr"]
    assert half.between(0.2, 0.8).all()   # median threshold: about half of the clean test inputs above it

    sizes = det.val_size_table(ctx, inputs, choices, sizes=[1, 5, 40, 100], repeats=3)
    assert sorted(sizes["n_val"].unique()) == [1, 5, 40]   # 100 > 40 calibration inputs: skipped
    one = sizes[(sizes["attack"] == "badnet") & (sizes["choice"] == det.CHOICE_AUTO)]
    assert one.groupby("n_val").size().to_dict() == {1: 3, 5: 3, 40: 1}
    assert (sizes["quantile"] == 0.99).all()
    # one calibration input: std 0, every distance beats the threshold (0): everything is flagged
    assert (sizes[sizes["n_val"] == 1][["tpr", "fpr"]] == 1.0).all().all()
    summary = det.summarize_val_size(sizes)
    row = summary[(summary["attack"] == "badnet") & (summary["choice"] == det.CHOICE_AUTO) & (summary["n_val"] == 5)]
    assert row["repeats"].iloc[0] == 3
    assert row["fpr_mean"].iloc[0] == pytest.approx(one[one["n_val"] == 5]["fpr"].mean())
    assert row["fpr_min"].iloc[0] <= row["fpr_mean"].iloc[0] <= row["fpr_max"].iloc[0]


def test_comparison_tables_quote_our_numbers(ctx, inputs):
    table = det.layerwise_detection_table(ctx, inputs)
    c3 = det.fig3_comparison(table)
    assert list(c3.columns) == ["attack", "measure", "paper (LLaVA-1.5-7B)", "ours"]
    best = c3[(c3["attack"] == "badnet") & c3["measure"].str.startswith("best layer")]["ours"].iloc[0]
    assert best == "layer 1: 1.00"
    windows = det.layer_window_table(ctx, inputs)
    c4 = det.fig4_comparison(windows)
    assert c4[c4["attack"] == "badnet"]["measure"].str.contains(r"detector's window \(fusion onset\): layers 1,2").any()
    choices = det.detection_layer_choices(ctx, inputs, windows)
    q = det.threshold_table(ctx, inputs, choices)
    sizes = det.val_size_table(ctx, inputs, choices, sizes=[10, 40])
    c5 = det.fig5_comparison(q, sizes)
    assert c5["measure"].str.contains(r"TPR / FPR at q=0.99, \|D_val\|=40").sum() == 4
    assert c5["measure"].str.contains(r"\|D_val\|=10, mean over 20 subsets").sum() == 4


# ------------------------------------------------------------------ model-dependent tables (tiny model, smoke sizes)


def test_detection_rows_and_fusion_onset_on_the_tiny_model(tmp_path):
    ctx = FigureContext(attacks=["badnet"], smoke=True, results_dir=tmp_path / "r", log=lambda m: None)
    inputs = det.detection_inputs(ctx, n_val=200, window=3, n_onset=16)
    rows = inputs.rows["badnet"]
    lvlm, _, _ = ctx.load("badnet")
    n_layers, n_heads = lvlm.n_layers, lvlm.n_heads
    assert list(rows.columns) == ["attack", *det.ROW_COLUMNS]
    counts = rows.groupby("condition")["sample_id"].nunique().to_dict()
    assert counts == {"calibration": 8, "clean": 8, "triggered": 8}        # smoke: at most 8 each
    assert len(rows) == 24 * n_layers * n_heads
    assert (rows["ratio"] >= 0).all()
    onset = inputs.onset
    assert onset["layer"].tolist() == list(range(n_layers))
    chosen = inputs.detector_layers("badnet")
    assert len(chosen) == 3 and chosen == list(range(chosen[0], chosen[0] + 3))
    assert onset["relative_effect"].max() == pytest.approx(1.0)
    assert onset["n_samples"].iloc[0] == 8


# ------------------------------------------------------------------ plots


def test_plot_layerwise_detection(ctx, inputs):
    table = det.layerwise_detection_table(ctx, inputs)
    fig = pdet.plot_layerwise_detection(table, inputs.onset)
    axes = fig.axes
    assert len(axes) == 4                                             # 2 rows x 2 attacks
    top = axes[0]
    assert top.get_title().startswith("BadNet") and axes[1].get_title().startswith("SIG")
    assert top.get_ylabel() == "AUROC (triggered vs clean)"
    ys = {ln.get_label(): ln.get_ydata() for ln in top.get_lines()}
    bad = table[table["attack"] == "badnet"]
    np.testing.assert_allclose(ys["head-specific vector (whitened distance)"], bad["auroc_head_vector"])
    np.testing.assert_allclose(ys["head-averaged scalar"], bad["auroc_head_mean"])
    assert list(ys["chance (0.5)"]) == [0.5, 0.5]
    assert axes[2].get_xlabel() == "LM layer (0-indexed)"
    heights = [p.get_height() for p in axes[2].patches]
    np.testing.assert_allclose(heights, [0.0, 0.5, 1.0])
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "detection layers (fusion onset)" in labels
    # without the onset table: one row of panels
    assert len(pdet.plot_layerwise_detection(table).axes) == 2


def test_plot_layer_window_sweep(ctx, inputs):
    from matplotlib.patches import Rectangle

    windows = det.layer_window_table(ctx, inputs)
    fig = pdet.plot_layer_window_sweep(windows)
    assert len(fig.axes) == 3                                          # 2 heatmaps + colour bar
    ax = fig.axes[0]
    assert ax.get_xlabel() == "window length (layers)" and ax.get_ylabel() == "start layer (0-indexed)"
    mesh = ax.collections[0].get_array().reshape(N_LAYERS, N_LAYERS)
    grid = windows[windows["attack"] == "badnet"].pivot(index="start", columns="length", values="auroc")
    np.testing.assert_allclose(np.ma.filled(mesh, np.nan), grid.to_numpy(), equal_nan=True)
    boxes = [p for p in ax.patches if isinstance(p, Rectangle) and not p.get_fill()]
    assert len(boxes) == 2                                             # detector's window + best window
    assert [t.get_text() for t in ax.texts][:2] == [f"{v:.2f}" for v in grid.iloc[0, :2]]


def test_plot_threshold_and_val_size(ctx, inputs):
    windows = det.layer_window_table(ctx, inputs)
    choices = det.detection_layer_choices(ctx, inputs, windows)
    q = det.threshold_table(ctx, inputs, choices)
    sizes = det.val_size_table(ctx, inputs, choices, sizes=[1, 5, 10, 40])
    fig = pdet.plot_threshold_and_val_size(q, sizes)
    axes = fig.axes
    assert len(axes) == 4                                              # 2 layer choices x (q, |D_val|)
    assert axes[1].get_xscale() == "log"
    assert [t.get_text() for t in axes[1].get_xticklabels()] == ["1", "5", "10", "40"]
    assert axes[0].get_ylabel() == "rate on test inputs"
    assert axes[1].get_title() == "vs validation-set size (q = 0.99)"
    tpr = q[(q["attack"] == "badnet") & (q["choice"] == det.CHOICE_AUTO)].sort_values("quantile")["tpr"]
    np.testing.assert_allclose(axes[0].get_lines()[0].get_ydata(), tpr)
    legend = [t.get_text() for t in axes[1].get_legend().get_texts()]
    assert legend == ["BadNet (layers 1-2)", "SIG (layers 0-1)"]
    assert "paper: TPR 100 %, FPR 3 %" in [t.get_text() for t in fig.legends[0].get_texts()]


def test_plots_reject_tables_without_their_columns():
    with pytest.raises(ValueError, match="auroc_head_vector"):
        pdet.plot_layerwise_detection(pd.DataFrame({"attack": ["a"], "layer": [0]}))
    with pytest.raises(ValueError, match="empty"):
        pdet.plot_layer_window_sweep(pd.DataFrame(columns=["attack", "start", "length", "auroc"]))
