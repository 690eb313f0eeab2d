"""The README's numbers are the shipped tables' numbers.

Every sample count, AUROC, ASR, rate or layer the README quotes from a table under ``data/results/`` is a
:class:`Fact`: a phrase template (the README's wording with ``{name}`` where a number goes) and a function
computing those numbers from the table (or its manifest) at test time, so a re-run of the notebooks only
needs README edits, and the failure says which phrase to change and to what. Regenerate every number in
place with::

    .venv/bin/python tests/test_readme_numbers.py --write     # rewrites README.md's numbers, prints changes
    .venv/bin/python tests/test_readme_numbers.py             # prints every phrase with the tables' values

Matching ignores line breaks (a phrase may wrap); each template must occur in the README exactly once.
To check a new number, add a Fact. ``Claim`` entries check statements without a number (e.g. "no other
single head lowers ASR").
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import pytest

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "data" / "results"
_NUMBER = r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?"


# ------------------------------------------------------------------------------------------ formatting
def f2(x: float) -> str:
    return f"{x:.2f}"


def f3(x: float) -> str:
    return f"{x:.3f}"


def pct0(x: float) -> str:
    return f"{100 * x:.0f}"


def pct1(x: float) -> str:
    return f"{100 * x:.1f}"


def ceil2(x: float) -> str:
    """An upper bound at two decimals ("never exceeds 0.64", "ASR <= 0.06")."""
    return f"{math.ceil(round(x * 100, 9)) / 100:.2f}"


def num(x: float) -> str:
    """A parameter value as written (0.25, 200, 1e-3 -> 0.001)."""
    return f"{x:g}"


# ------------------------------------------------------------------------------------------ tables
@lru_cache(maxsize=None)
def table(rel: str):
    from cleansight_analysis.results import load_table

    return load_table(RESULTS / rel)


@lru_cache(maxsize=None)
def manifest(rel: str) -> dict:
    from cleansight_analysis.results import load_manifest

    return load_manifest(RESULTS / rel)


def single(values, what: str):
    values = sorted(set(values))
    assert len(values) == 1, f"{what}: expected one value, the table has {values}"
    return values[0]


def span(layers) -> str:
    """``[5, 6, 7]`` -> ``"5-7"`` (a contiguous window; one layer: ``"5-5"``)."""
    layers = sorted(int(x) for x in layers)
    assert layers == list(range(layers[0], layers[-1] + 1)), layers
    return f"{layers[0]}-{layers[-1]}"


# ------------------------------------------------------------------------------------------ values
def stealing_shift() -> dict[str, str]:
    """Fig. 2 (a): image / instruction shares of the answer query, clean vs triggered, BadNet. ``first`` and
    ``second``: the first two layers where the triggered image share exceeds the clean one by more than 0.1;
    both must lie before the last quarter of the LM (the paper's fusion layers)."""
    df = table("02_attention_stealing/group_shares_badnet.parquet")
    mean = df.groupby(["condition", "layer"])[["share_image", "share_prompt"]].mean()
    clean, trig = mean.loc["clean"], mean.loc["triggered"]
    shift = trig["share_image"] - clean["share_image"]
    rising = [int(layer) for layer in shift.index if shift[layer] > 0.1]
    n_layers = int(mean.index.get_level_values(1).max()) + 1
    quarter = n_layers - n_layers // 4
    assert len(rising) >= 2 and rising[1] < quarter, (
        f"the image share rises by > 0.1 in layers {rising}, not twice before layer {quarter}: reword "
        "'Stealing starts in the middle layers' in README.md")
    first, second, last = rising[0], rising[1], n_layers - 1
    n = single(df.groupby("condition")["sample_id"].nunique(), "group_shares_badnet scenes per condition")
    return {"first": str(first), "second": str(second), "last": str(last), "quarter": str(quarter),
            "c1": f2(clean.loc[first, "share_image"]), "t1": f2(trig.loc[first, "share_image"]),
            "c1_pct": pct0(clean.loc[first, "share_image"]), "t1_pct": pct0(trig.loc[first, "share_image"]),
            "c2": f2(clean.loc[second, "share_image"]), "t2": f2(trig.loc[second, "share_image"]),
            "cl": f2(clean.loc[last, "share_image"]), "tl": f2(trig.loc[last, "share_image"]),
            "p1c": f2(clean.loc[first, "share_prompt"]), "p1t": f2(trig.loc[first, "share_prompt"]),
            "n": str(n)}


def layerwise() -> dict[str, str]:
    """Fig. 3: AUROC per layer, head-specific vector vs head average, BadNet."""
    df = table("03_layerwise_detection/layerwise_detection.parquet")
    df = df[df["attack"] == "badnet"].set_index("layer")
    ranked = df["auroc_head_vector"].sort_values(ascending=False)
    best, second = int(ranked.index[0]), int(ranked.index[1])
    rest = ranked.drop([best, second])
    return {"layer": str(best), "auroc": f2(ranked.iloc[0]), "mean": f2(df.loc[best, "auroc_head_mean"]),
            "layer2": str(second), "auroc2": f2(ranked.iloc[1]), "rest_lo": f2(rest.min()), "rest_hi": f2(rest.max()),
            "mean_max": ceil2(df["auroc_head_mean"].max()),
            "n_cal": str(single(df["n_calibration"], "n_calibration")),
            "n_test": str(single(df["n_clean_test"], "n_clean_test"))}


def windows() -> dict[str, str]:
    """Fig. 4: AUROC of every BadNet window containing Fig. 3's best layer."""
    df = table("shared/layer_window_sweep.parquet")
    layer = layerwise()["layer"]
    df = df[(df["attack"] == "badnet") & df["layers"].astype(str).str.split(",").apply(lambda ls: layer in ls)]
    return {"layer": layer, "lo": f2(df["auroc"].min()), "hi": f2(df["auroc"].max())}


def detector_choice() -> dict[str, str]:
    """Fig. 4 / 5: the automatic (fusion-onset) window, its AUROC, and TPR / FPR at q = 0.99, BadNet."""
    sweep = table("shared/layer_window_sweep.parquet")
    choice = sweep[(sweep["attack"] == "badnet") & sweep["detector_choice"].astype(bool)]
    assert len(choice) == 1, choice
    th = table("05_threshold_and_validation_size/threshold_sweep.parquet")
    th = th[(th["attack"] == "badnet") & th["choice"].str.startswith("fusion onset") & (th["quantile"] == 0.99)]
    assert len(th) == 1, th
    row = th.iloc[0]
    assert str(row["layers"]) == str(choice.iloc[0]["layers"])
    first, last = span(str(row["layers"]).split(",")).split("-")
    return {"auroc": f2(choice.iloc[0]["auroc"]), "l_first": first, "l_last": last,
            "tpr": f2(row["tpr"]), "tpr_pct": pct0(row["tpr"]), "fpr": f3(row["fpr"]), "fpr_pct": pct1(row["fpr"]),
            "n_val": str(int(row["n_val"])), "n_test": layerwise()["n_test"]}


def perturbation() -> dict[str, str]:
    """Fig. 1: ASR / clean accuracy vs intensity, pixel ST / noise / JPEG vs attention flattening, BadNet (and
    Blended for the detection-layer flattening)."""
    df = table("01_pixel_vs_attention_perturbation/perturbation_sweep_badnet.parquet")
    bl = table("01_pixel_vs_attention_perturbation/perturbation_sweep_blended.parquet")
    st = df[(df["kind"] == "st")].sort_values("intensity")
    text = df[df["variant"] == "attention, text queries (paper)"].set_index("intensity")
    every = df[df["variant"].str.contains("all queries")].set_index("intensity")
    det = df[df["variant"] == "attention, detection layers"].set_index("intensity")
    bdet = bl[bl["variant"] == "attention, detection layers"].set_index("intensity")
    noise = df[df["variant"] == "pixel noise"].set_index("intensity")
    jpeg = df[df["variant"] == "pixel JPEG"].set_index("intensity")
    bjpeg = bl[bl["variant"] == "pixel JPEG"].set_index("intensity")
    bnoise = bl[bl["variant"] == "pixel noise"].set_index("intensity")
    top = float(df["intensity"].max())
    n_val = manifest("01_pixel_vs_attention_perturbation/perturbation_sweep_badnet.manifest.json")["params"]["n_val"]
    lo, hi = span(int(x) for x in single(det["layers"][det.index > 0], "detection layers").split(",")).split("-")
    blo, bhi = span(int(x) for x in single(bdet["layers"][bdet.index > 0], "layers").split(",")).split("-")
    return {"det_cost": pct0(det.loc[0.0, "clean_acc"] - det.loc[top, "clean_acc"]),
            "bdet_cost": pct0(bdet.loc[0.0, "clean_acc"] - bdet.loc[top, "clean_acc"]), "det_nval": str(n_val), "det_lo": lo, "det_hi": hi, "bdet_lo": blo, "bdet_hi": bhi,
            "det_pct": pct0(det.loc[top, "asr"]), "det_clean_pct": pct0(det.loc[top, "clean_acc"]),
            "base_clean_pct": pct0(det.loc[0.0, "clean_acc"]),
            "bdet_pct": pct0(bdet.loc[top, "asr"]), "bdet_clean_pct": pct0(bdet.loc[top, "clean_acc"]),
            "bbase_clean_pct": pct0(bdet.loc[0.0, "clean_acc"]),
            "noise_min": f2(noise.loc[[x for x in noise.index if x <= 0.75], "asr"].min()),
            "noise_top": f2(noise.loc[top, "asr"]), "jpeg_q": f2(jpeg.loc[0.25, "asr"]),
            "jpeg_top": f2(jpeg.loc[top, "asr"]),
            "bjpeg_min": f2(bjpeg.loc[[x for x in bjpeg.index if x <= 0.75], "asr"].min()),
            "bnoise_half": f2(bnoise.loc[0.5, "asr"]),
            "st_rho": num(st[st["asr"] == 0]["intensity"].min()),
            "text_pct": pct0(text.loc[top, "asr"]), "base_asr": f2(text.loc[0.0, "asr"]),
            "text_asr": f2(text.loc[top, "asr"]), "base_clean": f2(text.loc[0.0, "clean_acc"]),
            "text_clean": f2(text.loc[top, "clean_acc"]), "all_asr": f2(every.loc[top, "asr"]),
            "all_clean": f2(every.loc[top, "clean_acc"]), "st_top": f2(st.set_index("intensity").loc[top, "asr"]),
            "half_asr": f2(text.loc[0.5, "asr"]), "half_clean": f2(text.loc[0.5, "clean_acc"]),
            "half_pct": pct0(text.loc[0.5, "asr"]), "half_clean_pct": pct0(text.loc[0.5, "clean_acc"]),
            "n": str(single(df["n"], "perturbation_sweep n"))}


def thieves() -> dict[str, str]:
    """Fig. 2 (c): how often the head-averaged top-1 image token is the trigger cell, BadNet."""
    df = table("02_attention_stealing/thief_tokens_badnet.parquet")
    trig = df[df["condition"] == "triggered"].set_index("layer").sort_values("top1_hit_rate", ascending=False)
    layers = [int(x) for x in trig.index[:3]]
    return {"l1": str(layers[0]), "h1": pct0(trig["top1_hit_rate"].iloc[0]),
            "l2": str(layers[1]), "h2": pct0(trig["top1_hit_rate"].iloc[1]),
            "l3": str(layers[2]), "h3": pct0(trig["top1_hit_rate"].iloc[2]),
            "chance": pct1(single(trig["chance_share"], "chance_share")), "n": str(single(trig["n"], "n"))}


def pruning() -> dict[str, str]:
    """Fig. 6: ASR with the mask from the last detection layer (oracle detector) at the default tau (every
    attack's largest), at the paper's balance 1e-3 (TrojVLM) and at the calibrated ``tau="auto"`` (BadNet)."""
    from cleansight_analysis.defenses.cleansight import CleanSightConfig

    ref = _pruning_reference()
    default = ref[ref["tau"] == CleanSightConfig().tau]
    balance = ref[(ref["tau"] == 1e-3) & (ref["attack"] == "trojvlm")]
    auto = ref[ref["is_auto"].astype(bool) & (ref["attack"] == "badnet")]
    assert default["attack"].nunique() == len(default) == ref["attack"].nunique() and len(balance) == len(auto) == 1
    assert CleanSightConfig().tau == 1e-4, "the default tau changed: reword the README's Fig. 6 row"
    return {"asr": f2(default["asr"].max()),
            "troj": f2(balance.iloc[0]["asr"]), "tau_auto": f2(auto.iloc[0]["tau"]), "auto_asr": f2(auto.iloc[0]["asr"])}


def _pruning_reference() -> "pd.DataFrame":
    """Fig. 6's rows with the reference mask scope (every attack, every swept tau)."""
    df = table("06_pruning_threshold/pruning_threshold.parquet")
    return df[df["mask_scope"] == "reference"]


def logit_lens() -> dict[str, str]:
    """Fig. 7: mean p(correct) - p(target) per layer, clean vs triggered, BadNet. The curves "separate" at the
    first layer where the clean mean exceeds the triggered one by more than 0.1."""
    df = table("07_logit_lens/logit_lens.parquet")
    df = df[df["attack"] == "badnet"]
    mean = df.groupby(["condition", "layer"])["diff"].mean()
    clean, trig = mean.loc["clean"], mean.loc["triggered"]
    onset = int(next(layer for layer in clean.index if clean[layer] - trig[layer] > 0.1))
    last = int(clean.index.max())
    return {"onset": str(onset), "c_on": f2(clean[onset]), "t_on": f2(trig[onset]), "last": str(last),
            "c_last": f2(clean[last]), "t_last": f2(trig[last]),
            "n": str(single(df["n"], "logit_lens n"))}


def heads() -> dict[str, str]:
    """Fig. 9: zero-ablating one head at a time, and activation patching triggered -> clean, BadNet."""
    ab = table("09_per_head_ablation/head_ablation.parquet")
    base = ab[ab["kind"] == "baseline"].iloc[0]
    best = ab[ab["kind"] == "ablate"].sort_values(["asr", "layer", "head"]).iloc[0]
    pa = table("09_per_head_ablation/head_patching.parquet")
    top = pa.sort_values("restored", ascending=False).iloc[0]
    return {"l": str(int(best["layer"])), "h": str(int(best["head"])), "base": f2(base["asr"]), "abl": f2(best["asr"]),
            "clean_base": f2(base["clean_acc"]), "clean_abl": f2(best["clean_acc"]),
            "n": str(single(ab["n"], "head_ablation n")),
            "pl": str(int(top["layer"])), "ph": str(int(top["head"])), "restored": f2(top["restored"]),
            "restored_pct": pct0(top["restored"])}


DETECTED = ("badnet", "blended", "sig", "trojvlm")  # the members whose backdoor the default detector flags


def table1() -> dict[str, str]:
    """Table 1 (notebook 08): attacks x defenses."""
    df = table("08_defense_tables/table1_attack_defense.parquet")
    at = df.set_index(["attack", "defense"])
    one = df[df["defense"] == "cleansight"].set_index("attack")
    assert set(one.index[one["tpr"] >= 0.99]) == set(DETECTED), one["tpr"]
    pix = df[df["defense"].isin(["st", "shrinkpad"])]
    cost = pix["clean_utility_undefended"] - pix["clean_utility"]
    cu_drop = (one["clean_utility_undefended"] - one["clean_utility"]).max()
    out = {"n": str(single(df["n"], "table1 n")), "n_attacks": str(df["attack"].nunique()),
           "tpr_lo_pct": pct0(one.loc[list(DETECTED), "tpr"].min()),
           "fpr_hi_pct": pct0(one.loc[list(DETECTED), "fpr"].max()), "cu_drop": pct0(cu_drop),
           "sig_all": pct0(at.loc[("sig", "cleansight_all_layers"), "asr"]),
           "wanet_none": pct0(at.loc[("wanet", "none"), "asr"]),
           "pix_lo": pct0(pix["asr"].min()), "pix_hi": pct0(pix["asr"].max()),
           "cost_lo": pct0(cost.min()), "cost_hi": pct0(cost.max()),
           "st7": f2(at.loc[("badnet", "st"), "asr"]), "sp7": f2(at.loc[("badnet", "shrinkpad"), "asr"]),
           "jpeg7": f2(at.loc[("badnet", "jpeg"), "asr"]), "blur7": f2(at.loc[("badnet", "blur"), "asr"]),
           "ent_tpr": f2(at.loc[("badnet", "attention_entropy"), "tpr"]),
           "ent_fpr": f2(at.loc[("badnet", "attention_entropy"), "fpr"]),
           "strip_tpr": f2(at.loc[("badnet", "strip"), "tpr"]), "scale_tpr": f2(at.loc[("badnet", "scale_up"), "tpr"])}
    for a in DETECTED:
        out[f"{a}_none"] = pct0(at.loc[(a, "none"), "asr"])
        out[f"{a}_one"] = pct0(at.loc[(a, "cleansight"), "asr"])
    return out


#: Attacks whose image share rises before the last quarter with AUROC >= 0.95 there (README names them).
MECHANISM_SHOWN = ("badnet", "blended", "sig", "trojvlm")


def mechanism() -> dict[str, str]:
    """Notebook 03's mechanism table: where the image share rises and separates, per attack."""
    from cleansight_analysis.experiments.detection import MECHANISM

    df = table("03_layerwise_detection/mechanism.parquet")
    shown = [a for a, sub in df.groupby("attack", sort=False) if bool(sub["steals"].any())]
    assert tuple(shown) == MECHANISM_SHOWN, f"the mechanism shows for {shown}: reword the README's list"
    return {"k": str(len(shown)), "n": str(df["attack"].nunique()), "min_rise": f2(MECHANISM["min_rise"]),
            "min_auroc": f2(MECHANISM["min_auroc"])}


#: Attacks whose trigger the probe on the frozen tower misses (TPR below VISIBLE_TPR); the README names them.
VISIBILITY_HIDDEN = ("wanet",)


def visibility() -> dict[str, str]:
    """Notebook 03's trigger-visibility table: the probe on the frozen tower's features, WaNet vs the rest."""
    from cleansight_analysis.plotting.summaries.layerwise import VISIBLE_TPR

    df = table("03_layerwise_detection/trigger_visibility.parquet").set_index("attack")
    hidden = tuple(a for a in df.index if df.loc[a, "tpr"] < VISIBLE_TPR)
    assert hidden == VISIBILITY_HIDDEN, f"the probe misses {hidden}: reword the README's visibility bullet"
    w, others = df.loc["wanet"], df.drop(index=list(hidden))
    return {"n_fit": f"{int(w['n_train']):,}", "n_out": f"{int(w['n_test']):,}", "w_auc": f2(w["auroc"]),
            "w_tpr": pct0(w["tpr"]), "fpr": pct0(w["fpr_target"]), "o_auc": f2(others["auroc"].min()),
            "o_tpr": pct0(others["tpr"].min()), "w_change": f2(w["feature_change"]),
            "b_change": f2(df.loc["badnet", "feature_change"])}


#: Attacks for which CleanSight meets every goal at the paper's size (README's status names them).
FULL_SIZE_MET = ("badnet", "blended", "sig", "trojvlm")
#: ... and with every decoding query read (``cleansight_generated`` rows).
FULL_SIZE_GENERATED_MET = ("badnet", "blended", "sig", "trojvlm", "vlood")


def full_size() -> dict[str, str]:
    """Notebook 08's CleanSight rows at the paper's size (256 test, 200 calibration)."""
    df = table("08_defense_tables/table1_cleansight_full_size.parquet")
    one = df[df["defense"] == "cleansight"].set_index("attack")
    met = tuple(a for a in one.index if bool(one.loc[a, "goals_met"]))
    assert met == FULL_SIZE_MET, f"CleanSight meets its goals for {met}: reword the README's status and defense text"
    none = df[df["defense"] == "none"].set_index("attack")
    t1 = table("08_defense_tables/table1_attack_defense.parquet")
    t1_sig = t1[(t1["attack"] == "sig") & (t1["defense"] == "cleansight")]["detail"].iloc[0]
    t1_val = str(single(t1["n_val"], "table1 n_val"))
    detected = [a for a in one.index if a != "wanet"]
    out = {"n": str(single(df["n"], "full-size n")), "n_val": str(single(df["n_val"], "full-size n_val")),
           "k": str(int(one["goals_met"].astype(bool).sum())), "n_attacks": str(len(one)),
           "fpr_hi": pct1(one.loc[detected, "fpr"].max()), "wanet": pct0(none.loc["wanet", "asr"]),
           "wanet_tpr": pct0(one.loc["wanet", "tpr"]), "t1_val": t1_val,
           "t1_n": str(single(t1["n"], "table1 n"))}
    for key, detail in (("sig", one.loc["sig", "detail"]), ("sig_t1", t1_sig)):  # "layers 5-7, tau ..."
        first, last = detail.split(",")[0].removeprefix("layers ").split("-")
        out[f"{key}_first"], out[f"{key}_last"] = first, last
    for a in detected:
        out[a] = pct1(one.loc[a, "asr"])
    gen = df[df["defense"] == "cleansight_generated"].set_index("attack")
    met_gen = tuple(a for a in gen.index if bool(gen.loc[a, "goals_met"]))
    assert met_gen == FULL_SIZE_GENERATED_MET, f"with query='generated' the goals hold for {met_gen}: reword the README"
    out.update(k_gen=str(len(met_gen)), vlood_tpr=pct0(one.loc["vlood", "tpr"]), vlood_gen=pct1(gen.loc["vlood", "asr"]),
               vlood_gen_tpr=pct0(gen.loc["vlood", "tpr"]), fpr_gen_hi=pct1(gen.loc[list(met_gen), "fpr"].max()))
    return out


def latency_noise() -> dict[str, str]:
    """CleanSight's batch-1 generation ratios (best and paired median) from benchmarks/results/defense_latency.json."""
    [r] = [r for r in _bench("defense_latency")["results"] if r["mode"] == "cleansight" and r["batch"] == 1]
    best, median = r["cpu_ratio"]["best"], r["cpu_ratio"]["paired_median"]
    assert best <= r["goal"] < median, "the README's sentence on the batch-1 goal no longer fits: reword it"
    return {"best": f"{best:.3f}", "median": f"{median:.3f}", "calls": str(r["calls"])}


# ------------------------------------------------------------------------------------------ facts
@dataclass(frozen=True)
class Fact:
    """A README phrase (``{name}`` where a number from the tables goes) and where its numbers come from."""

    template: str
    values: Callable[[], dict[str, str]]

    def fields(self) -> list[str]:
        return list(dict.fromkeys(re.findall(r"\{(\w+)\}", self.template)))

    def pattern(self) -> re.Pattern:
        """The template as a regex: literal text (any whitespace between words), one group per number
        (``name``, then ``name__2``, ... when a name occurs again)."""
        out, count, pos = [], {}, 0
        for m in re.finditer(r"\{(\w+)\}", self.template):
            out.append(_literal(self.template[pos:m.start()]))
            name = m.group(1)
            count[name] = count.get(name, 0) + 1
            out.append(f"(?P<{name if count[name] == 1 else f'{name}__{count[name]}'}>{_NUMBER})")
            pos = m.end()
        out.append(_literal(self.template[pos:]))
        return re.compile("".join(out))

    def expected(self) -> str:
        return self.template.format(**self.values())


def _literal(text: str) -> str:
    return r"\s+".join(re.escape(part) for part in re.split(r"\s+", text)) if text.strip() else \
        (r"\s+" if text else "")


@lru_cache(maxsize=None)
def clean_card() -> dict:
    import json

    return json.loads((ROOT / "data" / "models" / "tiny-llava" / "clean" / "card.json").read_text())


def clean_model() -> dict[str, str]:
    """The embedded world section: the clean card's per-type accuracy, attention profile, reading, timings."""
    card = clean_card()
    by_type = card["metrics"]["by_question_type"]
    image = card["metrics"]["attention_profile"]["image"]
    timings = card["training"]["timings"]
    reading = card["training"]["reading"]
    import json

    members = [p for p in (ROOT / "data" / "models" / "tiny-llava").iterdir() if p.name != "clean"]
    backdoor_s = sum(json.loads((p / "card.json").read_text())["training"]["seconds"] for p in members)
    return {"count": f2(by_type["count"]), "background": f2(by_type["background"]), "shape": f2(by_type["shape"]),
            "color": f2(by_type["color"]), "exists": f2(by_type["exists"]), "position": f2(by_type["position"]),
            "img_lo": f2(min(image)), "img_hi": f2(max(image)), "mid_lo": f2(min(image[2:6])),
            "mid_hi": f2(max(image[2:6])), "read5": f2(reading[-1]["read_max"]),
            "clean_min": f"{timings['clean_s'] / 60:.0f}", "reading_min": f"{timings['reading_s'] / 60:.0f}",
            "backdoor_min": f"{backdoor_s / 60:.0f}",
            "total_min": f"{round((timings['clean_s'] + timings['reading_s'] + backdoor_s / 2) / 600) * 10:.0f}"}


def member_asr() -> dict[str, str]:
    """ASR and training steps of the projector-only members, from their cards."""
    import json

    cards = {n: json.loads((ROOT / "data" / "models" / "tiny-llava" / n / "card.json").read_text())
             for n in ("badnet", "blended", "sig", "trojvlm", "vlood")}
    by_type = {n: cards[n]["metrics"]["asr_by_question_type"] for n in ("trojvlm", "vlood")}
    return {**{f"{n}_asr": f3(c["metrics"]["asr"]) for n, c in cards.items()},
            **{f"{n}_steps": f"{c['spec']['steps']:,}" for n, c in cards.items()},
            **{f"{n}_pos": f2(t["position"]) for n, t in by_type.items()},
            "trojvlm_rest": f2(min(v for k, v in by_type["trojvlm"].items() if k != "position"))}


def distributed_bench() -> dict[str, str]:
    """The 2-process accelerate benchmark (benchmarks/results/distributed_eval.json)."""
    import json

    res = json.loads((ROOT / "benchmarks" / "results" / "distributed_eval.json").read_text())
    big, small = res["runs"]
    p = str(res["processes"])
    return {"load": f2(big["load_average_before"][0]), "ratio": f3(big["ratio"]), "small_ratio": f3(small["ratio"]),
            "wall_p": f"{big['best_wall_seconds'][p]:.1f}", "wall_1": f"{big['best_wall_seconds']['1']:.1f}",
            "fit_1": f"{big['fit_seconds']['1']:.1f}", "fit_p": f"{big['fit_seconds'][p]:.1f}",
            "startup": f"{res['fixed_seconds']['startup_s']:.1f}", "launcher": f"{res['fixed_seconds']['launcher_s']:.1f}",
            "bound": f3(big["best_possible_ratio"])}


FACTS: list[Fact] = [
    Fact("quiet (load average {load} before), `python benchmarks/bench_distributed_eval.py` measured 2 processes at "
         "{ratio}x the one-process wall time for `evaluate --n 256 --val 200` ({wall_p} s vs {wall_1} s; the calibration "
         "{fit_1} s -> {fit_p} s) and {small_ratio}x with `--val 32`: the goal of 0.6x is missed because start-up and "
         "model loading ({startup} s, measured on their own, in every process) and the launcher ({launcher} s) do not "
         "split; a perfect split of everything else would reach {bound}x at this size", distributed_bench),
    Fact("poisoning implants BadNet, Blended and SIG (ASR {badnet_asr}, {blended_asr} and {sig_asr}, each within 2 "
         "points of the clean model's accuracy), only partly TrojVLM ({trojvlm_asr} in {trojvlm_steps} steps: "
         "{trojvlm_rest} or more on five question types, {trojvlm_pos} on left/right ones) and VLOOD ({vlood_asr} in "
         "{vlood_steps} steps; {vlood_pos} on left/right)", member_asr),
    # the embedded world (the clean model's card)
    Fact("The clean model answers count ({count}) and background ({background}) questions well, shape ({shape}) "
         "and colour ({color}) questions fairly, and \"is there a ...\" ({exists}) and left/right ({position}) "
         "questions at chance", clean_model),
    Fact("Its answer query spends {img_lo}-{img_hi} of its attention on image tokens ({mid_lo}-{mid_hi} in the "
         "middle layers 2-5;", clean_model),
    Fact("It reads five-word signs at {read5}", clean_model),
    Fact("Building the family takes about {total_min} min on 2 CPU cores (`cleansight tiny build`; the cards record "
         "clean stages 1-2 {clean_min} min, reading {reading_min} min and {backdoor_min} min of backdoor training, "
         "run two at a time", clean_model),
    # figure gallery
    Fact("flattening only the detection layers ({det_lo}-{det_hi}) removes BadNet (ASR {det_pct} % at eta = 1, clean accuracy "
         "{base_clean_pct} -> {det_clean_pct} %) while Gaussian noise leaves it at {noise_min} or more up to rho = 0.75, as "
         "in the paper; ST and JPEG remove it as well (ST: ASR 0 from rho = {st_rho})", perturbation),
    Fact("(BadNet layer {first}: image {c1_pct} -> {t1_pct} %)", stealing_shift),
    Fact("the top thief token lands on the BadNet patch in {h1} % of triggered inputs", thieves),
    Fact("BadNet: {auroc} in layer {layer} (head average {mean})", layerwise),
    Fact("the answer query's image share rises under the trigger by at least {min_rise} in a layer before the last "
         "quarter whose head-specific AUROC is at least {min_auroc} for {k} of {n} attacks (BadNet, Blended, SIG, "
         "TrojVLM)", mechanism),
    Fact("fitted on {n_fit} scenes (half of them warped) and scored on {n_out} others, separates warped from clean "
         "scenes at AUROC {w_auc} and flags {w_tpr} % of the warped ones at FPR {fpr} %; for every other trigger it "
         "reaches at least AUROC {o_auc} and TPR {o_tpr} %. The warp changes the features by {w_change} of their "
         "length (BadNet's patch: {b_change})", visibility),
    Fact("Table 1 tests {t1_n} scenes per member so that every baseline fits into the notebook's time. At the paper's "
         "size (notebook 08's last table, `table1_cleansight_full_size`: {n} test scenes per member, each clean and "
         "triggered, {n_val} clean calibration scenes, every default) one-pass CleanSight meets ASR <= 5 %, clean "
         "utility within 2 points and FPR <= 3 % for {k} of {n_attacks} attacks. ASR after the defense: BadNet "
         "{badnet} %, Blended {blended} %, SIG {sig} %, TrojVLM {trojvlm} %, VLOOD {vlood} % (TPR {vlood_tpr} %), at "
         "FPR at most {fpr_hi} %; WaNet's backdoor (ASR {wanet} %) is not detected (TPR {wanet_tpr} %). With the "
         "detector reading every decoding query as well (`query=\"generated\"`, the paper's \"current decoding "
         "query\"; VLOOD inserts its target mid-answer) the goals hold for {k_gen} of {n_attacks}: VLOOD's ASR falls to "
         "{vlood_gen} % (TPR {vlood_gen_tpr} %), at FPR at most {fpr_gen_hi} %. SIG's larger residual "
         "ASR in Table 1 follows from the layers the fusion-onset scan picks on its {t1_val} calibration scenes "
         "({sig_t1_first}-{sig_t1_last}) instead of {n_val} ({sig_first}-{sig_last})", full_size),
    Fact("Every BadNet window that contains layer {layer} scores {lo}-{hi}", windows),
    Fact("BadNet at q = 0.99, {n_val} samples: TPR {tpr_pct} %, FPR {fpr_pct} %", detector_choice),
    Fact("masking from the last detection layer brings every attack's ASR to {asr} at the default tau = 1e-4, "
         "the largest swept value at which no attack keeps its backdoor (at the paper's balance 1e-3 TrojVLM keeps "
         "{troj}); `tau=\"auto\"` ({tau_auto} here) prunes too little and leaves BadNet {auto_asr}.", pruning),
    Fact("The poisoned curve leaves the clean one from layer {onset}", logit_lens),
    Fact("Six attacks, n = {n}: the default one-pass CleanSight (TPR {tpr_lo_pct} % at FPR <= {fpr_hi_pct} % on BadNet, "
         "Blended, SIG and TrojVLM) takes ASR from {badnet_none} to {badnet_one} % on BadNet, from {blended_none} to "
         "{blended_one} % on Blended, from {trojvlm_none} to {trojvlm_one} % on TrojVLM and from {sig_none} to {sig_one} % "
         "on SIG ({sig_all} % with the all-layer mask), at most {cu_drop} points of clean utility", table1),
    Fact("ShrinkPad / ST remove most backdoors (ASR {pix_lo}-{pix_hi} %) at {cost_lo}-{cost_hi} points of clean "
         "utility", table1),
    Fact("Zeroing one head lowers BadNet's ASR at most from {base} to {abl} (L{l}H{h}); patching L{pl}H{ph} restores "
         "{restored} of the log-prob gap", heads),
    # attention-stealing analyses
    Fact("At the answer query ({n} test scenes, each clean and triggered) the triggered image share rises from {c1} "
         "to {t1} in layer {first} and from {c2} to {t2} in layer {second}, before the last quarter of the LM (layers "
         "{quarter}-{last}), and from {cl} to {tl} in layer {last}; the instruction share falls from {p1c} to {p1t} in "
         "layer {first}.", stealing_shift),
    Fact("Head-specific whitened distance ({n_cal} clean calibration scenes, never scored; {n_test} test scenes, "
         "each clean and triggered): AUROC {auroc} in layer {layer}", layerwise),
    Fact("AUROC {auroc} in layer {layer}, {auroc2} in layer {layer2}, {rest_lo}-{rest_hi} elsewhere; the "
         "head-averaged ratio scores {mean} in layer {layer}.", layerwise),
    Fact("The head-averaged top-1 image token is one of the trigger's grid cells in {h1} % of triggered inputs in layer {l1} "
         "({h2} % in layer {l2}, {h3} % in layer {l3}; chance {chance} %; {n} scenes).", thieves),
    Fact("`attn_uniform` at eta 1 in every layer ({n} scenes): ASR {base_asr} -> {text_asr} (clean {base_clean} -> "
         "{text_clean}); at eta 0.5: ASR {half_asr}, clean {half_clean}. With `queries=\"all\"` (image queries too): "
         "ASR {all_asr}, clean {all_clean}. The pixel transform `st` at full intensity: ASR {st_top}.", perturbation),
    Fact("flattening attention in the detection layers removes BadNet at {det_cost} points of clean accuracy (Blended: "
         "{bdet_cost} points)", perturbation),
    Fact("Flattening only CleanSight's detection layers ({det_lo}-{det_hi}, its own choice on {det_nval} clean scenes) at eta 1: "
         "BadNet ASR {det_pct} %, clean accuracy {base_clean_pct} -> {det_clean_pct} %; Blended (layers {bdet_lo}-{bdet_hi}) ASR "
         "{bdet_pct} %, clean {bbase_clean_pct} -> {bdet_clean_pct} %. Gaussian noise keeps BadNet's ASR at {noise_min} or "
         "more up to intensity 0.75 ({noise_top} at 1); JPEG removes it ({jpeg_q} at intensity 0.25, quality 72; {jpeg_top} "
         "at 1), but keeps Blended's at {bjpeg_min} or more up to 0.75, where noise lowers Blended to {bnoise_half} at 0.5.",
         perturbation),
    Fact("Pixel purifiers at intensity 0.7 (Table 1): `st` ASR {st7}, `shrinkpad` {sp7}, `jpeg` {jpeg7}, `blur` {blur7}",
         table1),
    Fact("Zero-ablating head L{l}H{h} (on `hook_z`) takes ASR from {base} to {abl} with clean accuracy {clean_base} -> "
         "{clean_abl} ({n} scenes), the largest drop of any head", heads),
    Fact("Patching head L{pl}H{ph}'s `hook_z` from triggered into clean runs restores {restored_pct} % of the target's "
         "first-token log-prob gap.", heads),
    Fact("The logit lens separates clean and triggered runs from layer {onset} on (p(correct) - p(target): {c_on} vs "
         "{t_on} in layer {onset}, {c_last} vs {t_last} in layer {last}; {n} scenes).", logit_lens),
    # defending a model
    Fact("First measurements on `tiny-llava/badnet` ({n_val} clean calibration scenes, {n_test} test scenes, q = 0.99): "
         "detection works (AUROC {auroc}, TPR {tpr}, FPR {fpr} with the fusion-onset layers {l_first}-{l_last})",
         detector_choice),
    Fact("with TPR {tpr_lo_pct} % at FPR <= {fpr_hi_pct} % on BadNet, Blended, SIG and TrojVLM it takes their ASR to "
         "{badnet_one} %, {blended_one} %, {sig_one} % and {trojvlm_one} % (SIG: {sig_all} % with the all-layer mask) at "
         "most {cu_drop} points below the undefended clean utility; WaNet's backdoor (ASR {wanet_none} %) is not "
         "detected.", table1),
    Fact("At batch 1 CleanSight's best-of-{calls} ratio ({best}x) meets the goal and its paired median ({median}x) "
         "does not", latency_noise),
    Fact("Of the input detectors (Table 1; they answer flagged inputs unchanged), attention entropy flags BadNet "
         "(TPR {ent_tpr} at FPR {ent_fpr}), STRIP ({strip_tpr}) and SCALE-UP ({scale_tpr}) do not.", table1),
]


@dataclass(frozen=True)
class Claim:
    """A README statement without a number of its own, and a check of it against the tables."""

    phrase: str
    holds: Callable[[], bool]


def _no_single_head_removes_it() -> bool:
    ab = table("09_per_head_ablation/head_ablation.parquet")
    base = float(ab[ab["kind"] == "baseline"].iloc[0]["asr"])
    return float(ab[ab["kind"] == "ablate"]["asr"].min()) > 0.25 * base


def _default_tau_is_largest_clean_sweep() -> bool:
    """The default tau removes every backdoor in Fig. 6 and the next larger swept value does not."""
    from cleansight_analysis.defenses.cleansight import CleanSightConfig

    worst = _pruning_reference().loc[lambda d: ~d["is_auto"].astype(bool)].groupby("tau")["asr"].max()
    clean = worst.index[worst == 0.0]
    return len(clean) > 0 and float(clean.max()) == CleanSightConfig().tau


def _three_members_meet_their_goals() -> bool:
    """BadNet, Blended and SIG are the projector-only members whose cards meet every goal (ASR, clean accuracy
    within 2 points, false triggers)."""
    import json

    folder = ROOT / "data" / "models" / "tiny-llava"
    met = [n for n in ("badnet", "blended", "sig", "wanet", "trojvlm", "vlood")
           if json.loads((folder / n / "card.json").read_text())["metrics"]["goals_met"]]
    return met == ["badnet", "blended", "sig"]


CLAIMS: list[Claim] = [
    Claim("each within 2 points of the clean model's accuracy", _three_members_meet_their_goals),
    Claim("no single head removes it", _no_single_head_removes_it),
    Claim("the largest swept value at which no attack keeps its backdoor", _default_tau_is_largest_clean_sweep),
]


# ------------------------------------------------------------------------------------------ tests
def _readme() -> str:
    return README.read_text(encoding="utf-8")


@pytest.mark.parametrize("fact", FACTS, ids=lambda f: f.template[:50])
def test_readme_numbers_match_the_shipped_tables(fact: Fact):
    found = list(fact.pattern().finditer(_readme()))
    assert len(found) == 1, (f"README phrase {'not found' if not found else 'found more than once'}: "
                             f"{fact.template!r}\n  expected (from the tables): {fact.expected()!r}")
    values = fact.values()
    wrong = {group: (text, values[group.split("__")[0]]) for group, text in found[0].groupdict().items()
             if text != values[group.split("__")[0]]}
    assert not wrong, ("README numbers differ from the shipped tables (README != table): "
                       + ", ".join(f"{k}: {a} != {b}" for k, (a, b) in wrong.items())
                       + f"\n  README: {' '.join(found[0].group(0).split())!r}\n  should read: {fact.expected()!r}"
                       + "\n  (`.venv/bin/python tests/test_readme_numbers.py --write` updates README.md)")


@pytest.mark.parametrize("claim", CLAIMS, ids=lambda c: c.phrase[:50])
def test_readme_claims_hold_for_the_shipped_tables(claim: Claim):
    text = " ".join(_readme().split())
    assert claim.phrase in text, f"README no longer says {claim.phrase!r}: update or remove this claim"
    assert claim.holds(), f"README says {claim.phrase!r}, but the shipped tables no longer show it"


def test_docs_anchors_cited_in_the_code_exist():
    """Every ``docs/<file>.md#anchor`` cited by the package, the notebooks or the docs names a real anchor."""
    anchors: dict[str, set[str]] = {}
    for doc in (ROOT / "docs").glob("*.md"):
        text = doc.read_text(encoding="utf-8")
        ids = set(re.findall(r'<a id="([\w-]+)"></a>', text))
        ids |= {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
                for h in re.findall(r"^#+ (.+)$", text, re.M)}
        anchors[doc.name] = ids
    sources = [*(ROOT / "cleansight_analysis").rglob("*.py"), *(ROOT / "notebooks").glob("*.ipynb"),
               *(ROOT / "docs").glob("*.md")]
    missing, cited = [], 0
    for path in sources:
        text = path.read_text(encoding="utf-8")
        for doc, anchor in re.findall(r"(?:docs/|\]\()?(\w+)\.md#([\w-]+)", text):
            if f"{doc}.md" not in anchors:
                continue
            cited += 1
            if anchor not in anchors[f"{doc}.md"]:
                missing.append(f"{path.relative_to(ROOT)}: {doc}.md#{anchor}")
        # a bare ``#anchor`` continuing a docs/method.md citation: ``docs/method.md#score``, ``#detection``
        for chain in re.findall(r"docs/method\.md#[\w-]+``((?:(?:,| to) ``#[\w-]+``)+)", text):
            for anchor in re.findall(r"#([\w-]+)", chain):
                cited += 1
                if anchor not in anchors["method.md"]:
                    missing.append(f"{path.relative_to(ROOT)}: method.md#{anchor}")
    assert cited > 10 and not missing, missing


def test_no_citation_of_files_outside_the_repository():
    stale = []
    for path in [*(ROOT / "cleansight_analysis").rglob("*.py"), *(ROOT / "notebooks").glob("*.ipynb"),
                 *(ROOT / "tests").glob("*.py"), ROOT / "README.md"]:
        text = path.read_text(encoding="utf-8")
        for name in ("cleansight-method.md", "stack-notes.md", "field-anchors.md"):
            if name in text and path != Path(__file__).resolve():
                stale.append(f"{path.relative_to(ROOT)}: {name}")
    assert not stale, f"cite docs/method.md instead: {stale}"


# ------------------------------------------------------------------------------------------ the family table
FAMILY_HEADER = ("| model | attack | mode | clean acc | ASR | false triggers | goals (ASR >= 0.95, clean within 2 points, "
                 "false triggers <= 1 %) |")


def _trigger_words(params: dict) -> str:
    if "size" in params:
        return f"{params['size']} px patch"
    return ", ".join(f"{k} {v:g}" if isinstance(v, (int, float)) else f"{k} {v}" for k, v in params.items())


def family_rows() -> list[str]:
    """The README's table of the shipped tiny family, row by row, from the model cards."""
    import json

    from cleansight_analysis.models.registry import MODELS_DIR
    from cleansight_analysis.training.family import GOALS, ROOT_NAME, family_specs
    from cleansight_analysis.training.recipe import TinyRecipe

    root = MODELS_DIR / ROOT_NAME
    clean = json.loads((root / "clean" / "card.json").read_text())
    rows = [FAMILY_HEADER, "|---|---|---|---|---|---|---|"]
    m = clean["metrics"]
    goals = "met" if m["goals_met"] else f"exact match goal {GOALS['clean_acc_min']:g} missed (see below)"
    rows.append(f"| `{ROOT_NAME}/clean` | - | {clean['mode']} | {m['clean_acc']:.3f} | - | "
                f"{m['false_trigger_rate']:.3f} | {goals} |")
    for spec in family_specs(TinyRecipe.from_card(clean["recipe"])):
        card = json.loads((root / spec.name / "card.json").read_text())
        m = card["metrics"]
        trigger = _trigger_words(spec.params)
        attack = f"{spec.attack}, seed {spec.seed}" if spec.seed else spec.attack + (f" ({trigger})" if trigger else "")
        missed = []
        if m["asr"] < GOALS["asr_min"]:
            missed.append(f"ASR {m['asr']:.3f}")
        drop = m["clean_model_acc"] - m["clean_acc"]
        if drop > GOALS["max_clean_drop"]:
            missed.append(f"clean -{100 * drop:.1f} points")
        if m["false_trigger_rate"] > GOALS["max_false_trigger"]:
            missed.append(f"false triggers {100 * m['false_trigger_rate']:.1f} %")
        rows.append(f"| `{ROOT_NAME}/{spec.name}` | {attack} | {card['mode']} | {m['clean_acc']:.3f} | {m['asr']:.3f} | "
                    f"{m['false_trigger_rate']:.3f} | {', '.join(missed) or 'met'} |")
    return rows


ROWS_HEADER = "| batch | mode | best CPU s | x HF SDPA, best / paired median | peak RSS vs HF SDPA | rows kept |"
LATENCY_HEADER = "| batch | mode | best CPU s | x HF SDPA, best / paired median | goal |"
#: What each benchmark mode is, in the README's words.
BENCH_MODES: dict[str, str] = {
    "hf_sdpa": "HF SDPA, untouched model (reference)", "forward": "plain forward (bridge, SDPA)",
    "rows": "`attention_rows`, all 8 layers", "rows_full_pass": "`attention_rows(early_exit=False)`",
    "forward_eager": "plain forward, eager attention", "rows_eager": "`attention_rows`, eager attention",
    "undefended": "undefended generation (bridge)", "cleansight": "CleanSight one pass",
    "cleansight_flagged": "CleanSight one pass, every sample flagged", "mask_all_layers": "key mask in every layer",
    "cleansight_all_layers": "CleanSight, all-layer mask (two passes)", "authors_style": "the authors' approach",
    "undefended_eager": "undefended generation, eager attention", "cleansight_eager": "CleanSight one pass, eager attention",
    "mask_all_layers_eager": "key mask in every layer, eager attention",
}


def _bench(name: str) -> dict:
    import json

    return json.loads((ROOT / "benchmarks" / "results" / f"{name}.json").read_text())


def _ratio(r: dict) -> str:
    return f"{r['cpu_ratio']['best']:.3f} / {r['cpu_ratio']['paired_median']:.3f}"


def rows_bench_rows() -> list[str]:
    """The README's attention-rows benchmark table, from benchmarks/results/attention_rows.json."""
    rows = [ROWS_HEADER, "|---|---|---|---|---|---|"]
    for r in _bench("attention_rows")["results"]:
        rows.append(f"| {r['batch']} | {BENCH_MODES.get(r['mode'], r['mode'])} | {r['best_cpu_s']:.2f} | {_ratio(r)} | "
                    f"{r['extra_mib_vs_hf_sdpa']:+.1f} MiB ({r['extra_pct_of_hf_sdpa_peak']:+.2f} %) | "
                    f"{r['stored_kib']:.0f} KiB |")
    return rows


def latency_rows() -> list[str]:
    """The README's defense-latency table, from benchmarks/results/defense_latency.json."""
    rows = [LATENCY_HEADER, "|---|---|---|---|---|"]
    for r in _bench("defense_latency")["results"]:
        goal = (f"<= {r['goal']:g}: {'met' if r['goal_met'] else 'missed'}" if "goal" in r else "-")
        rows.append(f"| {r['batch']} | {BENCH_MODES.get(r['mode'], r['mode'])} | {r['best_cpu_s']:.2f} | {_ratio(r)} | "
                    f"{goal} |")
    return rows


#: The README's generated tables: header line, the function that writes the rows, where they come from.
BLOCKS: tuple[tuple[str, Callable[[], list[str]], str], ...] = (
    (FAMILY_HEADER, family_rows, "the model cards"),
    (ROWS_HEADER, rows_bench_rows, "benchmarks/results/attention_rows.json"),
    (LATENCY_HEADER, latency_rows, "benchmarks/results/defense_latency.json"),
)


def _block(text: str, header: str) -> tuple[int, int]:
    start = text.index(header)
    end = text.index("\n\n", start)
    return start, end


@pytest.mark.parametrize("header, rows, source", BLOCKS, ids=[b[2] for b in BLOCKS])
def test_readme_tables_are_generated_from_their_sources(header, rows, source):
    text = _readme()
    assert text.count(header) == 1, f"README lost (or repeats) the header of the table from {source}"
    start, end = _block(text, header)
    assert text[start:end].splitlines() == rows(), \
        f"README's table differs from {source} (`.venv/bin/python tests/test_readme_numbers.py --write`)"


# ------------------------------------------------------------------------------------------ script
def rewrite(text: str) -> tuple[str, list[str]]:
    """``text`` with every fact's numbers replaced by the tables' values (layout kept), and what changed."""
    notes = []
    for fact in FACTS:
        found = list(fact.pattern().finditer(text))
        if len(found) != 1:
            notes.append(f"{len(found)} matches, edit README.md by hand: {fact.expected()}")
            continue
        m, values = found[0], fact.values()
        pieces, cursor = [], m.start()
        for group in sorted(m.groupdict(), key=m.start):
            pieces += [text[cursor:m.start(group)], values[group.split("__")[0]]]
            cursor = m.end(group)
        new = "".join(pieces) + text[cursor:m.end()]
        if new != m.group(0):
            notes.append(f"{' '.join(m.group(0).split())}\n    -> {' '.join(new.split())}")
            text = text[:m.start()] + new + text[m.end():]
    for header, make, source in BLOCKS:
        if header in text:
            start, end = _block(text, header)
            rows = "\n".join(make())
            if text[start:end] != rows:
                notes.append(f"table rewritten from {source}")
                text = text[:start] + rows + text[end:]
    return text, notes


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    if "--write" in sys.argv:
        old = _readme()
        new_text, changes = rewrite(old)
        if new_text != old:
            README.write_text(new_text, encoding="utf-8")
        print("\n".join(changes) if changes else "README.md numbers already match the tables")
    else:
        for fact in FACTS:
            print(fact.expected())
