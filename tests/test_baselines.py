"""Baseline defenses (pixel purifiers, STRIP, attention entropy, SCALE-UP) and CIDEr.

Mechanics run on the tiny random LLaVA; one behavioural check and a TPR / FPR report use the shipped
``tiny-llava/badnet`` with synthetic scenes.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import noise_image
from cleansight_analysis.data.base import Sample
from cleansight_analysis.defenses import get_defense
from cleansight_analysis.defenses.baselines import (AttentionEntropyDetector, Purifier, ScaleUpDetector,
                                                    StripDetector, amplify, entropy, superimpose)
from cleansight_analysis.errors import CleanSightError, InputError
from cleansight_analysis.interventions import get_perturbation
from tolerances import F32_FORWARD_RTOL

PROMPTS = ["what is in the picture?", "describe the image", "which colour dominates?", "is there a cat?"]


def clean_samples(n: int, offset: int = 100) -> list[Sample]:
    sizes = [(64, 64), (48, 80), (90, 40)]
    return [Sample(image=noise_image(offset + i, sizes[i % 3]), prompt=PROMPTS[i % len(PROMPTS)], answer="x")
            for i in range(n)]


@pytest.fixture()
def batch(llava):
    return llava.prepare([noise_image(0), noise_image(1, (48, 80)), noise_image(2, (90, 40))], PROMPTS[:3])


# ---------------------------------------------------------------------------------------------- purifiers
@pytest.mark.parametrize("kind", ["blur", "st", "shrinkpad", "jpeg"])
def test_purifier_transforms_images(llava, kind):
    images = [noise_image(0), noise_image(1, (48, 80))]
    plain = llava.prepare(images, PROMPTS[:2])
    pur = get_defense(kind)
    assert isinstance(pur, Purifier) and pur.kind == "purifier" and pur.name == kind and pur.intensity == 0.7
    got = pur.prepare(llava, images, PROMPTS[:2])
    ref = get_perturbation(kind, 0.7, seed=0)
    want = llava.prepare([ref.apply_image(im) for im in images], PROMPTS[:2])
    assert torch.equal(got.pixel_values, want.pixel_values)
    assert torch.equal(got.input_ids, plain.input_ids)
    assert not torch.allclose(got.pixel_values, plain.pixel_values)
    identity = Purifier(kind, intensity=0.0).prepare(llava, images, PROMPTS[:2])
    assert torch.equal(identity.pixel_values, plain.pixel_values)


def test_purifier_bad_settings():
    with pytest.raises(InputError, match="kind"):
        Purifier("sharpen")
    with pytest.raises(InputError, match="intensity"):
        Purifier("blur", intensity=1.5)
    with pytest.raises(CleanSightError, match="no setting"):
        Purifier("jpeg", radius=3)
    assert Purifier("jpeg", min_quality=10).perturbation.min_quality == 10


# ---------------------------------------------------------------------------------------------- registry / settings
@pytest.mark.parametrize("name, cls", [("strip", StripDetector), ("attention_entropy", AttentionEntropyDetector),
                                       ("scale_up", ScaleUpDetector)])
def test_registry_builds_detectors(name, cls):
    det = get_defense(name, quantile=0.9, then="purify", purifier="blur")
    assert type(det) is cls and det.kind == "detector" and det.name == name
    assert det.quantile == 0.9 and det.then == "purify" and det.purifier.name == "blur"
    assert det.to_dict()["name"] == name and det.threshold is None


@pytest.mark.parametrize("name, settings, match", [
    ("strip", {"quantile": 1.0}, "quantile"),
    ("strip", {"n_overlays": 0}, "n_overlays"),
    ("strip", {"alpha": 1.0}, "alpha"),
    ("attention_entropy", {"then": "drop"}, "then"),
    ("attention_entropy", {"head_reduce": "max"}, "head_reduce"),
    ("attention_entropy", {"layers": "middle"}, "layers"),
    ("scale_up", {"scales": []}, "scales"),
    ("scale_up", {"scales": [2, -1]}, "scale"),
    ("scale_up", {"min_samples": 1}, "min_samples"),
    ("scale_up", {"purifier": "sharpen"}, "kind"),
])
def test_bad_detector_settings(name, settings, match):
    with pytest.raises(InputError, match=match):
        get_defense(name, **settings)


def test_calibration_errors(llava, batch):
    det = get_defense("attention_entropy")
    with pytest.raises(InputError, match="not calibrated"):
        det.detect(llava, batch)
    with pytest.raises(InputError, match="not calibrated"):
        det.generate(llava, batch)
    with pytest.raises(InputError, match="min_samples=10"):
        det.fit(llava, clean_samples(9))
    with pytest.raises(InputError, match="not a Sample"):
        det.fit(llava, [noise_image(0)] * 12)
    strip = get_defense("strip", n_overlays=3, min_samples=2)
    with pytest.raises(InputError, match="n_overlays=3"):
        strip.fit(llava, clean_samples(3))
    with pytest.raises(InputError, match="1 clean sample"):
        strip.fit(llava, clean_samples(4))
    strip.fit(llava, clean_samples(5))  # 3 overlays + 2 calibration samples is enough
    assert strip.clean_scores.shape == (2,) and len(strip.overlays) == 3


def test_threshold_is_quantile_of_clean_scores(llava):
    samples = clean_samples(12)
    for q in (0.5, 0.9):
        det = get_defense("attention_entropy", quantile=q, batch_size=5).fit(llava, samples)
        whole = llava.prepare([s.image for s in samples], [s.prompt for s in samples])
        scores = det.score(llava, whole)
        assert scores.shape == (12,)
        # chunks of 5 + 5 + 2 pad differently from one batch of 12: float32 noise only
        torch.testing.assert_close(det.clean_scores, scores, atol=0, rtol=F32_FORWARD_RTOL)  # two forwards apart
        want = float(np.quantile(det.clean_scores.numpy(), q))
        assert det.threshold == pytest.approx(want, abs=1e-12)
        flags = det.detect(llava, whole)
        assert torch.equal(flags, scores > want)
    assert int(flags.sum()) == 2  # q = 0.9 of 12 scores: position 9.9 of 0..11, so the top two lie above


# ---------------------------------------------------------------------------------------------- attention entropy
def _force_image_attention(batch, make_row):
    """A hook_pattern edit: the last prompt token's attention becomes ``make_row(sample, n_heads)``."""

    def edit(pattern, hook):
        out = pattern.clone()
        for i, g in enumerate(batch.groups):
            out[i, :, g.query, :] = 0.0
            out[i, :, g.query, g.image] = make_row(i, out.shape[1]).to(out.dtype)
        return out

    return edit


def test_attention_entropy_one_hot_and_uniform(llava, batch):
    det = AttentionEntropyDetector()
    n_img = [g.image.numel() for g in batch.groups]

    def one_hot(i, h):
        row = torch.zeros(h, n_img[i])
        row[:, 5] = 1.0
        return row

    with llava.hooks(llava.lm_hooks("pattern", _force_image_attention(batch, one_hot))):
        assert torch.equal(det.score(llava, batch).abs(), torch.zeros(3, dtype=torch.float64))
    # unnormalised uniform mass (0.3 over the image) is renormalised within the image tokens
    uniform = _force_image_attention(batch, lambda i, h: torch.full((h, n_img[i]), 0.3 / n_img[i]))
    with llava.hooks(llava.lm_hooks("pattern", uniform)):
        torch.testing.assert_close(det.score(llava, batch), -torch.tensor([math.log(n) for n in n_img],
                                                                          dtype=torch.float64))
    plain = det.score(llava, batch)  # hooks are gone again: a real model is neither extreme
    assert bool(((plain < -1e-3) & (plain > -torch.tensor(n_img).log().double() + 1e-3)).all())


def test_attention_entropy_head_reduce_and_layers(llava, batch):
    def per_head_one_hot(i, h):  # head k attends only to image token k
        return torch.eye(h, batch.groups[i].image.numel())

    hooks = llava.lm_hooks("pattern", _force_image_attention(batch, per_head_one_hot), layers=[1, 2])
    with llava.hooks(hooks):
        mixed = AttentionEntropyDetector(layers=[1, 2], head_reduce="attention").score(llava, batch)
        per_head = AttentionEntropyDetector(layers=[1, 2], head_reduce="entropy").score(llava, batch)
        other = AttentionEntropyDetector(layers=[0, 3]).image_entropies(llava, batch)
    torch.testing.assert_close(mixed, torch.full((3,), -math.log(llava.n_heads), dtype=torch.float64))
    assert torch.equal(per_head.abs(), torch.zeros(3, dtype=torch.float64))
    assert other.shape == (3, 2) and bool((other > 0.1).all())  # unedited layers


# ---------------------------------------------------------------------------------------------- STRIP
def test_entropy_and_blend_math():
    logits = torch.log(torch.tensor([[1.0, 1.0, 2.0], [5.0, 5.0, 5.0]]))
    torch.testing.assert_close(entropy(logits), torch.tensor([1.5 * math.log(2), math.log(3)], dtype=torch.float64))
    x = np.zeros((4, 6, 3), np.uint8)
    x[0, 0] = [200, 11, 255]
    c = np.full((4, 6, 3), 100, np.uint8)
    out = np.asarray(superimpose(x, c, 0.5))
    assert out.shape == (4, 6, 3) and out[0, 0].tolist() == [150, 56, 178] and out[1, 1].tolist() == [50, 50, 50]
    assert np.array_equal(np.asarray(superimpose(x, Image.new("RGB", (9, 2), (7, 7, 7)), 0.0)), np.full_like(x, 7))
    assert np.array_equal(np.asarray(amplify(x, 2)), np.clip(x.astype(int) * 2, 0, 255))


def test_strip_score_matches_hand_computation(llava, batch):
    overlays = [noise_image(50), noise_image(51)]  # processor size (64 x 64): no resize involved
    det = StripDetector(alpha=0.6).set_overlays(overlays)
    assert det.n_overlays == 2
    got = det.score(llava, batch)
    seen = [np.asarray(llava.processed_image(batch, i), dtype=np.float64) for i in range(3)]
    want = []
    for i, x in enumerate(seen):
        ents = []
        for c in overlays:
            blend = np.clip(np.rint(0.6 * x + 0.4 * np.asarray(c, dtype=np.float64)), 0, 255).astype(np.uint8)
            one = llava.prepare([Image.fromarray(blend)], [batch.prompts[i]])
            p = torch.softmax(llava.forward(one)[0, -1].double(), -1)
            ents.append(float(-(p * p.log()).sum()))
        want.append(-sum(ents) / len(ents))
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------- SCALE-UP
def test_scale_up_consistency_on_constructed_logits(llava, batch):
    det = ScaleUpDetector(scales=(2, 3, 4, 5))
    base = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    scaled = torch.zeros(3, 4, 3)
    scaled[0, :, 1] = 5.0                     # always keeps token 1 -> 1.0
    scaled[1, :2, 0] = 5.0                    # keeps token 0 at two of four scales -> 0.5
    scaled[1, 2:, 2] = 5.0
    scaled[2, :, 0] = 5.0                     # never keeps token 2 -> 0.0
    det.scaled_logits = lambda model, b: (base, scaled)
    torch.testing.assert_close(det.score(llava, batch), torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64))
    det.score_mode = "probability"
    p = torch.softmax(scaled.double(), -1)
    want = torch.stack([p[0, :, 1].mean(), p[1, :, 0].mean(), p[2, :, 2].mean()])
    torch.testing.assert_close(det.score(llava, batch), want)


def test_scale_up_identity_scale_is_fully_consistent(llava, batch):
    det = ScaleUpDetector(scales=(1, 1.0))
    base, scaled = det.scaled_logits(llava, batch)
    assert base.shape == (3, scaled.shape[-1]) and scaled.shape[:2] == (3, 2)
    torch.testing.assert_close(scaled[:, 0], base, atol=1e-4, rtol=0)
    assert torch.equal(det.score(llava, batch), torch.ones(3, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------- then="purify"
def test_then_purify_changes_only_flagged(llava, batch):
    det = get_defense("attention_entropy", then="purify", purifier="shrinkpad", purifier_intensity=1.0)
    det.fit(llava, clean_samples(10))
    scores = det.score(llava, batch)
    det.threshold = float(scores.median())  # flag exactly the top-scoring sample
    out = det.generate(llava, batch, max_new_tokens=4)
    plain = llava.generate(batch, max_new_tokens=4).texts
    flagged = torch.nonzero(out.flags).flatten().tolist()
    assert len(flagged) == 1 and out.info["purified"] == flagged
    assert torch.equal(out.scores, scores)
    purified = llava.generate(det.purifier.purify_batch(llava, batch, flagged), max_new_tokens=4).texts
    for i in range(3):
        assert out.texts[i] == (purified[flagged.index(i)] if i in flagged else plain[i])
    # then="none": the model's answers unchanged, flags still reported
    det.then = "none"
    out2 = det.generate(llava, batch, max_new_tokens=4)
    assert out2.texts == plain and torch.equal(out2.flags, out.flags) and "purified" not in out2.info


# ---------------------------------------------------------------------------------------------- CIDEr
def test_cider_hand_cases():
    pytest.importorskip("pycocoevalcap")
    from cleansight_analysis.evaluation.captions import cider

    # 2 images, disjoint n-grams: every IDF is log 2; cosine 1 for unigrams and bigrams, 0 (no n-grams) for
    # 3- and 4-grams; equal lengths -> CIDEr-D = 10 * (1 + 1 + 0 + 0) / 4 = 5
    exact = cider(["A b.", "c d"], [["a b"], ["C, d"]])
    assert exact.score == pytest.approx(5.0) and exact.per_sample.tolist() == pytest.approx([5.0, 5.0])
    # "a c" vs "a b": unigram cosine 1/2, bigram 0 -> 10 * 0.5 / 4 = 1.25
    partial = cider(["a c", "c d"], [["a b"], ["c d"]])
    assert partial.per_sample.tolist() == pytest.approx([1.25, 5.0]) and partial.score == pytest.approx(3.125)
    assert cider(["a b"], [["a b"]]).score == 0.0  # one image: every IDF is log(1/1) = 0
    with pytest.raises(InputError, match="2 predictions but 1"):
        cider(["a", "b"], [["a"]])
    with pytest.raises(InputError, match=r"references\[0\]"):
        cider(["a"], [[]])


# ---------------------------------------------------------------------------------------------- backdoored model
def _auroc(neg: torch.Tensor, pos: torch.Tensor) -> float:
    """P(score of a triggered input > score of a clean one), ties counted half."""
    diff = pos.double()[:, None] - neg.double()[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


@pytest.fixture(scope="module")
def badnet():
    import cleansight_analysis as cs
    from cleansight_analysis.attacks import attack_from_dict, triggered_copy
    from cleansight_analysis.models.registry import lookup
    from cleansight_analysis.training.recipe import TinyRecipe

    model = cs.load_lvlm("tiny-llava/badnet")
    world = TinyRecipe().world()
    calib, test = world.samples("calibration", 48), world.samples("test", 24)
    attack = attack_from_dict(lookup("tiny-llava/badnet").card["attack"])
    return model, calib, test, triggered_copy(test, attack)


def test_badnet_detectors_report(badnet, capsys):
    model, calib, test, trig = badnet
    clean_b = model.prepare([s.image for s in test], [s.prompt for s in test])
    trig_b = model.prepare([s.image for s in trig], [s.prompt for s in trig])
    lines = []
    for name, settings in [("attention_entropy", {}), ("strip", {"n_overlays": 4}), ("scale_up", {})]:
        det = get_defense(name, batch_size=64, **settings).fit(model, calib)
        # linear-interpolation quantile at position q (n - 1): at most (n - 1)(1 - q) + 1 clean scores above it
        n_fit = det.clean_scores.numel()
        assert int((det.clean_scores > det.threshold).sum()) <= (n_fit - 1) * (1 - det.quantile) + 1
        s_clean, s_trig = det.score(model, clean_b), det.score(model, trig_b)
        lines.append(f"{name}{settings or ''}: TPR {float((s_trig > det.threshold).double().mean()):.3f} "
                     f"FPR {float((s_clean > det.threshold).double().mean()):.3f} "
                     f"AUROC {_auroc(s_clean, s_trig):.3f} "
                     f"mean score clean {float(s_clean.mean()):.3f} triggered {float(s_trig.mean()):.3f}")
        if name == "attention_entropy":
            # behaviour the method relies on: the patch trigger concentrates the answer query's image attention
            assert float(s_trig.mean()) > float(s_clean.mean())
            # then="purify" on real flags: only flagged triggered inputs get a new answer
            det.then = "purify"
            out = det.generate(model, trig_b, max_new_tokens=6)
            plain = model.generate(trig_b, max_new_tokens=6).texts
            assert all(out.texts[i] == plain[i] for i in range(len(trig)) if not out.flags[i])
            assert out.info["purified"] == torch.nonzero(out.flags).flatten().tolist()
    with capsys.disabled():
        print(f"\n[baselines on tiny-llava/badnet: {len(calib)} calibration, {len(test)} clean + "
                  f"{len(trig)} triggered test scenes]")
        for line in lines:
            print("  " + line)
