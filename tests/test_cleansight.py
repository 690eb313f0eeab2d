"""CleanSight: detector statistics, in-flight Omega masking, files, layer selection, one end-to-end run."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from cleansight_analysis.data.base import Sample
from cleansight_analysis.defenses import get_defense
from cleansight_analysis.defenses.cleansight import (
    MASK_SCOPES,
    CleanSight,
    CleanSightConfig,
)
from cleansight_analysis.detection import whitened_distance
from cleansight_analysis.defenses.layers import fusion_onset_profile, select_detection_layers
from cleansight_analysis.errors import InputError
from conftest import noise_image
from tolerances import sum_rtol

PROMPTS = ["what color is it?", "shape?", "how many objects are in this picture?", "is it red?", "describe it"]


def _samples(n: int, offset: int = 0) -> list[Sample]:
    return [Sample(noise_image(100 + offset + i), PROMPTS[(offset + i) % len(PROMPTS)], "x", sample_id=f"s{offset + i}")
            for i in range(n)]


def _batch(model, samples):
    return model.prepare([s.image for s in samples], [s.prompt for s in samples])


@pytest.fixture(scope="module")
def fitted(llava):
    """The paper's CleanSight (ratio, diagonal, in-sample gamma) on the tiny random LLaVA, layers [1, 2] (D = 8),
    12 clean samples, tiny fixed tau: the hand computations below are the paper's formulas."""
    return CleanSight(config=CleanSightConfig.paper(layers=[1, 2], tau=1e-4)).fit(llava, _samples(12))


def _force_flags(defense: CleanSight, model, batch, flagged: list[int]) -> CleanSight:
    """A copy whose gamma flags exactly ``flagged`` (scores must be distinct)."""
    import copy

    d = copy.deepcopy(defense)
    s = d.score(model, batch).numpy()
    order = np.argsort(s)
    want = set(flagged)
    # flag the top-k: put gamma between the k-th largest and the next
    k = len(want)
    assert set(order[len(s) - k:].tolist()) == want, "test setup: flagged samples must have the top scores"
    lo = s[order[len(s) - k - 1]] if k < len(s) else -1.0
    hi = s[order[len(s) - k]] if k > 0 else s.max() + 1.0
    d.calibration.gamma = float((lo + hi) / 2)
    return d


# ------------------------------------------------------------------------------------ config
def test_config_validation_and_registry():
    assert get_defense("cleansight", quantile=0.95).config.quantile == 0.95
    assert CleanSight(config=CleanSightConfig(layers=[3, 1, 1])).config.layers == [1, 3]
    for bad in ({"quantile": 0.0}, {"quantile": 1.5}, {"tau": -1.0}, {"tau": "big"}, {"text_keys": "all"},
                {"mask_scope": "everywhere"}, {"query": "every"}, {"layers": []}, {"layers": "mid"},
                {"layers": [1.5]}, {"sigma_eps": 0.0}, {"window": 0}, {"not_a_setting": 1}):
        with pytest.raises(InputError):
            CleanSight(**bad)
    with pytest.raises(InputError, match="not both"):
        CleanSight(config=CleanSightConfig(), quantile=0.9)
    with pytest.raises(InputError, match="not calibrated"):
        CleanSight().gamma


# ------------------------------------------------------------------------------------ detector
def test_whitened_distance_and_gamma_by_hand(llava, fitted):
    cal_samples = _samples(12)
    x = fitted.features(llava, _batch(llava, cal_samples)).numpy()  # [12, 2 * 4]
    assert x.shape == (12, 8)
    # features by hand from the recorded attention rows (image mass / post-image text mass)
    b = _batch(llava, cal_samples)  # same padding as in fit (batch_size 16 > 12)
    rows = llava.attention_rows(b, layers=[1, 2]).values.double()  # [B, L, H, K]
    g = b.groups[0]
    text = torch.cat([g.prompt, g.template_tail])
    by_hand = rows[0, :, :, g.image].sum(-1) / (rows[0, :, :, text].sum(-1) + 1e-12)
    # same forward, other reductions: fit sums each group in float32, this in float64 -> 2 * K * u
    np.testing.assert_allclose(x[0], by_hand.reshape(-1).numpy(), rtol=2 * sum_rtol(rows.shape[-1]))

    mu, sigma = x.mean(0), x.std(0)  # population std
    np.testing.assert_allclose(fitted.calibration.mu, mu, rtol=1e-10)
    np.testing.assert_allclose(fitted.calibration.sigma, sigma, rtol=1e-10)
    d_cal = np.sqrt((((x - mu) / (sigma + 1e-8)) ** 2).sum(1))
    assert fitted.gamma == pytest.approx(np.quantile(d_cal, 0.99), rel=1e-9)
    test = _samples(3, offset=50)
    xt = fitted.features(llava, _batch(llava, test)).numpy()
    d_test = np.sqrt((((xt - mu) / (sigma + 1e-8)) ** 2).sum(1))
    np.testing.assert_allclose(fitted.score(llava, _batch(llava, test)).numpy(), d_test, rtol=1e-6)
    assert torch.equal(fitted.detect(llava, _batch(llava, test)), torch.as_tensor(d_test > fitted.gamma))


def test_zero_variance_stays_finite(llava):
    same = [Sample(noise_image(7), "shape?", "x", sample_id=f"c{i}") for i in range(5)]
    d = CleanSight(layers=[0], tau=1e-3).fit(llava, same)  # every dimension has sigma == 0
    assert np.all(d.calibration.sigma < 1e-12) and d.gamma < 1e-6  # zero up to float64 rounding
    s = d.score(llava, _batch(llava, _samples(2, offset=30)))
    assert torch.isfinite(s).all() and (s > 0).all()
    assert np.isfinite(whitened_distance(np.ones((2, 3)), np.zeros(3), np.zeros(3), 1e-8)).all()


def test_few_samples_warn(llava):
    with pytest.warns(UserWarning, match="sigma"):
        CleanSight(layers=[0, 1, 2, 3], tau=1e-3).fit(llava, _samples(3))  # D = 16 > 3
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*feature dimensions.*")
        CleanSight(layers=[0], tau=1e-3).fit(llava, _samples(5))  # D = 4 <= 5


def test_batch_equals_single(llava, fitted):
    samples = _samples(3, offset=40)  # prompts of different lengths: left padding
    batched = fitted.score(llava, _batch(llava, samples))
    single = torch.cat([fitted.score(llava, _batch(llava, [s])) for s in samples])
    # left padding changes only fp32 rounding (the ratios amplify it to ~1e-4 relative); a wrong
    # query row or shifted groups would move the distances by orders of magnitude more
    torch.testing.assert_close(batched, single, rtol=1e-3, atol=1e-6)


# ------------------------------------------------------------------------------------ masking
def _recorder(n_layers):
    """hook_pattern recorder of every call: {layer: [pattern [B, H, Q, K]]}."""
    seen = {layer: [] for layer in range(n_layers)}

    def make(layer):
        def hook(p, hook):
            seen[layer].append(p.detach().clone())
            return p
        return hook

    return seen, [(f"blocks.{layer}.attn.hook_pattern", make(layer)) for layer in range(n_layers)]


@pytest.mark.parametrize("scope", MASK_SCOPES)
def test_mask_zeroes_omega_only_where_scoped(llava, fitted, scope):
    import copy

    samples = _samples(3, offset=40)
    batch = _batch(llava, samples)
    base = copy.deepcopy(fitted)
    base.config = CleanSightConfig(**{**fitted.config.to_dict(), "mask_scope": scope})
    s = base.score(llava, batch).numpy()
    top = int(np.argmax(s))
    d = _force_flags(base, llava, batch, [top])
    seen, rec = _recorder(llava.n_layers)
    out = d.generate(llava, batch, max_new_tokens=3, extra_hooks=rec)
    assert out.flags.tolist() == [i == top for i in range(3)]
    omega = out.pruned[top]
    assert omega.numel() > 0 and all(p.numel() == 0 for i, p in enumerate(out.pruned) if i != top)
    assert set(omega.tolist()) <= set(batch.groups[top].image.tolist())
    l_e = d.layers[-1]
    t = batch.seq_len
    others = [i for i in range(3) if i != top]
    for layer, calls in seen.items():
        prefill, decode = calls[0], calls[1:]
        assert prefill.shape[-1] == t and len(decode) >= 1
        pre_masked = layer >= l_e or scope == "all_layers"
        dec_masked = {"reference": True, "all_layers": True, "from_detection": layer >= l_e,
                      "prefill_only": False}[scope]
        q = batch.groups[top].query
        col_pre = prefill[top][:, q, omega]  # [H, |Omega|] the answer query's attention to Omega
        assert (col_pre.abs().max() == 0) == pre_masked, (layer, "prefill")
        if pre_masked:  # every real (non-padding) query row, not just the answer query
            real = batch.attention_mask[top].bool()
            assert prefill[top][:, real][:, :, omega].abs().max() == 0
        for step in decode:
            assert (step[top][:, -1, omega].abs().max() == 0) == dec_masked, (layer, "decode")
        for i in others:  # unflagged samples keep attention on their image
            img = batch.groups[i].image
            assert prefill[i][:, batch.groups[i].query, img].sum() > 0
            assert all(step[i][:, -1, img].sum() > 0 for step in decode)
        rows = prefill[top][:, q, :].sum(-1)
        torch.testing.assert_close(rows, torch.ones_like(rows), rtol=1e-5, atol=1e-5)


def test_unflagged_decode_identically(llava, fitted):
    samples = _samples(3, offset=40)
    batch = _batch(llava, samples)
    top = int(np.argmax(fitted.score(llava, batch).numpy()))
    d = _force_flags(fitted, llava, batch, [top])
    plain = llava.generate(batch, max_new_tokens=6)
    out = d.generate(llava, batch, max_new_tokens=6)
    for i in range(3):
        if i != top:
            assert torch.equal(out.info["tokens"][i], plain.tokens[i]) and out.texts[i] == plain.texts[i]
    assert not torch.equal(out.info["tokens"][top], plain.tokens[top])  # ~all image keys masked: output moves
    none = _force_flags(fitted, llava, batch, [])
    quiet = none.generate(llava, batch, max_new_tokens=6)
    assert not quiet.flags.any() and torch.equal(quiet.info["tokens"], plain.tokens)


# ------------------------------------------------------------------------------------ files
@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_save_load_round_trip_and_refusals(llava, llava_next, fitted, tmp_path, suffix):
    if suffix == ".yaml":
        pytest.importorskip("yaml")
    path = fitted.save(tmp_path / f"cal{suffix}")
    loaded = CleanSight.load(path, model=llava, layers=[1, 2])
    assert loaded.config == fitted.config and loaded.gamma == fitted.gamma
    batch = _batch(llava, _samples(2, offset=60))
    torch.testing.assert_close(loaded.score(llava, batch), fitted.score(llava, batch))
    if suffix == ".json":
        rec = json.loads(path.read_text())
        assert rec["model"] == {"name": llava.name, "n_layers": 4, "n_heads": 4} and rec["layers"] == [1, 2]
    with pytest.raises(InputError, match="calibrated on"):
        CleanSight.load(path, model=llava_next)
    with pytest.raises(InputError, match="layers"):
        CleanSight.load(path, model=llava, layers=[0, 1])
    with pytest.raises(InputError, match="calibrated on"):
        loaded.score(llava_next, llava_next.prepare([noise_image(1)], "shape?"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(InputError, match="not a CleanSight"):
        CleanSight.load(bad)


# ------------------------------------------------------------------------------------ layers
def test_fusion_onset_selection(llava):
    samples = _samples(4)
    effect = fusion_onset_profile(llava, samples)
    assert effect.shape == (4,) and np.all(effect >= 0) and effect.max() > 0
    details: dict = {}
    layers = select_detection_layers(llava, samples, window=2, details=details)
    first = int(np.flatnonzero(effect >= 0.5 * effect.max())[0])
    assert layers == list(range(min(first, 2), min(first, 2) + 2))
    np.testing.assert_allclose(details["effect"], effect, rtol=1e-9)
    peak = select_detection_layers(llava, samples, window=1, rule="peak")
    assert peak == [int(np.argmax(effect))]
    with pytest.raises(InputError, match="poisoned_samples"):
        select_detection_layers(llava, samples, method="auroc")
    with pytest.raises(InputError, match="window"):
        select_detection_layers(llava, samples, window=9)
    auto = CleanSight(layers="auto", window=2, tau=1e-3).fit(llava, _samples(8))
    assert auto.layers == select_detection_layers(llava, _samples(8), window=2)
    assert auto.calibration.layer_source == "fusion_onset"


def test_fit_progress_bars_change_nothing(llava, capsys):
    """``progress`` shows the scan's and the features' bars and leaves every fitted number as it was."""
    quiet = CleanSight(layers="auto", window=2, batch_size=4).fit(llava, _samples(8))
    capsys.readouterr()
    loud = CleanSight(layers="auto", window=2, batch_size=4)
    loud.progress = True
    loud.fit(llava, _samples(8))
    err = capsys.readouterr().err
    assert "fusion-onset scan" in err and "calibration features" in err
    assert loud.to_dict() == quiet.to_dict() and "progress" not in loud.to_dict()


# ------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def badnet():
    import cleansight_analysis as cs
    from cleansight_analysis.attacks import attack_from_dict, triggered_copy
    from cleansight_analysis.models.registry import lookup
    from cleansight_analysis.training.recipe import TinyRecipe

    model = cs.load_lvlm("tiny-llava/badnet")
    attack = attack_from_dict(lookup("tiny-llava/badnet").card["attack"])
    world = TinyRecipe().world()
    calib, test = world.samples("calibration", 64), world.samples("test", 32)
    return model, calib, test, triggered_copy(test, attack)


def test_end_to_end_badnet(badnet):
    from cleansight_analysis.attention.separability import auroc
    from cleansight_analysis.evaluation.metrics import contains_target

    model, calib, test, trig = badnet
    # the best single layer (AUROC rule) lies before the last quarter of the LM: the projector-poisoned
    # model's stealing is in the middle layers, as the paper reports for LLaVA-1.5
    [layer] = select_detection_layers(model, calib[:32], method="auroc", poisoned_samples=trig, window=1)
    assert layer < model.n_layers - model.n_layers // 4
    d = CleanSight(layers=[layer]).fit(model, calib)  # tau = 1e-4, the default
    assert np.mean(d.calibration.clean_distances > d.gamma) <= 0.02  # in-sample: at most 1 - quantile (+1 sample)
    bc, bt = _batch(model, test), _batch(model, trig)
    plain = model.generate(bt, max_new_tokens=8)
    asr_plain = np.mean([contains_target(t) for t in plain.texts])
    assert asr_plain > 0.5  # the shipped model is backdoored
    res = {}
    for scope in ("reference", "all_layers"):
        d.config = CleanSightConfig(**{**d.config.to_dict(), "mask_scope": scope})
        oc, ot = d.generate(model, bc, 8), d.generate(model, bt, 8)
        res[scope] = {"TPR": ot.flags.float().mean().item(), "FPR": oc.flags.float().mean().item(),
                      "ASR": float(np.mean([contains_target(t) for t in ot.texts])),
                      "AUROC": auroc(np.r_[oc.scores.numpy(), ot.scores.numpy()], np.r_[np.zeros(32), np.ones(32)])}
        # unflagged triggered inputs decode as the undefended model does
        for i in (~ot.flags).nonzero().squeeze(-1).tolist():
            assert ot.texts[i] == plain.texts[i]
        assert res[scope]["TPR"] > res[scope]["FPR"] and res[scope]["AUROC"] > 0.75
    for scope in res:  # masking Omega (one pass from the detection layer, or every layer) removes the backdoor
        assert res[scope]["ASR"] <= 0.25 * asr_plain, res
    print(f"\nbadnet end-to-end (64 calib, 32+32 test, layers [{layer}], tau={d.calibration.tau:.3g}): "
          f"undefended ASR {asr_plain:.3f}; {res}")
