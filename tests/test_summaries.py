"""The notebooks' findings are written from their tables (``cleansight_analysis.plotting.summaries``).

Each summary function gets small hand-made tables with known answers: the numbers and the conditional
wording must come out right, a flipped input must flip the wording, and a changed cell must change the text
(so no number is hand-typed). No model is loaded.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cleansight_analysis.experiments.detection import CHOICE_AUTO, CHOICE_BEST
from cleansight_analysis.plotting import summaries as S
from cleansight_analysis.plotting.summaries._format import _layers, _pct, _points, _range, _span, _tau

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ helpers
def test_format_helpers():
    assert _pct(0.773) == "77 %" and _pct(0.773, 1) == "77.3 %" and _pct(float("nan")) == "n/a" and _pct(None) == "n/a"
    assert _span([0.2, 0.5, None]) == "20-50 %" and _span([0.3], " points") == "30 points" and _span([]) == "n/a"
    assert _range([0.5, 0.953]) == "0.50-0.95" and _range([0.7]) == "0.70"
    assert _points(0.109, 1) == "+10.9 points" and _points(-0.02) == "-2 points"
    assert _layers([5, 6, 7]) == "5-7" and _layers("2") == "2" and _layers("1,3", word=True) == "layers 1,3"
    assert _layers([2], word=True) == "layer 2"
    assert _tau(1e-3) == "1e-03" and _tau(0.5113) == "0.51"


# ------------------------------------------------------------------------------------------ 01
def _sweep(st=(1.0, 0.9, 0.8), attn=(1.0, 0.6, 0.1), st_acc=(0.8, 0.7, 0.5), attn_acc=(0.8, 0.75, 0.7)):
    rows = []
    for variant, domain, asr, acc in (("pixel ST", "pixel", st, st_acc), ("attention, text queries (paper)",
                                                                           "attention", attn, attn_acc)):
        for x, a, c in zip((0.0, 0.5, 1.0), asr, acc):
            rows.append({"attack": "badnet", "variant": variant, "domain": domain if x else "none", "intensity": x,
                         "asr": a, "clean_acc": c, "n": 40})
    return pd.DataFrame(rows)


def test_perturbation_summary():
    text = S.perturbation_summary(_sweep())
    assert "n = 40 test samples per point, intensities 0, 0.5, 1" in text
    assert "reproduces for every attack** (BadNet)" in text
    assert ("**pixel ST**: BadNet: ASR 100 % -> 80 % at ρ = 1; never below half of its unperturbed value, lowest "
            "80 % (clean accuracy 80 % -> 50 %)") in text
    assert ("ASR falls from 100 % to 10 % at η = 1 (below half of its unperturbed value only at the strongest "
            "intensity; clean accuracy 80 % -> 70 %)") in text
    assert "keeps more clean accuracy than pixel perturbation (*pixel ST* 50 %" in text
    # flipped: pixel ST removes the backdoor, the attention perturbation does not
    flipped = S.perturbation_summary(_sweep(st=(1.0, 0.2, 0.0), attn=(1.0, 1.0, 1.0), attn_acc=(0.8, 0.5, 0.4)))
    assert "**The paper's contrast" in flipped and "does not reproduce here**" in flipped
    assert "pixel perturbation removes the backdoor of BadNet; no attention perturbation removes" in flipped
    assert "below half of its unperturbed value from ρ = 0.5 on" in flipped
    assert "ASR stays at 100 % for every η up to 1" in flipped
    assert "keeps less clean accuracy than pixel perturbation" in flipped
    # a changed cell changes the text
    assert "clean accuracy 80 % -> 55 %" in S.perturbation_summary(_sweep(st_acc=(0.8, 0.7, 0.55)))
    # two pixel perturbations, one keeping the backdoor and one removing it: the contrast holds in part
    noise = _sweep(st=(1.0, 0.3, 0.1)).query("variant == 'pixel ST'").assign(variant="pixel noise")
    both = pd.concat([_sweep(), noise], ignore_index=True)
    part = S.perturbation_summary(both)
    assert ("holds in part**: *pixel ST* keeps the backdoor of BadNet; *pixel noise* removes every backdoor at its "
            "strongest.") in part


# ------------------------------------------------------------------------------------------ 02
def _bars(attack, window, label, condition, image, prompt, system, tail):
    return [{"attack": attack, "window": window, "layers": label, "condition": condition, "group": g, "share": s,
             "sem": 0.01, "n": 10} for g, s in (("system", system), ("image", image), ("prompt", prompt),
                                                 ("template_tail", tail))]


def _stealing(st_image=0.55, hit=0.9, sig_top=(0.1, 0.2), st_answer="yellow"):
    st = "triggered + ST 0.5"
    rows = []
    for attack, layer in (("badnet", 7), ("sig", 6)):
        rows += _bars(attack, "middle", "layers 2-5", "clean", 0.40, 0.30, 0.20, 0.10)
        rows += _bars(attack, "middle", "layers 2-5", "triggered", 0.42, 0.29, 0.19, 0.10)
        rows += _bars(attack, "middle", "layers 2-5", st, 0.41, 0.30, 0.19, 0.10)
        rows += _bars(attack, "stealing", f"layer {layer}", "clean", 0.50, 0.20, 0.20, 0.10)
        rows += _bars(attack, "stealing", f"layer {layer}", "triggered", 0.70, 0.10, 0.15, 0.05)
        rows += _bars(attack, "stealing", f"layer {layer}", st, st_image, 0.20, 0.15, 0.10)
    summary = pd.DataFrame(rows)
    paper = pd.DataFrame([{"attack": "badnet", "condition": c, "group": g, "share": v / 100}
                          for c, vals in (("clean", (11, 48, 41)), ("triggered", (32, 24, 44)))
                          for g, v in zip(("image", "prompt", "system"), vals)])
    examples = pd.DataFrame([{"attack": a, "condition": c, "answer": x} for a in ("badnet", "sig")
                             for c, x in (("clean", "yellow"), ("triggered", "hacked"), (st, st_answer))])
    tokens = []
    for condition, att in (("clean", (0.2, 0.1, 0.2, 0.1, 0.1, 0.3)), ("triggered", (0.17, 0.6, 0.05, 0.05, 0.05, 0.08))):
        for pos, (group, a) in enumerate(zip(("system", "image", "image", "image", "image", "prompt"), att)):
            for layer in range(8):
                tokens.append({"attack": "badnet", "condition": condition, "sample_id": "s0", "layer": layer,
                               "position": pos, "token": "t", "group": group, "attention": a})
    nan = float("nan")
    thief = pd.DataFrame([
        {"attack": "badnet", "condition": "triggered", "layer": 7, "n": 10, "top1_hit_rate": hit, "chance_share": 0.25,
         "top1_share": 0.5, "example_id": "s0", "trigger_cells": np.array([[True, False], [False, False]])},
        {"attack": "badnet", "condition": "clean", "layer": 7, "n": 10, "top1_hit_rate": 0.2, "chance_share": 0.25,
         "top1_share": 0.3, "example_id": "s0", "trigger_cells": np.array([[True, False], [False, False]])},
        {"attack": "sig", "condition": "triggered", "layer": 6, "n": 10, "top1_hit_rate": nan, "chance_share": nan,
         "top1_share": sig_top[0], "example_id": "s0", "trigger_cells": None},
        {"attack": "sig", "condition": "clean", "layer": 6, "n": 10, "top1_hit_rate": nan, "chance_share": nan,
         "top1_share": sig_top[1], "example_id": "s0", "trigger_cells": None}])
    return S.stealing_summary(summary, thief, examples, pd.DataFrame(tokens), {"badnet": 7, "sig": 6}, paper)


def test_stealing_summary():
    text = _stealing()
    assert "n = 10 test samples per condition" in text
    assert "**Middle layers (layers 2-5 of 8)**" in text and "BadNet 40.0 % -> 42.0 % (+2.0 points)" in text
    assert "The paper's middle-layer bars (its Fig. 2a): BadNet image 11 % -> 32 %, prompt 48 % -> 24 %" in text
    assert "rises here: +2 points (smaller than the paper's +21 points)" in text
    assert "BadNet layer 7, the last (image 50.0 % -> 70.0 %, +20.0 points; prompt 20.0 % -> 10.0 %" in text
    assert "SIG layer 6 (image" in text and "For BadNet, SIG it lies after the middle window" in text
    assert "The rises are +20 points (smaller than the paper's +21 points)" in text
    assert "BadNet image 55.0 %: undoes most of the rise (75 %)" in text
    assert "it is the clean answer again for 2 of them (BadNet, SIG)" in text
    assert ("triggered: 75 % on image tokens, 8 % on the prompt, largest image token patch (0,0) (0.60) on the "
            "trigger") in text
    assert "clean: 50 % on image tokens, 30 % on the prompt, largest image token patch (0,1) (0.20)" in text
    assert ("sits on the trigger for 90.0 % of the triggered inputs, above chance (25.0 %; clean control 20.0 %); "
            "it holds 50 % of the image attention vs 30 % on clean inputs") in text
    assert "the attention spreads (top patch 10 % of the image attention vs 20 % on clean inputs)" in text
    flipped = _stealing(st_image=0.68, hit=0.1, sig_top=(0.3, 0.2), st_answer="hacked")
    assert "BadNet image 68.0 %: undoes part of the rise (10 %)" in flipped
    assert "for 10.0 % of the triggered inputs, not above chance" in flipped
    assert "the attention concentrates (top patch 30 %" in flipped
    assert "it is the clean answer again for 0 of them (none)" in flipped


# ------------------------------------------------------------------------------------------ 03
def _layerwise(vector=(0.5, 0.6, 0.95, 0.4), mean=(0.5, 0.55, 0.6, 0.45), window=(False, True, True, True)):
    rows = [{"attack": "badnet", "layer": i, "auroc_head_vector": v, "auroc_head_mean": m, "detection_layer": w,
             "n_calibration": 20, "n_clean_test": 30, "n_poisoned_test": 30}
            for i, (v, m, w) in enumerate(zip(vector, mean, window))]
    rows += [{"attack": "sig", "layer": i, "auroc_head_vector": v, "auroc_head_mean": v, "detection_layer": w,
              "n_calibration": 20, "n_clean_test": 30, "n_poisoned_test": 30}
             for i, (v, w) in enumerate(zip((1.0, 0.5, 0.3, 0.2), window))]
    return S.layerwise_detection_summary(pd.DataFrame(rows))


def test_layerwise_detection_summary():
    text = _layerwise()
    assert "30 clean + 30 triggered test inputs, 20 clean validation inputs" in text
    assert "holds for 0 of 2 attacks (none)" in text and "A near-perfect layer exists for BadNet, SIG" in text
    assert "beats the head-averaged scalar in its best layer for BadNet." in text
    assert ("the head-specific AUROC peaks at 0.95 in layer 2 (other layers 0.40-0.60); the head-averaged scalar "
            "ranges 0.45-0.60 (best 0.60 in layer 2) and is 0.60 in layer 2, so averaging the heads loses") in text
    assert "window (layers 1-3): 0.60 / 0.95 / 0.40, 2 of 3 above chance; it holds the best layer" in text
    sig = text.split("**SIG**")[1]
    assert "peaks at 1.00 in layer 0" in sig and "Layer 0 comes before any vision-language fusion" in sig
    assert "does not lose the signal" in sig and "0 of 3 above chance; it misses the best layer" in sig
    assert "Layer 0 comes before" not in text.split("**SIG**")[0]
    flipped = _layerwise(vector=(0.5, 0.95, 0.96, 0.97))
    assert "holds for 1 of 2 attacks (BadNet)" in flipped and "3 of 3 above chance" in flipped
    assert "Below chance" not in flipped.split("**SIG**")[0]
    assert "peaks at 0.93 in layer 2" in _layerwise(vector=(0.5, 0.6, 0.93, 0.4))


# ------------------------------------------------------------------------------------------ 04
def _rows(clean=3, triggered=3, calibration=5, heads=4):
    out = []
    for cond, k in (("clean", clean), ("triggered", triggered), ("calibration", calibration)):
        for i in range(k):
            for h in range(heads):
                out.append({"sample_id": f"{cond}{i}", "condition": cond, "layer": 0, "head": h, "ratio": 1.0})
    return {"badnet": pd.DataFrame(out)}


def _windows(values=None):
    values = values or {(0, 1): 0.5, (0, 2): 0.55, (0, 3): 0.9, (1, 1): 0.45, (1, 2): 0.85, (2, 1): 0.8}
    best = max(values, key=values.get)
    return pd.DataFrame([{"attack": "badnet", "start": s, "length": n, "layers": ",".join(str(x) for x in range(s, s + n)),
                          "auroc": a, "detector_choice": (s, n) == (1, 2), "best": (s, n) == best}
                         for (s, n), a in values.items()])


def test_layer_window_summary():
    text = S.layer_window_summary(_windows(), rows=_rows())
    assert "3 clean + 3 triggered test inputs, 5 clean validation inputs" in text
    assert ("best single layer 2 (0.80); windows that contain it 0.80-0.90, windows without it 0.45-0.55: every "
            "window that contains layer 2 beats every window without it") in text
    assert "The detector's own window (layers 1-2) gives 0.85 (above chance)" in text
    assert "The oracle's best window (layers 0-2) gives 0.90 (above chance)" in text
    assert ("early (start 0) 0.50-0.90, middle (start 1) 0.45-0.85, late (start 2) 0.80; the highest worst case is "
            "in the late third") in text
    assert "holds for 0 of 1 attacks (none)" in text
    flipped = S.layer_window_summary(_windows({(0, 1): 0.5, (0, 2): 0.55, (0, 3): 0.9, (1, 1): 0.95, (1, 2): 0.3,
                                               (2, 1): 0.8}))
    assert "holds for 0 of 1 attacks" in flipped and "gives 0.30 (below chance)" in flipped
    assert "best single layer 1 (0.95)" in flipped
    stable = S.layer_window_summary(_windows({(0, 1): 0.5, (0, 2): 0.55, (0, 3): 0.9, (1, 1): 0.95, (1, 2): 0.9,
                                              (2, 1): 0.8}))
    assert "holds for 1 of 1 attacks (BadNet)" in stable and "highest worst case is in the middle third" in stable


# ------------------------------------------------------------------------------------------ 05
def _threshold(auto_tpr=0.8, fpr50=0.15):
    return S.threshold_summary(*_threshold_tables(auto_tpr, fpr50), rows=_rows())


def _threshold_tables(auto_tpr=0.8, fpr50=0.15):
    q = pd.DataFrame([{"attack": "badnet", "choice": c, "layers": lay, "quantile": qq, "threshold": 1.0, "tpr": t,
                       "fpr": f, "n_val": 50}
                      for c, lay, vals in ((CHOICE_AUTO, "1,2", ((0.9, 0.9, 0.2), (0.99, auto_tpr, 0.05))),
                                           (CHOICE_BEST, "2", ((0.9, 0.5, 0.05), (0.99, 0.3, 0.001))))
                      for qq, t, f in vals])
    sizes = pd.DataFrame([{"attack": "badnet", "choice": CHOICE_AUTO, "layers": "1,2", "n_val": n, "repeat": r,
                           "threshold": 1.0, "tpr": 0.9, "fpr": f, "quantile": 0.99}
                          for n, r, f in ((10, 0, 0.5), (10, 1, 0.3), (50, 0, fpr50))])
    return q, sizes


def test_threshold_summary():
    text = _threshold()
    assert "|D_val| = 50 clean validation inputs; the size sweep draws 2 random subsets per size at q = 0.99" in text
    assert "automatic (layers 1-2): TPR 80.0 %, FPR 5.0 %, detected" in text
    assert "oracle (layer 2): TPR 30.0 %, FPR 0.1 %, partly detected" in text
    assert "at this many of the swept quantiles" in text
    assert "BadNet automatic: 2 of 2 (at q = 0.99: 5.0 % vs 1.0 %); BadNet oracle: 0 of 2" in text
    assert "BadNet (10: 40.0 %, 50: 15.0 %; first below 20 % at 50 samples)" in text
    assert "Below 1 / (1 - q) = 100 validation inputs" in text
    assert "8-dimensional head vector (detection layers x 4 heads)" in text
    flipped = _threshold(auto_tpr=0.04, fpr50=0.25)
    assert "TPR 4.0 %, FPR 5.0 %, not detected (TPR not above FPR)" in flipped
    assert "50: 25.0 %; never below 20 %" in flipped
    assert "FPR 5.0 %, detected, but the FPR is above 2 %" in S.threshold_summary(
        *_threshold_tables(), rows=_rows(), paper_fpr=0.02)


# ------------------------------------------------------------------------------------------ 06
def _pruning(badnet_1e3=0.6, all_layers_auto=0.05):
    rows = []

    def add(attack, scope, asr, util, share, pruned):
        for tau, auto, a, u, s, p in zip((1e-3, 0.5, 1.0), (False, True, False), asr, util, share, pruned):
            rows.append({"attack": attack, "mask_scope": scope, "tau": tau, "is_auto": auto, "asr": a,
                         "poisoned_utility": u, "mean_pruned": p, "image_tokens": 64.0, "pruned_share": s,
                         "layer": 3, "detection_layers": "1,2,3", "tau_auto": 0.5, "n": 20, "n_val": 8})

    add("badnet", "reference", (badnet_1e3, 0.9, 1.0), (0.1, 0.0, 0.0), (0.8, 0.02, 0.0), (51.2, 1.3, 0.0))
    add("badnet", "all_layers", (0.0, all_layers_auto, 1.0), (0.2, 0.7, 0.0), (0.8, 0.02, 0.0), (51.2, 1.5, 0.0))
    add("sig", "reference", (0.0, 0.2, 1.0), (0.0, 0.5, 0.0), (1.0, 0.03, 0.0), (64.0, 1.9, 0.0))
    return S.pruning_threshold_summary(pd.DataFrame(rows))


def test_pruning_threshold_summary():
    text = _pruning()
    assert "20 triggered test inputs each" in text and "fitted on 8 clean calibration samples" in text
    assert "swept taus 1e-03, 1.00 plus the calibrated one" in text
    assert "does not reproduce with the defense's default mask scope: it holds for 1 of 2 attacks (SIG)" in text
    assert "**At tau = 1e-03** ASR is 0.60 (BadNet), 0.00 (SIG), with 80-100 % of the image tokens masked" in text
    assert "ASR reaches 0** for 1 of 2 attacks: SIG at tau <= 1e-03 (100 % of the image masked, poisoned utility 0.00)" in text
    assert "**The calibrated tau** (0.50, the stars) masks 2-3 % of the image tokens" in text
    assert "leaves ASR at 0.90 for BadNet; it at least halves the undefended ASR only for SIG (0.20)" in text
    assert ("(`all_layers`, BadNet) at the calibrated tau: ASR 0.05 (the defense's default mask scope: 0.90), poisoned "
            "utility 0.70, 1.5 image tokens masked per input; it removes most of the backdoor") in text
    assert "BadNet (ASR 0.60-0.90 at every tau; its l_e is layer 3)" in text
    flipped = _pruning(badnet_1e3=0.0, all_layers_auto=0.9)
    assert "reproduces with the defense's default mask scope: it holds for 2 of 2 attacks (BadNet, SIG)" in flipped
    assert "it does not remove the backdoor at that tau" in flipped and "Barely responding" not in flipped
    assert "ASR is 0.40 (BadNet)" in _pruning(badnet_1e3=0.4)


# ------------------------------------------------------------------------------------------ 07
def _lens(all_layers=(0.2, 0.3, 0.39, 0.48), first=2):
    curves = {"clean": ((0.2, 0.3, 0.4, 0.5), (0, 0, 0, 0.01)), "triggered": ((0.2, 0.25, 0.1, -0.3), (0, 0, 0.05, 0.6)),
              "reference": ((0.2, 0.25, 0.1, -0.3), (0, 0, 0.05, 0.6)), "all_layers": (all_layers, (0, 0, 0, 0.02))}
    rows = []
    for cond, (diff, target) in curves.items():
        for sample, pruned in ((0, 1), (1, 2)):
            for layer, (d, t) in enumerate(zip(diff, target)):
                rows.append({"attack": "badnet", "condition": cond, "sample": sample, "sample_id": f"s{sample}",
                             "layer": layer, "p_correct": d + t, "p_target": t, "diff": d,
                             "n_pruned": pruned if cond in ("reference", "all_layers") else 0, "pruning_layer": 3,
                             "mask_from_layer": {"reference": 3, "all_layers": 0}.get(cond, -1), "tau": 0.4, "n": 2})
    table = pd.DataFrame(rows)
    return S.logit_lens_summary(table, pd.DataFrame({"attack": ["badnet"], "first_divergent_layer": [first]}))


def test_logit_lens_summary():
    text = _lens()
    assert "2 test samples per attack, 4 layers" in text
    assert "falls below the clean curve from layer 2 on (0.10 vs 0.40, the middle third)" in text
    assert ("gains probability from layer 3 on (mean p(target) at layer 3: 0.60 vs 0.01 clean), so the trigger first "
            "suppresses the correct answer and writes the target later") in text
    assert "In line with the paper's \"after fusion\"" in text
    ref = text.split("`reference`")[1].split("\n")[0]
    assert ("(l_e = 3, tau 0.40, 1.5 image tokens pruned per input, masked from layer 3): last layer -0.30 vs clean "
            "0.50 and poisoned -0.30, so it leaves the poisoned value in place") in ref
    assert "the mask starts after the layer where the trigger acts (2)" in ref
    every = text.split("`all_layers`")[1]
    assert "last layer 0.48 vs clean 0.50" in every and "so it restores the clean value" in every
    flipped = _lens(all_layers=(0.2, 0.25, 0.2, 0.1), first=0)
    assert "Unlike the paper's \"after fusion\" (middle layers), the trigger acts in the early third for BadNet" in flipped
    assert "so it closes most of the gap" in flipped.split("`all_layers`")[1]


# ------------------------------------------------------------------------------------------ 09
def _heads(asr_l0h1=0.0, restored=(0.05, 0.1, 0.6, 0.2), clean=(0.3, 0.85, 0.8, 0.75)):
    ablation = pd.DataFrame([{"attack": "badnet", "layer": -1, "head": -1, "kind": "baseline", "asr": 1.0,
                              "clean_acc": 0.8, "n": 16}] +
                            [{"attack": "badnet", "layer": lay, "head": h, "kind": "ablate", "asr": a, "clean_acc": c,
                              "n": 16} for (lay, h), a, c in zip(((0, 0), (0, 1), (1, 0), (1, 1)),
                                                                 (1.0, asr_l0h1, 1.0, 1.0), clean)])
    patching = pd.DataFrame([{"attack": "badnet", "direction": "triggered->clean", "layer": lay, "head": h,
                              "logprob_unpatched": -10.0, "logprob_source": -2.0, "restored": r, "n": 16}
                             for (lay, h), r in zip(((0, 0), (0, 1), (1, 0), (1, 1)), restored)])
    return S.head_ablation_summary(ablation, patching)


def test_head_ablation_summary():
    text = _heads()
    assert "16 clean test samples" in text and "4 heads per model (2 layers x 2 heads)" in text
    assert "Without ablation ASR is 1.00 and clean accuracy 0.80" in text
    assert "Zero-ablating **L0H1** removes the backdoor (ASR 0.00) and leaves clean accuracy at 0.85" in text
    assert "Every other head leaves ASR at 1.00" in text
    assert "The task needs L0H0 and L1H1 most (clean accuracy 0.30 / 0.75 without them" in text
    assert "is -10.0 in the clean run and -2.0 in the triggered run" in text
    assert "Copying **L1H0**'s output from the triggered run carries over 0.60" in text
    assert "the next heads are L1H1 (0.20), L0H1 (0.10), L0H0 (0.05)" in text
    assert ("L0H1 is necessary for the backdoor (ablating it removes it) and L1H0 carries most of the effect alone "
            "(0.60); L0H1 sits in an earlier layer than L1H0") in text
    flipped = _heads(asr_l0h1=0.8, restored=(0.05, 0.1, 0.3, 0.2))
    assert "lowers ASR the most, to 0.80" in flipped and "no single head removes the backdoor" in flipped
    assert "No single head is necessary for the backdoor; L1H0 carries only part of the effect (0.30)" in flipped
    assert "carries over 0.45" in _heads(restored=(0.05, 0.1, 0.45, 0.2))
    none = _heads(asr_l0h1=1.0, clean=(0.8, 0.85, 0.9, 0.8))
    assert "No single head lowers ASR: every one leaves it at 1.00" in none
    assert "No single head lowers clean accuracy" in none and "Zero-ablating" not in none


# ------------------------------------------------------------------------------------------ notebooks
FINDINGS = {"01_pixel_vs_attention_perturbation": "perturbation_summary", "02_attention_stealing": "stealing_summary",
            "03_layerwise_detection": "layerwise_detection_summary",
            "04_detection_layer_sweep": "layer_window_summary",
            "05_threshold_and_validation_size": "threshold_summary", "06_pruning_threshold": "pruning_threshold_summary",
            "07_logit_lens": "logit_lens_summary", "08_defense_tables": "defense_tables_summary",
            "09_per_head_ablation": "head_ablation_summary"}


@pytest.mark.parametrize("stem", sorted(FINDINGS))
def test_notebook_findings_come_from_a_summary_function(stem):
    """The "What we see" Markdown is followed by a code cell that writes the findings from the tables."""
    cells = json.loads((ROOT / "notebooks" / f"{stem}.ipynb").read_text())["cells"]
    idx = [i for i, c in enumerate(cells) if c["cell_type"] == "markdown" and "".join(c["source"]).startswith("## What we see")]
    assert len(idx) == 1, "one findings section"
    after = cells[idx[0] + 1:]
    assert after and after[0]["cell_type"] == "code", "the findings Markdown is followed by its code cell"
    source = "".join(after[0]["source"])
    name = FINDINGS[stem]
    assert re.search(rf"Markdown\({name}\(", source) and callable(getattr(S, name))
    assert "In our run" not in "".join(cells[idx[0]]["source"]), "no hand-typed results in the findings prose"
