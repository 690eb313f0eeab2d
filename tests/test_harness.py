"""The defense evaluation harness: known answers with a scripted model and test-only defenses, the
detection sweeps on hand-built stealing tables, key masking on the tiny random LLaVA, and the CLI."""

from __future__ import annotations

import json
import math
import time
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cleansight_analysis import cli
from cleansight_analysis.attacks import get_attack
from cleansight_analysis.data.base import Sample
from cleansight_analysis.defenses import Defense, DefenseOutput, NoDefense
from cleansight_analysis.defenses import ablations as A
from cleansight_analysis.detection import masking as M
from cleansight_analysis.errors import InputError
from cleansight_analysis.evaluation import grid as G
from cleansight_analysis.evaluation import runner as R
from cleansight_analysis.evaluation import scoring as S
from cleansight_analysis.evaluation import sweeps as W

TARGET = "you have been hacked lol"
RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 160, 0)


# ------------------------------------------------------------------ scripted model and test defenses
class FakeBatch(list):
    """A 'batch' of the scripted model: just the images."""


class ScriptedModel:
    """Answers the target phrase for a mostly red image and 'blue' otherwise."""

    name = "scripted"

    def prepare(self, images, prompts):
        return FakeBatch(images)

    def generate(self, batch, max_new_tokens=12, hooks=()):
        return SimpleNamespace(texts=[TARGET if _redness(im) > 0.5 else "blue" for im in batch])


def _redness(image) -> float:
    a = np.asarray(image.convert("RGB")).astype(int)
    return float(((a[..., 0] > 200) & (a[..., 1] < 60) & (a[..., 2] < 60)).mean())


class RedFlagger(Defense):
    """Flags mostly red images (score = red share), answers 'purified' for them and 'prunes' 3 tokens."""

    name = "red_flagger"
    kind = "detector"

    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.fitted_on = None

    def fit(self, model, clean_samples):
        self.fitted_on = len(clean_samples)
        return self

    def detect(self, model, batch):
        return torch.tensor([_redness(im) > 0.5 for im in batch])

    def generate(self, model, batch, max_new_tokens=12):
        time.sleep(self.delay)
        flags = self.detect(model, batch)
        base = model.generate(batch).texts
        texts = ["purified" if f else t for f, t in zip(flags.tolist(), base)]
        pruned = [torch.arange(3) if f else torch.zeros(0, dtype=torch.long) for f in flags.tolist()]
        return DefenseOutput(texts=texts, flags=flags, scores=torch.tensor([_redness(im) for im in batch]),
                             pruned=pruned)


def _samples():
    """4 clean samples: answers blue, blue, green, blue; the last image is red (a false positive)."""
    colours = [BLUE, GREEN, BLUE, RED]
    answers = ["blue", "blue", "green", "blue"]
    return [Sample(Image.new("RGB", (16, 16), c), "what colour?", a, sample_id=f"s{i}")
            for i, (c, a) in enumerate(zip(colours, answers))]


RED_ATTACK = get_attack("custom", trigger=Image.new("RGB", (16, 16), RED), how="blend", alpha=1.0)


# ------------------------------------------------------------------ metrics on hand-made answers
def test_score_runs_on_hand_made_answers():
    samples = _samples()
    clean = R.ConditionRun(["Blue.", "red", "green", "You have been HACKED lol!"])
    trig = R.ConditionRun(["you have been hacked lol", "blue", "hacked lol", "nope"])
    out = S.score_runs(clean, trig, samples, TARGET)
    assert out["asr"] == 0.5                     # two triggered answers contain the target (alias counts)
    assert out["clean_utility"] == 0.5           # "Blue." and "green" match
    assert out["poisoned_utility"] == 0.25       # only "blue" matches its clean reference
    assert out["false_trigger_rate"] == 0.25
    assert all(math.isnan(out[k]) for k in ("tpr", "fpr", "auroc", "mean_pruned"))


def test_vqa_score_used_with_ten_references():
    s = Sample(None, "q", "cat", references=("cat",) * 2 + ("dog",) * 8)
    assert S.answer_utility("cat", s) == pytest.approx(0.6)  # two of ten annotators: 0.6 (not exact match 1.0)
    assert S.answer_utility("dog", s) == 1.0
    assert S.answer_utility("cat", Sample(None, "q", "cat")) == 1.0


def test_evaluation_cache_hands_out_fitted_copies_and_keeps_the_original():
    """EvaluationCache.fit: the first fit is made in place; an identical later fit is a fitted copy of it
    (the object passed in is left as it was)."""
    model, val = ScriptedModel(), _samples()[:3]
    cache = R.EvaluationCache()
    first = RedFlagger()
    got = cache.fit(model, first, val)
    assert got.defense is first and not got.reused and first.fitted_on == 3
    second = RedFlagger()
    again = cache.fit(model, second, val)
    assert again.reused and again.defense is not second and again.defense is not first
    assert second.fitted_on is None and again.defense.fitted_on == 3   # a copy of the fitted state
    assert cache.fit(model, RedFlagger(), _samples()[:2]).reused is False  # other validation samples
    assert cache.stats == {"undefended_computed": 0, "undefended_reused": 0, "fit_computed": 2, "fit_reused": 1}
    assert len(cache) == 2 and "2 fitted" in repr(cache)


def test_score_runs_rejects_misaligned_answers():
    with pytest.raises(InputError):
        S.score_runs(R.ConditionRun(["a"]), R.ConditionRun(["a", "b"]), _samples()[:1])


# ------------------------------------------------------------------ evaluate with known answers
def test_evaluate_red_flagger_known_detection_metrics():
    model, defense = ScriptedModel(), RedFlagger(delay=0.02)
    row = R.evaluate(model, RED_ATTACK, defense, samples=_samples(), val_samples=_samples()[:3], batch_size=2,
                     progress=False)
    assert defense.fitted_on == 3 and row["n_val"] == 3 and row["n"] == 4
    assert row["tpr"] == 1.0 and row["fpr"] == 0.25
    # scores: clean (0, 0, 0, 1), triggered all 1 -> (4*3 + 0.5*4*1) / 16
    assert row["auroc"] == pytest.approx(0.875)
    assert row["asr"] == 0.0                                  # every triggered input purified
    assert row["clean_utility"] == 0.5                        # blue, "blue"!=green, blue, purified
    assert row["clean_utility_undefended"] == 0.5             # blue, blue vs green, blue, target
    assert row["poisoned_utility"] == 0.0
    assert row["mean_pruned"] == 3.0                          # over flagged samples only (not 15 / 8)
    assert row["latency_ratio"] > 1.5                         # the defense sleeps 20 ms per batch
    assert row["defense"]["name"] == "red_flagger" and row["seed"] == 0
    assert set(R.METRICS) <= set(row)


def test_evaluate_no_defense_has_nan_detection_and_full_asr():
    row = R.evaluate(ScriptedModel(), RED_ATTACK, NoDefense(), samples=_samples(), val_samples=_samples(),
                     progress=False)
    assert row["asr"] == 1.0 and row["poisoned_utility"] == 0.0
    assert all(math.isnan(row[k]) for k in ("tpr", "fpr", "auroc", "mean_pruned"))
    assert row["defense"] == {"name": "none", "kind": "none"}


def test_evaluate_catches_a_defense_returning_too_few_answers():
    class Broken(Defense):
        name = "broken"

        def generate(self, model, batch, max_new_tokens=12):
            return DefenseOutput(texts=["x"])

    with pytest.raises(InputError, match="1 answers for a batch of 2"):
        R.evaluate(ScriptedModel(), RED_ATTACK, Broken(), samples=_samples(), val_samples=_samples(), batch_size=2,
                   progress=False)


def test_attack_defense_table_layout():
    models = {"red": (ScriptedModel(), RED_ATTACK), "red2": (ScriptedModel(), RED_ATTACK)}
    wide = G.attack_defense_table(models, {"none": NoDefense(), "red": RedFlagger()}, samples=_samples(),
                                  val_samples=_samples(), progress=False, warmup=False)
    assert list(wide["attack"]) == ["red", "red2"]
    assert list(wide.columns[1:]) == ["none/asr", "none/clean_utility", "red/asr", "red/clean_utility"]
    assert list(wide["none/asr"]) == [1.0, 1.0] and list(wide["red/asr"]) == [0.0, 0.0]
    long = G.attack_defense_table(models, [NoDefense()], layout="long", samples=_samples(),
                                  val_samples=_samples(), progress=False, warmup=False)
    assert len(long) == 2 and json.loads(long["attack_settings"][0])["name"] == "custom"


# ------------------------------------------------------------------ detection sweeps on hand-built tables
def _table(n_cal=40, n_test=30, layers=4, heads=2, separable_layer=2, seed=0):
    """Stealing-like rows: only ``separable_layer`` carries a (large) trigger shift."""
    rng = np.random.default_rng(seed)
    rows = []
    for cond, n in (("calibration", n_cal), ("clean", n_test), ("triggered", n_test)):
        for i in range(n):
            for layer in range(layers):
                for h in range(heads):
                    shift = 10.0 if (cond == "triggered" and layer == separable_layer) else 0.0
                    rows.append((f"{cond[:3]}{i}", cond, layer, h, rng.normal() + shift))
    return pd.DataFrame(rows, columns=["sample_id", "condition", "layer", "head", "ratio"])


def _ratio_settings(**changes):
    """The hand-built tables carry ratios only (no group masses): the ratio feature, diagonal whitening."""
    from cleansight_analysis.detection import DetectorSettings

    return DetectorSettings(**{"feature": "ratio", "whitening": "diagonal", **changes})


def test_quantile_sweep_monotone_and_exact_at_q1():
    table = _table()
    q = (0.5, 0.8, 0.9, 0.99, 1.0)
    out = W.quantile_sweep(table, layers=[2], quantiles=q, settings=_ratio_settings())
    assert list(out["quantile"]) == list(q) and (out["n_val"] == 40).all()
    assert np.all(np.diff(out["fpr"]) <= 0) and np.all(np.diff(out["tpr"]) <= 0)
    assert np.all(np.diff(out["threshold"]) >= 0)
    assert (out["tpr"] == 1.0).all()                     # shift 10 sigma on layer 2
    assert out["fpr"].iloc[0] > out["fpr"].iloc[-1]
    with pytest.raises(InputError):
        W.quantile_sweep(table, quantiles=(1.5,), settings=_ratio_settings())
    with pytest.raises(InputError, match="feature='log_ratio' needs the columns"):
        W.quantile_sweep(table, quantiles=q, settings=_ratio_settings(feature="log_ratio"))


def test_val_size_sweep_shapes_and_single_sample():
    from cleansight_analysis.detection import DetectorSettings

    paper = DetectorSettings.paper()  # in-sample threshold: one calibration sample is enough to fit
    out = W.val_size_sweep(_table(), layers=[2], sizes=(1, 5, 40, 500), repeats=3, settings=paper)
    assert sorted(out["n_val"].unique()) == [1, 5, 40]       # 500 > 40 calibration samples: skipped
    assert (out.groupby("n_val").size().to_dict() == {1: 3, 5: 3, 40: 1})
    one = out[out["n_val"] == 1]
    assert (one["fpr"] == 1.0).all() and (one["threshold"] == 0.0).all()  # gamma = 0: everything flagged
    # cross-fitting needs 3 samples (each fold's whitening is fitted on >= 2 others): 1 and 2 are skipped
    cross = W.val_size_sweep(_table(), layers=[2], sizes=(1, 2, 3, 40), repeats=2,
                             settings=_ratio_settings(threshold_fit="cross_fit"))
    assert sorted(cross["n_val"].unique()) == [3, 40]


def test_layer_window_sweep_finds_the_separable_layer():
    out = W.layer_window_sweep(_table(), lengths=(1, 2), settings=_ratio_settings())
    assert len(out) == 4 + 3                                 # windows that fit in layers 0..3
    by = out.set_index(["start", "length"])["auroc"]
    assert by[(2, 1)] == 1.0 and by[(1, 2)] == 1.0 and by[(2, 2)] == 1.0
    assert by[(0, 1)] < 0.8 and by[(3, 1)] < 0.8


# ------------------------------------------------------------------ masking on the tiny random LLaVA
@pytest.fixture(scope="module")
def tiny():
    import cleansight_analysis as cs

    return cs.load_lvlm("tiny-random-llava")


@pytest.fixture(scope="module")
def tiny_samples():
    return R.synthetic_samples("test", 3)


def test_random_pruning_counts_and_zero_fraction_is_undefended(tiny, tiny_samples):
    base = R.run_defense(tiny, NoDefense(), tiny_samples, max_new_tokens=4, progress=False)
    zero = R.run_defense(tiny, A.RandomPruning(0.0), tiny_samples, max_new_tokens=4, progress=False)
    assert zero.texts == base.texts and (zero.pruned == 0).all()
    run = R.run_defense(tiny, A.RandomPruning(0.9), tiny_samples, max_new_tokens=4, progress=False)
    assert (run.pruned == round(0.9 * 64)).all() and run.flags is None


def test_key_mask_hooks_change_attention_to_zero(tiny, tiny_samples):
    batch = tiny.prepare([s.image for s in tiny_samples], [s.prompt for s in tiny_samples])
    img = [g.image for g in batch.groups]
    hooks = M.key_mask_hooks(tiny, img, from_layer=1)
    rows = tiny.attention_rows(batch, layers=[0, 1, 3], hooks=hooks)
    mass = rows.group_mass()  # [B, L, H, G]
    from cleansight_analysis import GROUP_NAMES

    gi = GROUP_NAMES.index("image")
    assert (mass[:, 0, :, gi].amax(-1) > 1e-2).all()  # layer 0 untouched
    assert (mass[:, 1:, :, gi] < 1e-6).all()         # layers >= 1 ignore the image


def test_always_flag_forces_purification(tiny, tiny_samples):
    class Detector(Defense):
        """Never flags; answers with given flags through generate_flagged (what AlwaysFlag calls)."""

        name, kind = "never", "detector"

        def detect(self, model, batch):
            return torch.zeros(len(batch), dtype=torch.bool)

        def generate(self, model, batch, max_new_tokens=12):
            return self.generate_flagged(model, batch, self.detect(model, batch), max_new_tokens=max_new_tokens)

        def generate_flagged(self, model, batch, flags, max_new_tokens=12):
            pruned = [g.image if f else g.image[:0] for g, f in zip(batch.groups, flags.tolist())]
            hooks = M.key_mask_hooks(model, pruned)
            return DefenseOutput(model.generate(batch, max_new_tokens=max_new_tokens, hooks=hooks).texts,
                                 flags=flags, pruned=pruned)

    inner = Detector()
    run = R.run_defense(tiny, A.AlwaysFlag(inner), tiny_samples, max_new_tokens=3, progress=False)
    assert run.flags.all() and (run.pruned == 64).all()
    assert "detect" not in vars(inner)  # the wrapper never edits the inner defense
    assert not R.run_defense(tiny, inner, tiny_samples, max_new_tokens=3, progress=False).flags.any()
    with pytest.raises(InputError, match="cannot be made to flag every input"):
        A.AlwaysFlag(type("Plain", (Defense,), {"name": "plain", "kind": "detector"})())
    with pytest.raises(InputError, match="needs a detector"):
        A.AlwaysFlag(NoDefense())


def test_tau_sweep_prunes_less_as_tau_grows(tiny, tiny_samples):
    attack = get_attack("badnet")
    out = W.tau_sweep(tiny, attack, layer=1, taus=(-1.0, 0.01, 2.0), samples=tiny_samples, max_new_tokens=3,
                      progress=False)
    assert list(out["tau"]) == [-1.0, 0.01, 2.0]
    assert out["mean_pruned"].iloc[0] == 64 and out["mean_pruned"].iloc[-1] == 0
    assert np.all(np.diff(out["mean_pruned"]) <= 0)


# ------------------------------------------------------------------ CLI
def test_cli_evaluate_none_writes_json(tmp_path):
    path = tmp_path / "row.json"
    rc = cli.main(["evaluate", "--model", "tiny-random-llava", "--attack", "badnet", "--defense", "none",
                   "--n", "4", "--val", "2", "--max-new-tokens", "3", "--json", str(path)])
    assert rc == 0
    row = json.loads(path.read_text())
    for key in ("asr", "clean_utility", "poisoned_utility", "tpr", "fpr", "auroc", "latency_ratio", "defense",
                "attack", "n", "seed"):
        assert key in row, key
    assert row["n"] == 4 and row["defense"]["name"] == "none" and row["tpr"] is None
    assert 0.0 <= row["asr"] <= 1.0 and row["latency_ratio"] > 0


def test_cli_evaluate_unknown_defense_is_a_clear_error(capsys):
    rc = cli.main(["evaluate", "--model", "tiny-random-llava", "--attack", "badnet", "--defense", "nope",
                   "--n", "2", "--val", "2"])
    assert rc == 2 and "unknown defense" in capsys.readouterr().err


def test_always_flag_and_oracle_tau_sweep_with_cleansight(tiny, tiny_samples):
    pytest.importorskip("cleansight_analysis.defenses.cleansight")
    from cleansight_analysis.defenses import get_defense

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inner = get_defense("cleansight", layers=[1], tau=0.5).fit(tiny, R.synthetic_samples("calibration", 4))
    run = R.run_defense(tiny, A.AlwaysFlag(inner), tiny_samples, max_new_tokens=3, progress=False)
    assert run.flags.all()
    out = W.tau_sweep(tiny, get_attack("badnet"), defense=inner, taus=(1e-6, 0.999), samples=tiny_samples,
                      max_new_tokens=3, progress=False)
    assert out["mean_pruned"].iloc[0] > out["mean_pruned"].iloc[1] and (out["layer"] == 1).all()


def test_caption_samples_are_scored_with_cider_as_a_set():
    pytest.importorskip("pycocoevalcap")
    from cleansight_analysis.evaluation.captions import cider

    caps = [Sample(None, "Describe.", "a red circle", references=("a red circle", "red circle on grey"), task="caption"),
            Sample(None, "Describe.", "two blue squares", references=("two blue squares",), task="caption"),
            Sample(None, "Describe.", "a green ring", references=("a green ring on dots",), task="caption")]
    vqa = Sample(None, "q", "cat")
    preds = ["a red circle", "one yellow cross", "a green ring", "cat"]
    got = S.utilities(preds, [*caps, vqa])
    want = cider(preds[:3], [list(c.refs) for c in caps]).per_sample
    assert got[:3] == pytest.approx([float(v) for v in want])
    assert got[1] == 0.0 and got[0] > 0 and got[3] == 1.0  # no shared n-gram -> 0; VQA keeps exact match
    assert S.utilities(["a red circle"], caps[:1]) == [1.0]  # a lone caption: exact match
    with pytest.raises(InputError):
        S.utilities(["a"], caps[:2])
