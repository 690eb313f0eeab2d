"""Notebook 08 (paper Tables 1-4): the harness's shared undefended runs and fits give the same numbers as
stand-alone evaluation, each model is loaded once, and the table experiments / plots work on small inputs."""

from __future__ import annotations

import json
import math
import warnings
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cleansight_analysis.attacks import get_attack
from cleansight_analysis.data.base import Sample
from cleansight_analysis.defenses import Defense, DefenseOutput, NoDefense
from cleansight_analysis.defenses import ablations as A
from cleansight_analysis.errors import InputError
from cleansight_analysis.evaluation import grid as G
from cleansight_analysis.evaluation import runner as R

TARGET = "you have been hacked lol"
RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 160, 0)
#: Row columns that measure time or say whether work was shared (everything else must be identical).
TIMING = {"latency_ratio", "seconds_defended", "seconds_undefended", "fit_seconds", "undefended_reused", "fit_reused"}


# ------------------------------------------------------------------ a scripted model that counts its work
class CountingModel:
    """Answers the target for mostly red images, else 'blue'; counts prepare/generate calls and rows."""

    def __init__(self, name="scripted"):
        self.name = name
        self.generated_rows = 0
        self.generate_calls = 0

    def prepare(self, images, prompts):
        return list(images)

    def generate(self, batch, max_new_tokens=12, hooks=()):
        self.generate_calls += 1
        self.generated_rows += len(batch)
        return SimpleNamespace(texts=[TARGET if _redness(im) > 0.5 else "blue" for im in batch])


def _redness(image) -> float:
    a = np.asarray(image.convert("RGB")).astype(int)
    return float(((a[..., 0] > 200) & (a[..., 1] < 60) & (a[..., 2] < 60)).mean())


class RedFlagger(Defense):
    """Flags mostly red images and answers 'purified' for them; counts its fits."""

    name, kind = "red_flagger", "detector"

    def __init__(self):
        self.fits = 0
        self.threshold = None

    def fit(self, model, clean_samples):
        self.fits += 1
        self.threshold = 0.5
        return self

    def generate(self, model, batch, max_new_tokens=12):
        flags = torch.tensor([_redness(im) > self.threshold for im in batch])
        base = model.generate(batch).texts
        return DefenseOutput(texts=["purified" if f else t for f, t in zip(flags.tolist(), base)], flags=flags,
                             scores=torch.tensor([_redness(im) for im in batch]))

    def to_dict(self):
        return {"name": self.name, "threshold": self.threshold}


def _samples(n=4):
    colours = [BLUE, GREEN, BLUE, RED] * n
    answers = ["blue", "blue", "green", "blue"] * n
    return [Sample(Image.new("RGB", (16, 16), c), "what colour?", a, sample_id=f"s{i}")
            for i, (c, a) in enumerate(zip(colours[:n], answers[:n]))]


RED_ATTACK = get_attack("custom", trigger=Image.new("RGB", (16, 16), RED), how="blend", alpha=1.0)


def _strip_timing(row):
    return {k: v for k, v in row.items() if k not in TIMING}


def _same(a, b):
    assert set(a) == set(b)
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, float) and math.isnan(x):
            assert isinstance(y, float) and math.isnan(y), k
        else:
            assert x == y, (k, x, y)


# ------------------------------------------------------------------ reuse of the undefended run
def test_grid_runs_the_undefended_model_once_and_matches_standalone_rows():
    defenses = {"none": NoDefense, "red": RedFlagger, "red2": RedFlagger}
    kw = dict(samples=_samples(), val_samples=_samples(3), batch_size=2, progress=False)
    old_model = CountingModel()
    old = [R.evaluate(old_model, RED_ATTACK, make(), **kw) for make in defenses.values()]
    new_model = CountingModel()
    cache = R.EvaluationCache()
    grid = G.evaluation_grid({"red": (new_model, RED_ATTACK)}, {k: (lambda m=m: m()) for k, m in defenses.items()},
                             cache=cache, **kw)
    for want, (_, got) in zip(old, grid.iterrows()):
        got = got.to_dict()
        got["defense"], got["attack"] = json.loads(got.pop("defense_settings")), json.loads(got.pop("attack_settings"))
        _same(_strip_timing(want), {k: v for k, v in _strip_timing(got).items() if k in want})
    # stand-alone: per row 2 warm-up batches + undefended (2 batches) + clean (2) + triggered (2) = 8 calls
    assert old_model.generate_calls == 3 * 8
    # shared: warm-up + clean + triggered undefended once (1 + 2 + 2); each red row: warm-up + 2 + 2
    assert new_model.generate_calls == 5 + 2 * 5
    assert cache.stats["undefended_computed"] == 1 and cache.stats["undefended_reused"] == 2
    assert cache.stats["fit_computed"] == 1 and cache.stats["fit_reused"] == 1      # red2 reuses red's fit
    assert list(grid["undefended_reused"]) == [False, True, True]
    assert grid.loc[grid.defense_label == "none", "latency_ratio"].item() == 1.0   # its own runs are the baseline


def test_explicit_undefended_runs_are_checked_and_reused():
    model = CountingModel()
    runs = R.undefended_runs(model, RED_ATTACK, _samples(), batch_size=2, progress=False)
    assert runs.triggered is not None and len(runs.clean.texts) == 4
    before = model.generated_rows
    row = R.evaluate(model, RED_ATTACK, NoDefense(), samples=_samples(), val_samples=_samples(3), batch_size=2,
                     undefended=runs, progress=False)
    assert model.generated_rows == before and row["asr"] == 1.0 and row["undefended_reused"]
    with pytest.raises(InputError, match="other test samples or settings"):
        R.evaluate(model, RED_ATTACK, NoDefense(), samples=_samples(3), batch_size=2, undefended=runs,
                   progress=False)
    with pytest.raises(InputError, match="other test samples or settings"):
        R.evaluate(model, RED_ATTACK, NoDefense(), samples=_samples(), batch_size=4, undefended=runs, progress=False)
    with pytest.raises(InputError, match="from model"):
        R.evaluate(CountingModel("other"), RED_ATTACK, NoDefense(), samples=_samples(), batch_size=2,
                   undefended=runs, progress=False)


def test_grid_loads_each_model_once(monkeypatch):
    loads = []

    def fake_load(spec, device=None, **kw):
        loads.append(spec)
        return CountingModel(spec)

    monkeypatch.setattr(G, "load_lvlm", fake_load)  # the name evaluation.grid loads models with
    table = G.attack_defense_table({"badnet": "tiny-llava/badnet", "blended": "tiny-llava/blended"},
                                   ["none", "jpeg", "st"], layout="long", samples=_samples(), val_samples=_samples(3),
                                   batch_size=4, progress=False, warmup=False)
    assert loads == ["tiny-llava/badnet", "tiny-llava/blended"] and len(table) == 6


def test_reuse_on_a_real_model_gives_identical_answers_flags_and_scores(llava):
    """tiny-random-llava with CleanSight (two mask scopes sharing one fit), its no-detection ablation,
    random pruning and a purifier: every non-timing number equals stand-alone evaluation."""
    attack = get_attack("badnet")
    test, val = R.synthetic_samples("test", 4), R.synthetic_samples("calibration", 6)
    cs = ("cleansight", {"layers": [1], "tau": 0.05})
    specs = {"none": "none", "jpeg": "jpeg", "cs": cs,
             "cs_all": ("cleansight", {"layers": [1], "tau": 0.05, "mask_scope": "all_layers"}),
             "no_det": lambda: A.AlwaysFlag(G.make_defense(cs)), "random": lambda: A.RandomPruning(0.5, seed=3)}
    kw = dict(samples=test, val_samples=val, batch_size=2, max_new_tokens=3, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        old = {k: R.evaluate(llava, attack, G.make_defense(s), **kw) for k, s in specs.items()}
        cache = R.EvaluationCache()
        grid = G.evaluation_grid({"badnet": (llava, attack)}, specs, cache=cache, **kw).set_index("defense_label")
    assert cache.stats["fit_computed"] == 1 and cache.stats["fit_reused"] == 2   # cs_all and no_det reuse cs
    assert json.loads(grid.loc["cs_all", "defense_settings"])["mask_scope"] == "all_layers"
    assert json.loads(grid.loc["cs", "defense_settings"])["mask_scope"] == "reference"
    checked = 0
    for label, want in old.items():
        got = grid.loc[label]
        for metric in ("asr", "clean_utility", "poisoned_utility", "false_trigger_rate", "tpr", "fpr", "auroc",
                       "mean_pruned", "clean_utility_undefended"):
            a, b = want[metric], got[metric]
            assert (math.isnan(a) and math.isnan(b)) or a == b, (label, metric, a, b)
            checked += not math.isnan(a)
        assert json.loads(got["defense_settings"]) == json.loads(json.dumps(want["defense"], default=str))
    assert checked > 20
    assert not math.isnan(grid.loc["cs", "auroc"]) and grid.loc["no_det", "tpr"] == 1.0


# ------------------------------------------------------------------ the table experiments
def _t1():
    """Hand-made Tables 1/2 rows: two attacks x (none, st, strip, cleansight, cleansight_all_layers)."""
    rows = []
    vals = {  # defense: (asr, cu, pu, tpr, fpr, auroc) for badnet; blended = same with asr 1 - ...
        "none": (1.0, 0.8, 0.0, np.nan, np.nan, np.nan), "st": (0.0, 0.5, 0.45, np.nan, np.nan, np.nan),
        "jpeg": (0.0, 0.6, 0.2, np.nan, np.nan, np.nan), "strip": (1.0, 0.8, 0.0, 0.0, 0.05, 0.1),
        "cleansight": (1.0, 0.8, 0.0, 0.9, 0.1, 0.95), "cleansight_all_layers": (0.1, 0.75, 0.7, 0.9, 0.1, 0.95)}
    from cleansight_analysis.experiments.tables import DEFENSE_KINDS

    for attack, shift in (("badnet", 0.0), ("blended", 0.25)):
        for d, (asr, cu, pu, tpr, fpr, auc) in vals.items():
            rows.append({"attack": attack, "member": attack, "defense": d, "kind": DEFENSE_KINDS[d],
                         "asr": min(1.0, asr + shift), "clean_utility": cu, "poisoned_utility": pu, "tpr": tpr,
                         "fpr": fpr, "auroc": auc, "n": 48, "n_val": 64, "mode": "lora", "replicate_seed": 0})
    return pd.DataFrame(rows)


def test_best_baseline_summary_and_paper_comparison_known_answers():
    from cleansight_analysis.experiments import tables as T

    t1 = _t1()
    best = T.best_baseline(t1)
    # badnet: st and jpeg both ASR 0 -> jpeg wins on CU (0.6 > 0.5); blended: both 0.25 -> jpeg again
    assert list(best["defense"]) == ["jpeg", "jpeg"] and list(best["asr"]) == [0.0, 0.25]
    summary = T.summary_table(t1)
    assert list(summary["role"][:4]) == ["undefended", "CleanSight", "CleanSight (all layers)", "best baseline"]
    assert len(summary) == 8 and summary.loc[2, "asr"] == pytest.approx(0.1)
    t3 = pd.DataFrame({"attack": ["badnet"] * 3, "member": ["badnet"] * 3,
                       "defense": ["full", "no_detection", "random_pruning"], "asr": [0.1, 0.0, 1.0],
                       "clean_utility": [0.75, 0.6, 0.5]})
    t4 = t1[t1["defense"].isin(["none", "cleansight", "cleansight_all_layers"])]
    cmp = T.paper_comparison(t1, t3, t4).set_index(["table", "quantity"])["ours"]
    assert cmp[("Tables 1/2", "CleanSight ASR")] == "100.0 %"
    assert cmp[("Tables 1/2", "CleanSight (mask all layers) ASR")] == "10.0-35.0 %"
    assert cmp[("Tables 1/2", "CleanSight clean-utility loss vs undefended")] == "+0.0 points"
    assert cmp[("Table 3", "no detection: clean-utility loss vs full")] == "+15.0 points"
    assert cmp[("Table 3", "random 90 % pruning: ASR")] == "100.0 %"
    wide = T.wide(t1, metrics=("asr",))
    assert list(wide.index) == ["badnet", "blended"] and wide[("st", "asr")].tolist() == [0.0, 0.25]


def test_validation_counts_and_smoke_defense_settings(tmp_path):
    from cleansight_analysis.experiments import FigureContext
    from cleansight_analysis.experiments import tables as T

    full = FigureContext(model="tiny-llava", attacks=["badnet"], results_dir=tmp_path)
    smoke = FigureContext(model="tiny-llava", attacks=["badnet"], results_dir=tmp_path, smoke=True)
    assert T.validation_count(full, 64) == 64 and T.validation_count(full, 5) == T.MIN_VAL
    assert T.validation_count(smoke, 64) == T.SMOKE_VAL
    assert len(T.validation_samples(smoke, 12)) == 12                     # not capped at 8 like ctx.samples
    cheap = T.smoke_defenses({"strip": "strip", "st": "st", "cs": ("cleansight", {"tau": 0.1})})
    assert cheap["strip"] == ("strip", T.SMOKE_SETTINGS["strip"]) and cheap["st"] == "st"
    assert cheap["cs"] == ("cleansight", {"tau": 0.1})
    assert T.family_members(full, "badnet") == ["badnet", "badnet-lora"]    # the family has no -adapter member
    with pytest.raises(InputError):
        T.defense_grid(full, defenses={"none": "none"})                     # Table 4 needs CleanSight columns


def test_training_attempts_list_every_members_modes(tmp_path):
    """The shipped family: badnet is projector-only ("adapter"), its replicate badnet-lora is LoRA; each kept."""
    from cleansight_analysis.experiments import FigureContext
    from cleansight_analysis.experiments import tables as T

    ctx = FigureContext(model="tiny-llava", attacks=["badnet"], results_dir=tmp_path)
    att = T.training_attempts_table(ctx, attacks=("badnet",))
    assert dict(zip(att["member"], att["mode"])) == {"badnet": "adapter", "badnet-lora": "lora"}
    assert att["kept"].all() and (att["asr"] >= 0.95).all()


def test_defense_grid_loads_each_member_once_and_shares_rows(tmp_path, llava, monkeypatch):
    """A small grid on tiny-random-llava posing as badnet + badnet-lora: Table 3's none / full rows and
    Table 4's badnet rows are Table 1's, the replicate is evaluated, every table is cached with a CSV copy."""
    from cleansight_analysis.experiments import FigureContext
    from cleansight_analysis.experiments import tables as T

    cs_all = ("cleansight", {"layers": [1], "tau": 0.05, "mask_scope": "all_layers"})
    monkeypatch.setattr(T, "ABLATION_CLEANSIGHT", cs_all)
    ctx = FigureContext(model="tiny-llava", attacks=["badnet"], n_samples=4, results_dir=tmp_path, log=lambda m: None)
    loads = []

    def load(member):
        loads.append(member)
        return llava, get_attack("badnet"), {"mode": "lora", "seed": 0 if member == "badnet" else 1}

    monkeypatch.setattr(ctx, "load", load)
    defenses = {"none": "none", "jpeg": "jpeg", "cleansight": ("cleansight", {"layers": [1], "tau": 0.05}),
                "cleansight_all_layers": cs_all}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        grid = T.defense_grid(ctx, defenses=defenses, mode_attacks=("badnet",), n_val=20, max_new_tokens=3)
    assert loads == ["badnet", "badnet-lora"]
    assert set(grid["table"]) == {"attack_defense", "module_ablation", "adapter_lora"}
    t1, t3, t4 = T.attack_defense_rows(ctx, grid), T.module_ablation_rows(ctx, grid), T.adapter_lora_rows(ctx, grid)
    assert list(t1["defense"]) == list(defenses) and list(t3["defense"]) == ["none", "full", "no_detection",
                                                                             "random_pruning"]
    metrics = ["asr", "clean_utility", "poisoned_utility", "tpr", "fpr", "auroc"]
    full = t3[t3["defense"] == "full"][metrics].reset_index(drop=True)
    assert full.equals(t1[t1["defense"] == "cleansight_all_layers"][metrics].reset_index(drop=True))
    assert list(t3["source"]) == ["from attack_defense"] * 2 + ["evaluated"] * 2
    assert list(t4["member"]) == ["badnet"] * 3 + ["badnet-lora"] * 3
    assert list(t4["source"]) == ["from attack_defense"] * 3 + ["evaluated"] * 3
    assert list(t4["replicate_seed"]) == [0] * 3 + [1] * 3
    # the same model posing as both members: the evaluated replicate rows equal the copied ones
    a, b = (t4[t4["member"] == m][metrics].reset_index(drop=True) for m in ("badnet", "badnet-lora"))
    assert a.equals(b)
    assert "layers 1-1" not in t1.loc[2, "detail"] and t1.loc[2, "detail"].startswith("layers 1, tau 0.05")
    for name in T.TABLE_NAMES.values():
        assert (tmp_path / f"{name}.csv").is_file() and (tmp_path / f"{name}.parquet").is_file()
    assert len(pd.read_csv(tmp_path / "table1_attack_defense.csv")) == 4
    again = T.defense_grid(ctx, defenses=defenses, mode_attacks=("badnet",), n_val=20, max_new_tokens=3)
    assert loads == ["badnet", "badnet-lora"] and len(again) == len(grid)   # cached: nothing loaded again


# ------------------------------------------------------------------ plots
def test_plot_attack_defense_panels_labels_and_annotations():
    import matplotlib.pyplot as plt

    from cleansight_analysis.plotting.tables import plot_attack_defense

    fig = plot_attack_defense(_t1(), note="paper: 0-4.74 %")
    axes = fig.axes
    assert len(axes) == 4
    assert [ax.get_title().split("\n")[0] for ax in axes] == ["Attack success rate", "Clean utility", "Poisoned utility",
                                                                "Detection"]
    assert [t.get_text() for t in axes[0].get_yticklabels()] == ["No defense", "ST", "JPEG", "STRIP", "CleanSight",
                                                                 "CleanSight (mask all layers)"]
    assert [t.get_text() for t in axes[0].get_xticklabels()] == ["BadNet", "Blended"]
    asr_texts = [t.get_text() for t in axes[0].texts]
    assert asr_texts[:2] == ["100", "100"] and asr_texts[-2:] == ["10", "35"]   # all-layers row: 0.1 and 0.35
    det = [t.get_text() for t in axes[3].texts]
    assert det[0] == "-" and "90 / 10" in det
    assert "n = 48 test inputs" in fig._suptitle.get_text()
    assert any("paper: 0-4.74 %" in t.get_text() for t in fig.texts)
    with pytest.raises(InputError):
        plot_attack_defense(_t1().drop(columns=["asr"]))
    plt.close(fig)


def test_plot_module_ablation_bar_heights():
    import matplotlib.pyplot as plt

    from cleansight_analysis.plotting.tables import plot_module_ablation

    t3 = pd.DataFrame({"attack": ["badnet"] * 4 + ["blended"] * 4,
                       "defense": ["none", "full", "no_detection", "random_pruning"] * 2,
                       "asr": [1.0, 0.05, 0.0, 1.0, 1.0, 0.5, 0.25, 0.75], "clean_utility": [0.8, 0.8, 0.6, 0.4] * 2})
    fig = plot_module_ablation(t3)
    asr_ax, cu_ax = fig.axes[:2]
    heights = [round(p.get_height(), 6) for p in asr_ax.patches]
    assert heights == [100, 5, 0, 100, 100, 50, 25, 75]                 # badnet bars, then blended bars
    assert [round(p.get_height(), 6) for p in cu_ax.patches][:4] == [80, 80, 60, 40]
    assert "Full\nCleanSight\n(all layers)" in [t.get_text() for t in asr_ax.get_xticklabels()]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["BadNet", "Blended"]
    assert asr_ax.get_ylabel() == "share of triggered inputs (%)"
    plt.close(fig)


def test_plot_adapter_lora_orders_members_and_notes_missing_modes():
    import matplotlib.pyplot as plt

    from cleansight_analysis.plotting.tables import plot_adapter_lora, styled_table

    t4 = _t1()[lambda d: d["defense"].isin(["none", "cleansight"])].copy()
    extra = t4.copy()
    extra["member"] = extra["attack"] + "-lora"
    extra["replicate_seed"] = 1
    t4 = pd.concat([t4, extra], ignore_index=True)
    t4 = t4.sort_values("member", key=lambda s: s.str.len()).reset_index(drop=True)  # badnet, blended, badnet-lora..
    attempts = pd.DataFrame({"attack": ["badnet"], "member": ["badnet"], "mode": ["adapter"], "steps": [100],
                             "clean_acc": [0.61], "asr": [0.0], "kept": [False]})
    fig = plot_adapter_lora(t4, attempts)
    labels = [t.get_text().split("\n")[1] for t in fig.axes[0].get_xticklabels()]
    assert labels == ["badnet", "badnet-lora", "blended", "blended-lora"]       # grouped by attack
    assert "LoRA, seed 1" in fig.axes[0].get_xticklabels()[1].get_text()
    assert any("adapter-only training (100 steps) planted no backdoor" in t.get_text() for t in fig.texts)
    assert len(fig.axes[0].patches) == 8
    plt.close(fig)
    html = styled_table(t4, index="member", metrics=("asr", "tpr")).to_html()
    assert "100.0 %" in html and "n/a" in html and "CleanSight" in html


def test_defense_summary_is_written_from_the_tables():
    """Notebook 08's findings come from its tables: a changed cell changes the text."""
    import pandas as pd

    from cleansight_analysis.plotting.summaries import defense_tables_summary

    rows = []
    for attack in ("badnet", "sig"):
        for defense, asr, tpr in (("none", 1.0, None), ("cleansight", 1.0, 0.5), ("cleansight_all_layers", 0.25, 0.5),
                                  ("st", 0.0, None)):
            rows.append({"attack": attack, "defense": defense, "asr": asr if attack == "badnet" else 1.0,
                         "clean_utility": 0.8 if defense != "st" else 0.5, "tpr": tpr, "fpr": 0.0 if tpr else None,
                         "auroc": 0.9 if tpr else None, "n": 48, "n_val": 64})
    t1 = pd.DataFrame(rows)
    t3 = pd.DataFrame({"attack": ["badnet"] * 2, "defense": ["none", "random_pruning"], "asr": [1.0, 0.1],
                       "clean_utility": [0.8, 0.7]})
    t4 = pd.DataFrame({"member": ["badnet-lora"], "defense": ["cleansight"], "asr": [0.2], "tpr": [0.9],
                       "fpr": [0.02], "auroc": [0.99]})
    text = defense_tables_summary(t1, t3, t4)
    assert "n = 48" in text and "64 clean calibration" in text
    assert "ASR badnet 25 %, sig 100 %; lowest on badnet" in text
    assert "**ST**: ASR 0-100 % at a cost of 30 points of clean utility" in text
    assert "ASR 10 % at a cost of 10 points" in text and "badnet-lora ASR 20 % (TPR 90 %" in text
    t1.loc[(t1.attack == "badnet") & (t1.defense == "cleansight_all_layers"), "asr"] = 0.5
    assert "ASR badnet 50 %" in defense_tables_summary(t1, t3, t4)
    full = pd.DataFrame({"attack": ["badnet", "badnet", "sig", "sig"], "defense": ["none", "cleansight"] * 2,
                         "asr": [1.0, 0.02, 1.0, 0.4], "fpr": [None, 0.01, None, 0.04],
                         "clean_drop": [None, 0.0117, None, 0.0], "goals_met": [None, True, None, False],
                         "n": [256] * 4, "n_val": [200] * 4})
    line = defense_tables_summary(t1, t3, t4, full).splitlines()[-1]
    assert line.startswith("* **At the paper's size** (256 test inputs, 200 clean calibration inputs")
    assert "hold for 1 of 2 attacks (badnet)" in line and "ASR <= 5 %, clean utility within 2 points" in line
    assert "badnet ASR 100 % -> 2.0 %, clean utility -1.2 points, FPR 1.0 %" in line
    assert "sig ASR 100 % -> 40.0 %, clean utility +0.0 points, FPR 4.0 %" in line
    assert "decoding query" not in line  # no cleansight_generated rows, no clause
    gen = full[full["defense"] == "cleansight"].assign(defense="cleansight_generated", asr=[0.0, 0.01],
                                                       fpr=[0.02, 0.025], goals_met=[True, True])
    line = defense_tables_summary(t1, t3, t4, pd.concat([full, gen])).splitlines()[-1]
    assert "hold for 1 of 2 attacks (badnet)" in line
    assert ("Reading every decoding query as well (`query=\"generated\"`, the paper's \"current decoding query\"): "
            "2 of 2 attacks (badnet, sig)") in line and "sig ASR 100 % -> 1.0 %, clean utility +0.0 points, FPR 2.5 %" in line


def test_cleansight_full_size_scores_the_goals_and_is_cached(tmp_path, llava, monkeypatch):
    """The paper-size table on tiny-random-llava posing as two attacks (smoke counts): one undefended, one
    default-CleanSight and one decoding-query CleanSight row per attack; ``clean_drop`` / ``goals_met`` follow the rows and CLEANSIGHT_GOALS."""
    from cleansight_analysis.experiments import FigureContext
    from cleansight_analysis.experiments import tables as T

    ctx = FigureContext(model="tiny-llava", attacks=["badnet", "blended"], n_samples=4, results_dir=tmp_path,
                        log=lambda m: None)
    loads = []

    def load(member):
        loads.append(member)
        return llava, get_attack(member), {"mode": "adapter", "seed": 0}

    monkeypatch.setattr(ctx, "load", load)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = T.cleansight_full_size(ctx, n_test=6, n_val=20, max_new_tokens=3)
    assert loads == ["badnet", "blended"]
    assert list(full["defense"]) == list(T.FULL_SIZE_DEFENSES) * 2 == ["none", "cleansight", "cleansight_generated"] * 2
    assert set(full["table"]) == {"cleansight_full_size"}
    assert list(full["n"]) == [6] * 6 and list(full["n_val"]) == [20] * 6
    assert "generated" in full[full["defense"] == "cleansight_generated"]["defense_settings"].iloc[0]
    one = full[full["defense"] != "none"]
    np.testing.assert_allclose(one["clean_drop"], one["clean_utility_undefended"] - one["clean_utility"])
    g = T.CLEANSIGHT_GOALS
    want = [(r.asr <= g["asr_max"]) and (r.clean_drop <= g["clean_drop_max"] + 1e-12) and (r.fpr <= g["fpr_max"])
            for r in one.itertuples()]
    assert list(one["goals_met"]) == want
    assert full[full["defense"] == "none"]["goals_met"].isna().all()
    assert (tmp_path / "table1_cleansight_full_size.parquet").is_file()
    again = T.cleansight_full_size(ctx, n_test=6, n_val=20, max_new_tokens=3)
    assert loads == ["badnet", "blended"] and again.equals(full)  # cached: nothing loaded again
    with pytest.raises(InputError, match="n_val"):
        T.cleansight_full_size(ctx, n_val=1)
