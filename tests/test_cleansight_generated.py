"""CleanSight with ``query="generated"``: every decoding query is scored, flags can rise mid-answer."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from cleansight_analysis.defenses.cleansight import CleanSight, CleanSightConfig
from cleansight_analysis.detection import whitened_distance
from cleansight_analysis.errors import InputError
from test_cleansight import _batch, _samples
from tolerances import distance_atol, ratio_rtol

LAYERS = [1, 2]
N_TOK = 4


@pytest.fixture(scope="module")
def gen_fitted(llava):
    """The paper's detector (ratio, diagonal, in-sample threshold): the hand computations below are its formulas."""
    config = CleanSightConfig.paper(layers=LAYERS, tau=1e-4, query="generated", calibration_tokens=N_TOK)
    return CleanSight(config=config).fit(llava, _samples(10))


def stealing_ratio(rows, img, txt, eps):
    """``S`` ``[B, H]`` by hand from rows ``[B, H, K]`` and key masks ``[B, K]``."""
    rows = rows.double()
    return (rows * img[:, None, :]).sum(-1) / ((rows * txt[:, None, :]).sum(-1) + eps)


def _ratios_from_rows(llava, batch, steps):
    """Hand computation: the stealing ratio of each decoding query from recorded attention rows."""
    rows = llava.attention_rows(batch, layers=LAYERS, query="generated", max_new_tokens=steps)  # [B, Q, L, H, K]
    vals = rows.values.double()
    b, q, _, _, k = vals.shape
    t = batch.seq_len
    out = torch.zeros(b, q, len(LAYERS) * llava.n_heads, dtype=torch.float64)
    for i, g in enumerate(batch.groups):
        img = torch.zeros(k, dtype=torch.bool)
        img[g.image] = True
        txt = torch.zeros(k, dtype=torch.bool)
        txt[g.positions("prompt")] = True
        txt[g.positions("template_tail")] = True
        txt[t:] = True                                  # generated tokens count as text keys
        for s in range(q):
            kk = t + s                                  # keys visible to query s
            per_layer = [stealing_ratio(vals[i:i + 1, s, j, :, :kk], img[None, :kk], txt[None, :kk], 1e-12)
                         for j in range(len(LAYERS))]
            out[i, s] = torch.cat(per_layer, 1)[0]
    return out


def test_config_refuses_scopes_that_cannot_act_on_decode_flags():
    for scope in ("prefill_only", "all_layers"):
        with pytest.raises(InputError, match="query='generated'"):
            CleanSightConfig(query="generated", mask_scope=scope)
    with pytest.raises(InputError, match="query='nope' must be one of"):
        CleanSightConfig(query="nope")
    with pytest.raises(InputError, match="calibration_tokens"):
        CleanSightConfig(query="generated", calibration_tokens=0)


def test_fit_pools_steps_and_thresholds_the_per_sample_maximum(llava, gen_fitted):
    samples = _samples(10)
    feats = []
    for start in range(0, 10, 5):
        batch = _batch(llava, samples[start:start + 5])
        feats.append(_ratios_from_rows(llava, batch, N_TOK))             # [5, N_TOK, D]; random model: no EOS
    x = torch.cat(feats).numpy()
    flat = x.reshape(-1, x.shape[-1])
    cal = gen_fitted.calibration
    # the features come from two float32 forwards (fit's batches vs these): each ratio carries
    # ratio_rtol(); a mean of positives keeps that relative bound, a std moves by at most rtol * rms(x)
    rtol = ratio_rtol()
    np.testing.assert_allclose(cal.mu, flat.mean(0), rtol=rtol, atol=0)
    assert np.all(np.abs(cal.sigma - flat.std(0)) <= rtol * np.sqrt((flat ** 2).mean(0)))
    per_sample = whitened_distance(flat, cal.mu, cal.sigma, 1e-8).reshape(10, N_TOK).max(1)
    # the max over steps moves by at most the largest per-step bound of that sample
    bound = distance_atol(flat, cal.sigma, rtol).reshape(10, N_TOK).max(1)
    assert np.all(np.abs(cal.clean_distances - per_sample) <= bound), (cal.clean_distances, per_sample, bound)
    assert cal.gamma == pytest.approx(float(np.quantile(cal.clean_distances, 0.99)), rel=1e-12)  # same numbers
    assert cal.extra["feature_rows"] == 10 * N_TOK


def test_flag_mid_answer_masks_from_that_step_only(llava, gen_fitted):
    batch = _batch(llava, _samples(3, offset=60))
    steps = _ratios_from_rows(llava, batch, N_TOK)                       # [3, N_TOK, D]
    cal = gen_fitted.calibration
    dist = np.stack([whitened_distance(steps[:, s].numpy(), cal.mu, cal.sigma, 1e-8) for s in range(N_TOK)], 1)
    # pick a sample whose distance rises after the prefill; put gamma between its prefill and its later peak
    rise = dist[:, 1:].max(1) - dist[:, 0]
    i = int(np.argmax(rise))
    assert rise[i] > 0
    d = copy.deepcopy(gen_fitted)
    gamma = float((dist[i, 0] + dist[i, 1:].max()) / 2)
    gamma = max(gamma, float(dist[:, 0].max()) + 1e-9)                  # nobody flagged at prefill
    d.calibration.gamma = gamma
    plain = llava.generate(batch, max_new_tokens=N_TOK)
    out = d.generate(llava, batch, max_new_tokens=N_TOK)
    flag_step = out.info["flag_step"]
    for j in range(3):
        crossing = np.nonzero(dist[j] > gamma)[0]
        if len(crossing) == 0:
            assert not out.flags[j] and flag_step[j] == -1
            assert torch.equal(out.info["tokens"][j], plain.tokens[j])     # unflagged: decoded exactly as undefended
        else:
            first = int(crossing[0])
            assert out.flags[j] and int(flag_step[j]) == first >= 1
            # tokens produced before the flag step are untouched
            assert torch.equal(out.info["tokens"][j, :first], plain.tokens[j, :first])
            assert out.pruned[j].numel() > 0
            assert set(out.pruned[j].tolist()) <= set(batch.groups[j].image.tolist())
    assert out.flags[i]
    # scores: each sample's largest distance over its steps (the defended run differs only after a flag)
    step_bound = distance_atol(steps[i].numpy(), cal.sigma, ratio_rtol())      # [N_TOK], two forwards apart
    assert float(out.scores[i]) >= (dist[i] - step_bound)[:int(flag_step[i]) + 1].max()
    bound = np.stack([distance_atol(steps[:, s].numpy(), cal.sigma, ratio_rtol()) for s in range(N_TOK)], 1).max(1)
    assert np.all(np.abs(d.score(llava, batch).numpy() - dist.max(1)) <= bound)


def test_prefill_flag_behaves_like_last_query(llava, gen_fitted):
    batch = _batch(llava, _samples(3, offset=80))
    d = copy.deepcopy(gen_fitted)
    d.calibration.gamma = -1.0                                            # everyone flagged at prefill
    out = d.generate(llava, batch, max_new_tokens=N_TOK)
    assert out.flags.all() and (out.info["flag_step"] == 0).all()
    last = copy.deepcopy(d)
    last.config = CleanSightConfig(**{**d.config.to_dict(), "query": "last"})
    ref = last.generate(llava, batch, max_new_tokens=N_TOK)
    assert torch.equal(out.info["tokens"], ref.info["tokens"])
    assert all(torch.equal(a, b) for a, b in zip(out.pruned, ref.pruned))
