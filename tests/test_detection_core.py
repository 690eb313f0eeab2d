"""The detector core (cleansight_analysis.detection): one definition of the feature, the whitened distance,
the threshold rule, Omega and the key mask, used by CleanSight, the layer selector and every sweep."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from cleansight_analysis.attacks import get_attack
from cleansight_analysis.attention.stealing import StealingSettings
from cleansight_analysis.defenses import ablations
from cleansight_analysis.defenses.cleansight import CleanSight, CleanSightConfig
from cleansight_analysis.detection import (DetectorSettings, Whitener, attention_pruning_positions, batch_masses,
                                           feature_values, fit_detector, key_mask_hook, key_mask_hooks,
                                           positions_mask, stealing_features)
from cleansight_analysis.detection import masking as core_masking
from cleansight_analysis.detection import pruning as core_pruning
from cleansight_analysis.detection.features import feature_names
from cleansight_analysis.detection.measure import clopper_pearson
from cleansight_analysis.errors import InputError
from cleansight_analysis.evaluation import sweeps
from test_cleansight import _batch, _samples
from tolerances import F32_SUM_ATOL


# ------------------------------------------------------------------------------------ structure
def test_the_core_imports_no_caller():
    """detection/ may use models, inputs, attention rows; defenses and evaluation build on it, never the reverse."""
    import re
    from pathlib import Path

    import cleansight_analysis.detection as core

    for path in Path(core.__file__).parent.glob("*.py"):
        imports = re.findall(r"^\s*from \.\.(\w+)", path.read_text(), flags=re.M)
        assert not set(imports) & {"defenses", "evaluation", "experiments", "plotting", "cli"}, (path.name, imports)


# ------------------------------------------------------------------------------------ features
def test_feature_values_by_hand():
    image, text = np.array([0.2, 0.0, 0.5]), np.array([0.4, 0.3, 0.0])
    np.testing.assert_array_equal(feature_values(image, text, "ratio", eps=1e-12)[:, 0], image / (text + 1e-12))
    np.testing.assert_array_equal(feature_values(image, text, "log_ratio", log_eps=1e-6)[:, 0],
                                  np.log(image + 1e-6) - np.log(text + 1e-6))
    np.testing.assert_array_equal(feature_values(image, text, "masses"), np.c_[image, text])
    # layout: layer-major, then head, then the feature's values
    mass = np.random.default_rng(0).dirichlet(np.ones(5), size=(3, 2, 4))  # [N=3, L=2, H=4, G=5]
    x = stealing_features(mass, "masses", "instruction")
    assert x.shape == (3, 2 * 4 * 2)
    names = feature_names([5, 6], 4, "masses")
    i = names.index("L6.H2.text")
    np.testing.assert_array_equal(x[:, i], mass[:, 1, 2, 2] + mass[:, 1, 2, 4])  # prompt + generated
    assert names.index("L6.H2.image") == i - 1
    with pytest.raises(InputError, match="feature='entropy' must be one of"):
        DetectorSettings(feature="entropy")


def test_group_masses_match_the_attention_rows(llava):
    batch = _batch(llava, _samples(3, offset=40))
    core = batch_masses(llava, batch, [1, 2])                         # [B, L, H, 5] float64
    rows = llava.attention_rows(batch, layers=[1, 2]).group_mass()     # [B, L, H, 4] float32 einsum
    torch.testing.assert_close(core[..., :4].float(), rows, rtol=0, atol=F32_SUM_ATOL)
    assert (core[..., 4] == 0).all()                                    # nothing generated at prefill
    torch.testing.assert_close(core.sum(-1), torch.ones_like(core.sum(-1)), rtol=0, atol=F32_SUM_ATOL)


# ------------------------------------------------------------------------------------ whitening and threshold
def test_whitener_diagonal_and_ledoit_wolf_by_hand():
    from sklearn.covariance import LedoitWolf

    rng = np.random.default_rng(1)
    cal = rng.normal(size=(60, 5)) @ rng.normal(size=(5, 5)) * [1.0, 10.0, 0.1, 3.0, 1.0]
    x = rng.normal(size=(7, 5))
    mu, sd = cal.mean(0), cal.std(0)
    np.testing.assert_allclose(Whitener("diagonal").fit(cal).distance(x),
                               np.linalg.norm((x - mu) / (sd + 1e-8), axis=1), rtol=1e-12)
    z = (cal - mu) / (sd + 1e-8)
    cov = LedoitWolf(assume_centered=True).fit(z).covariance_
    zx = (x - mu) / (sd + 1e-8)
    want = np.sqrt(np.einsum("ni,ij,nj->n", zx, np.linalg.inv(cov), zx))
    w = Whitener("ledoit_wolf").fit(cal)
    np.testing.assert_allclose(w.distance(x), want, rtol=1e-8)
    assert 0.0 <= w.shrinkage_ <= 1.0 and w.matrix.shape == (5, 5)
    # scale-free: rescaling a feature changes nothing
    np.testing.assert_allclose(Whitener("ledoit_wolf").fit(cal * 1e3).distance(x * 1e3), want, rtol=1e-6)


def test_cross_fit_by_hand_and_steps_kept_in_one_fold():
    rng = np.random.default_rng(2)
    x = rng.standard_t(3, size=(23, 4))
    s = DetectorSettings(whitening="diagonal", threshold_fit="cross_fit", folds=5)
    det = fit_detector(x, s)
    fold = np.arange(23) % 5
    oof = np.empty(23)
    for f in range(5):
        oof[fold == f] = Whitener("diagonal").fit(x[fold != f]).distance(x[fold == f])
    np.testing.assert_array_equal(det.distances, oof)
    assert det.gamma == np.quantile(oof, 0.99)
    np.testing.assert_array_equal(det.whitener.mu, x.mean(0))                      # final fit: every sample
    np.testing.assert_array_equal(det.in_sample, Whitener("diagonal").fit(x).distance(x))
    paper = fit_detector(x, DetectorSettings.paper())
    np.testing.assert_array_equal(paper.distances, paper.in_sample)
    # several rows per sample (query="generated"): a sample's rows share a fold; one distance per sample
    owner = np.repeat(np.arange(10), 3)
    steps = rng.normal(size=(30, 4))
    g = fit_detector(steps, s, groups=owner)
    assert len(g.distances) == 10
    hold = np.isin(owner, np.flatnonzero(np.arange(10) % 5 == 0))
    by_hand = Whitener("diagonal").fit(steps[~hold]).distance(steps[hold]).reshape(-1, 3).max(1)
    np.testing.assert_array_equal(g.distances[np.arange(10) % 5 == 0], by_hand)
    with pytest.raises(InputError, match="cross_fit' needs at least 3"):
        fit_detector(x[:2], s)


def test_in_sample_distances_understate_heavy_tails():
    """The cause of the paper threshold's excess false positives, on constructed heavy-tailed features: each
    calibration sample pulls mu and sigma towards itself, so its in-sample distance is smaller than a new
    sample's (a standardised in-sample coordinate is at most sqrt(n - 1)); cross-fitting scores every
    calibration sample with a whitening that did not see it."""
    rng = np.random.default_rng(3)
    cal, test = rng.standard_t(2, size=(200, 24)), rng.standard_t(2, size=(20000, 24))
    fpr = {}
    for fit in ("in_sample", "cross_fit"):
        det = fit_detector(cal, DetectorSettings(whitening="diagonal", threshold_fit=fit))
        fpr[fit] = float((det.distance(test) > det.gamma).mean())
    det = fit_detector(cal, DetectorSettings(whitening="diagonal", threshold_fit="cross_fit"))
    assert np.quantile(det.in_sample, 0.99) < np.quantile(det.distances, 0.99)
    assert fpr["in_sample"] > 0.02 and fpr["cross_fit"] < fpr["in_sample"]


# ------------------------------------------------------------------------------------ the key mask
def test_key_mask_hook_variants():
    low = torch.finfo(torch.float32).min
    scores = torch.zeros(2, 1, 4, 4)
    mask = positions_mask([torch.tensor([1]), torch.tensor([], dtype=torch.long)])
    assert mask.tolist() == [[False, True], [False, False]]
    out = key_mask_hook(mask)(scores.clone())
    assert (out[0, :, :, 1] == low).all() and (out[0, :, :, [0, 2, 3]] == 0).all() and (out[1] == 0).all()
    only_q = key_mask_hook(mask, query=torch.tensor([3, 3]))(scores.clone())       # one query row per sample
    assert (only_q[0, :, 3, 1] == low).all() and (only_q[0, :, :3] == 0).all()
    decode = torch.zeros(2, 1, 1, 6)                                               # one query, K = T + 2
    assert (key_mask_hook(mask, seq_len=4, decode=False)(decode.clone()) == 0).all()
    assert (key_mask_hook(mask, seq_len=4, prefill=False)(scores.clone()) == 0).all()
    assert (key_mask_hook(mask, seq_len=4, prefill=False)(decode.clone())[0, 0, 0, 1] == low)
    assert (key_mask_hook(lambda: None)(scores.clone()) == 0).all()                # nothing known yet
    with pytest.raises(InputError, match="built for 2 samples"):
        key_mask_hook(mask)(torch.zeros(3, 1, 4, 4))
    # one factory: the sweeps and the ablations use the core's functions
    assert core_masking.key_mask_hooks is sweeps.key_mask_hooks is key_mask_hooks
    assert core_pruning.attention_pruning_positions is attention_pruning_positions
    assert ablations.key_mask_hooks is key_mask_hooks


def test_one_omega_rule_for_cleansight_and_the_oracle(llava):
    cs = CleanSight(config=CleanSightConfig(layers=[1, 2], tau=2e-3, feature="ratio")).fit(llava, _samples(8))
    batch = _batch(llava, _samples(3, offset=40))
    out = ablations.with_calibration(cs, gamma=float("-inf")).generate(llava, batch, max_new_tokens=2)
    oracle = attention_pruning_positions(llava, batch, 2, 2e-3)
    assert out.flags.all()
    for p, q in zip(out.pruned, oracle):
        assert torch.equal(p, q) and p.numel() > 0


# ------------------------------------------------------------------------------------ one feature path
@pytest.mark.parametrize("settings", [
    dict(feature="ratio", whitening="diagonal", threshold_fit="cross_fit"),
    dict(feature="log_ratio", whitening="ledoit_wolf", threshold_fit="cross_fit"),
    dict(feature="masses", whitening="diagonal", threshold_fit="in_sample"),
], ids=lambda d: "-".join(d.values()))
def test_sweep_scores_equal_cleansight_score_bit_exact(llava, settings):
    """detection_table + detection_scores (the quantile / val-size / window sweeps' path) and CleanSight's
    fit + score give the same numbers bit for bit on the same batches: same forward passes (left padding,
    batches of 4), same float64 masses, same feature, whitening and threshold code."""
    val, test = _samples(12), _samples(8, offset=50)
    config = CleanSightConfig(layers=[1, 2], tau=1e-3, batch_size=4, **settings)
    cs = CleanSight(config=config).fit(llava, val)
    table = sweeps.detection_table(llava, get_attack("badnet", size=16), samples=test, val_samples=val,
                                   settings=StealingSettings(layers=[1, 2]), batch_size=4, progress=False)
    det, scores = sweeps.detection_scores(table, layers=[1, 2], settings=config.detector)
    ours = np.concatenate([cs.score(llava, _batch(llava, test[i:i + 4])).numpy() for i in range(0, 8, 4)])
    assert np.array_equal(scores["clean"], ours)
    assert det.gamma == cs.gamma and np.array_equal(det.whitener.mu, cs.calibration.mu)
    assert np.array_equal(det.distances, cs.calibration.clean_distances)
    q = sweeps.quantile_sweep(table, layers=[1, 2], quantiles=[config.quantile], settings=config.detector)
    assert q["threshold"].iloc[0] == cs.gamma
    assert q["fpr"].iloc[0] == float(np.mean(ours > cs.gamma))


# ------------------------------------------------------------------------------------ settings and files
def test_config_presets_and_validation():
    paper = CleanSightConfig.paper(layers=[7])
    assert (paper.feature, paper.whitening, paper.threshold_fit, paper.layers) == ("ratio", "diagonal", "in_sample", [7])
    assert CleanSightConfig().threshold_fit == "cross_fit"
    assert CleanSightConfig(feature="masses").detector.width == 2
    for bad, msg in (({"feature": "x"}, "feature='x'"), ({"whitening": "full"}, "whitening='full'"),
                     ({"threshold_fit": "oof"}, "threshold_fit='oof'"), ({"folds": 1}, "folds=1"),
                     ({"log_eps": 0.0}, "log_eps=0.0")):
        with pytest.raises(InputError, match=f"CleanSightConfig: {msg}"):
            CleanSightConfig(**bad)
    with pytest.raises(InputError, match="cross_fit' needs at least 3"):
        CleanSight(layers=[1]).fit(None, _samples(2))


def test_ledoit_wolf_calibration_round_trip(llava, tmp_path):
    cs = CleanSight(layers=[1, 2], feature="masses", whitening="ledoit_wolf", tau=1e-3).fit(llava, _samples(10))
    assert cs.calibration.matrix.shape == (16, 16) and cs.calibration.mu.shape == (16,)
    loaded = CleanSight.load(cs.save(tmp_path / "lw.json"), model=llava)
    assert np.array_equal(loaded.calibration.matrix, cs.calibration.matrix)
    batch = _batch(llava, _samples(3, offset=70))
    assert torch.equal(loaded.score(llava, batch), cs.score(llava, batch))


# ------------------------------------------------------------------------------------ the threshold's promise
@pytest.fixture(scope="module")
def badnet_masses():
    """Group masses of every layer of tiny-llava/badnet: 200 clean calibration scenes and 1000 other clean
    test scenes (one forward pass each; every setting below reuses them)."""
    import cleansight_analysis as cs_pkg
    from cleansight_analysis.defenses.layers import select_detection_layers
    from cleansight_analysis.detection import sample_masses
    from cleansight_analysis.training.recipe import TinyRecipe

    t0 = time.perf_counter()
    model = cs_pkg.load_lvlm("tiny-llava/badnet")
    world = TinyRecipe().world()
    cal, test = world.samples("calibration", 200), world.samples("test", 1000)
    layers = select_detection_layers(model, cal[:16], window=3)  # what CleanSight(layers="auto") picks
    mc = sample_masses(model, cal, layers, batch_size=64)[0]
    mt = sample_masses(model, test, layers, batch_size=64)[0]
    return mc, mt, layers, time.perf_counter() - t0


@pytest.mark.parametrize("feature", ["default", "ratio"])  # ratio: the paper's feature and whitening
def test_false_positive_rate_keeps_the_quantile_on_new_clean_scenes(badnet_masses, feature):
    """Calibrated on 200 clean scenes, the default threshold (cross-fitted) flags about 1 - q of 1000 other
    clean scenes: 1 - q = 0.01 lies in the 99.9 % Clopper-Pearson interval of the observed FPR. The paper's
    in-sample threshold on the same features does not (about 6 % here).

    The interval covers the test scenes' binomial noise only; the threshold itself moves with the calibration
    draw (a 0.99 quantile of 200 values), so the seeded draw is part of the test (docs/detector.md averages 5)."""
    mc, mt, layers, seconds = badnet_masses
    base = DetectorSettings() if feature == "default" else DetectorSettings(feature="ratio", whitening="diagonal")
    det = fit_detector(base.features(mc), base)
    k = int((det.distance(base.features(mt)) > det.gamma).sum())
    lo, hi = clopper_pearson(k, len(mt), 0.999)
    paper = replace(base, threshold_fit="in_sample")
    pdet = fit_detector(paper.features(mc), paper)
    k_paper = int((pdet.distance(paper.features(mt)) > pdet.gamma).sum())
    print(f"\n{base.feature}/{base.whitening} layers {layers}: cross-fit FPR {k / len(mt):.3f} "
          f"(99.9% CI {lo:.3f}-{hi:.3f}); in-sample FPR {k_paper / len(mt):.3f}; forward passes {seconds:.0f} s")
    assert lo <= 1 - base.quantile <= hi
    lo_paper, hi_paper = clopper_pearson(k_paper, len(mt), 0.999)
    assert not lo_paper <= 1 - base.quantile <= hi_paper  # the in-sample threshold breaks the promise here
    assert k < k_paper
