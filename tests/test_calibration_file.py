"""A hand-edited or foreign CleanSight calibration file never silently turns the defense off or on.

Each case edits one key of a saved file and checks that ``CleanSight.load`` raises ``CalibrationError``
with one line naming the file and the key; each would load (or fail with a raw ``KeyError`` /
``JSONDecodeError``) without its check. The weights fingerprint binds a file to the exact weights.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

import cleansight_analysis as cs
from cleansight_analysis.defenses.cleansight import FILE_VERSION, CleanSight, CleanSightConfig
from cleansight_analysis.errors import CalibrationError, InputError
from cleansight_analysis.models import tiny
from cleansight_analysis.models.fingerprint import weights_fingerprint
from test_cleansight import _batch, _samples


@pytest.fixture(scope="module")
def fitted(llava):
    """Layers [1, 2] of the tiny random LLaVA (D = 2 x 4 = 8: feature "ratio", diagonal whitening: mu and sigma are
    the whole calibration), 10 clean samples, tau="auto", the default cross-fitted threshold."""
    config = CleanSightConfig(layers=[1, 2], feature="ratio", whitening="diagonal", tau="auto")
    return CleanSight(config=config).fit(llava, _samples(10))


@pytest.fixture(scope="module")
def saved(fitted, tmp_path_factory):
    return fitted.save(tmp_path_factory.mktemp("cal") / "cal.json")


def _write(saved, tmp_path, edit) -> "Path":  # noqa: F821
    rec = json.loads(saved.read_text())
    edit(rec)
    out = tmp_path / "edited.json"
    out.write_text(json.dumps(rec, indent=1))  # NaN / Infinity written as JSON's non-standard tokens
    return out


def _refused(path, key: str, *, model=None, error=CalibrationError) -> str:
    with pytest.raises(error) as info:
        CleanSight.load(path, model=model)
    msg = str(info.value)
    assert isinstance(info.value, CalibrationError) and isinstance(info.value, InputError)
    assert "\n" not in msg and str(path) in msg, msg
    assert re.search(key, msg), f"{key!r} not in {msg!r}"
    return msg


def _set(*keys, value):
    def edit(rec):
        d = rec
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value(d[keys[-1]]) if callable(value) else value
    return edit


def _delete(*keys):
    def edit(rec):
        d = rec
        for k in keys[:-1]:
            d = d[k]
        del d[keys[-1]]
    return edit


CASES = {
    # case: (edit, key the message must name)
    "gamma NaN": (_set("calibration", "gamma", value=float("nan")), r"calibration\.gamma=nan .*NaN and Infinity"),
    "gamma -inf": (_set("calibration", "gamma", value=float("-inf")), r"calibration\.gamma=-inf"),
    "gamma Infinity": (_set("calibration", "gamma", value=float("inf")), r"calibration\.gamma=inf"),  # never flags
    "gamma negative": (_set("calibration", "gamma", value=-1.0), r"calibration\.gamma=-1\.0 .*>= 0"),
    "gamma missing": (_delete("calibration", "gamma"), r"missing key 'calibration\.gamma'"),
    "gamma string": (_set("calibration", "gamma", value="0.5"), r"calibration\.gamma='0\.5'"),
    "tau NaN": (_set("calibration", "tau", value=float("nan")), r"calibration\.tau=nan"),
    "tau 5": (_set("calibration", "tau", value=5.0), r"calibration\.tau=5\.0 .*\(0, 1\]"),
    "tau 0": (_set("calibration", "tau", value=0.0), r"calibration\.tau=0\.0"),
    "tau_source unknown": (_set("calibration", "tau_source", value="guess"), r"calibration\.tau_source='guess'"),
    "config.tau disagrees": (_set("config", "tau", value=0.5), r"config\.tau=0\.5"),
    "sigma 0": (_set("calibration", "sigma", value=lambda s: [0.0] + s[1:]), r"calibration\.sigma\[0\]=0\.0 .*> 0"),
    "sigma negative": (_set("calibration", "sigma", value=lambda s: s[:3] + [-s[3]] + s[4:]),
                       r"calibration\.sigma\[3\]=-"),
    "sigma Infinity": (_set("calibration", "sigma", value=lambda s: s[:-1] + [float("inf")]),
                       r"calibration\.sigma\[7\]=inf"),
    "mu NaN": (_set("calibration", "mu", value=lambda m: [float("nan")] + m[1:]), r"calibration\.mu\[0\]=nan"),
    "mu length 1": (_set("calibration", "mu", value=lambda m: m[:1]), r"calibration\.mu has 1 values; .*= 8"),
    "mu wrong length": (_set("calibration", "mu", value=lambda m: m[:7]), r"calibration\.mu has 7 values"),
    "sigma wrong length": (_set("calibration", "sigma", value=lambda s: s + s), r"calibration\.sigma has 16 values"),
    "layer out of range": (_set("calibration", "layers", value=[1, 9]), r"calibration\.layers\[1\]=9 .*\[0, 3\]"),
    "layer negative": (_set("calibration", "layers", value=[-1, 2]), r"calibration\.layers\[0\]=-1"),
    "layer not int": (_set("calibration", "layers", value=[1, 2.0]), r"calibration\.layers\[1\]=2\.0"),
    "layers repeated": (_set("calibration", "layers", value=[2, 2]), r"calibration\.layers=\[2, 2\] .*ascending"),
    "config.layers disagrees": (_set("config", "layers", value=[0, 2]), r"config\.layers=\[0, 2\]"),
    "n_heads edited": (_set("calibration", "model", "n_heads", value=2), r"calibration\.mu has 8 values; .*= 4"),
    "n_layers 0": (_set("calibration", "model", "n_layers", value=0), r"calibration\.model\.n_layers=0"),
    "fingerprint missing": (_delete("calibration", "model", "fingerprint"),
                            r"missing key 'calibration\.model\.fingerprint'.*recalibrate"),
    "fingerprint malformed": (_set("calibration", "model", "fingerprint", value="abc"),
                              r"calibration\.model\.fingerprint='abc'"),
    "clean_distances NaN": (_set("calibration", "clean_distances", value=lambda c: c[:-1] + [float("nan")]),
                            r"calibration\.clean_distances\[9\]=nan"),
    "calibration missing": (_delete("calibration"), r"missing key 'calibration'"),
    "config key missing": (_delete("config", "mask_scope"), r"missing key 'config\.mask_scope'"),
    "config quantile NaN": (_set("config", "quantile", value=float("nan")), r"config: .*quantile=nan"),
    "old version": (_set("version", value=1), r"version=1 .*before weight fingerprints.*recalibrate"),
    "version 2": (_set("version", value=2), r"version=2 .*before the detector settings.*recalibrate"),
    "feature unknown": (_set("calibration", "feature", value="entropy"), r"calibration\.feature='entropy'"),
    "config.feature disagrees": (_set("config", "feature", value="log_ratio"), r"config\.feature='log_ratio' disagrees"),
    "threshold_fit missing": (_delete("calibration", "threshold_fit"), r"missing key 'calibration\.threshold_fit'"),
    "matrix without ledoit_wolf": (_set("calibration", "matrix", value=[[1.0]]),
                                   r"calibration\.whitening='diagonal' takes no key 'calibration\.matrix'"),
    "masses need 2 values per head": (_set("calibration", "feature", value="masses"),
                                      r"calibration\.mu has 8 values; .*2 values per head.*= 16"),
    "summary model disagrees": (_set("model", "name", value="other"), r"model=.*'other'.* disagrees"),
    "unknown key": (_set("calibration", "gama", value=1.0), r"calibration has unknown key\(s\) \['gama'\]"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hand_edit_refused(saved, tmp_path, case):
    edit, key = CASES[case]
    _refused(_write(saved, tmp_path, edit), key)


def test_truncated_and_duplicate_keys_refused(saved, tmp_path):
    text = saved.read_text()
    cut = tmp_path / "cut.json"
    cut.write_text(text[: len(text) // 2])
    _refused(cut, r"is not valid JSON \(truncated or hand-edited\?\)")
    dup = tmp_path / "dup.json"
    dup.write_text(text.replace('"gamma":', '"gamma": -1.0, "gamma":', 1))  # a second gamma, last would win
    _refused(dup, r"key 'gamma' appears twice")
    _refused(tmp_path / "absent.json", "no such file")


def test_save_refuses_what_load_would(fitted, tmp_path):
    import copy

    d = copy.deepcopy(fitted)
    d.calibration.sigma[2] = 0.0  # e.g. a clean feature that never varied
    with pytest.raises(CalibrationError, match=r"CleanSight\.save: .*calibration\.sigma\[2\]=0\.0"):
        d.save(tmp_path / "zero.json")
    assert not (tmp_path / "zero.json").exists()


def test_round_trip_identical(llava, fitted, saved):
    loaded = CleanSight.load(saved, model=llava, layers=[1, 2])
    assert loaded.config == fitted.config and loaded.gamma == fitted.gamma
    assert loaded.calibration.tau == fitted.calibration.tau and loaded.calibration.tau_source == "auto"
    for name in ("mu", "sigma", "clean_distances"):
        assert torch.equal(torch.as_tensor(getattr(loaded.calibration, name)),
                           torch.as_tensor(getattr(fitted.calibration, name))), name
    assert loaded.calibration.model == fitted.calibration.model
    assert loaded.calibration.model["fingerprint"] == weights_fingerprint(llava)
    batch = _batch(llava, _samples(3, offset=50))
    assert torch.equal(loaded.score(llava, batch), fitted.score(llava, batch))
    assert torch.equal(loaded.detect(llava, batch), fitted.detect(llava, batch))


@pytest.fixture()
def fresh():
    """A private copy of tiny-random-llava (same seed, same weights as ``llava``), free to perturb."""
    return cs.load_lvlm("tiny-random-llava")


def test_perturbed_weight_refused(llava, fitted, saved, fresh):
    assert fresh.name == llava.name and weights_fingerprint(fresh) == weights_fingerprint(llava)
    loaded = CleanSight.load(saved, model=fresh)
    batch = _batch(fresh, _samples(1, offset=70))
    loaded.score(fresh, batch)  # the same weights: accepted
    p = fresh.hf_model.get_submodule("model.language_model.layers.1.self_attn.q_proj").weight
    with torch.no_grad():
        p.view(-1)[0].add_(1e-6)  # one weight, in place, by a tiny amount
    msg = _refused(saved, r"same name and shape, other weights; calibrate on this model with fit\(\)", model=fresh)
    short = loaded.calibration.model["fingerprint"].split(":")[1][:12]
    assert short in msg and weights_fingerprint(fresh).split(":")[1][:12] in msg
    with pytest.raises(CalibrationError, match=r"CleanSight\.score: .*other weights"):
        loaded.score(fresh, batch)  # the calibration in use is checked too


def test_same_name_other_weights_refused(saved):
    hf, processor = tiny.tiny_random_llava(seed=1)  # same name, same shape, other weights
    other = cs.load_lvlm(hf, processor=processor, name="tiny-random-llava")
    _refused(saved, r"'tiny-random-llava' \(fingerprint [0-9a-f]{12}\.\.\.\) are not the ones", model=other)


def test_fingerprint_cache_follows_in_place_edits(fresh):
    fp = weights_fingerprint(fresh)
    assert fp.startswith("sha256:") and weights_fingerprint(fresh) == fp
    p = fresh.hf_model.get_submodule("model.language_model.layers.0.mlp.down_proj").weight
    with torch.no_grad():
        p.mul_(1.0 + 1e-6)
    changed = weights_fingerprint(fresh)
    assert changed != fp
    p.data.mul_(1.0 + 1e-6)  # bypasses the autograd version counter: the documented cache blind spot
    assert weights_fingerprint(fresh) == changed
    assert weights_fingerprint(fresh, refresh=True) != changed


def test_file_version(saved):
    assert json.loads(saved.read_text())["version"] == FILE_VERSION == 3
