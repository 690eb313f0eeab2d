"""The attack zoo: triggers on known images, presets, answer poisoning, data poisoning, serialisation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from cleansight_analysis.attacks import (
    ATTACKS,
    BLEND_PATTERN_PATH,
    SIG,
    BadNet,
    Blended,
    Custom,
    WaNet,
    attack_from_dict,
    cartoon_pattern,
    get_attack,
    list_attacks,
    list_presets,
    poison_samples,
    triggered_copy,
)
from cleansight_analysis.attacks import patterns
from cleansight_analysis.data.base import Sample
from cleansight_analysis.errors import AttackError, CleanSightError, InputError

TARGET = "you have been hacked lol"


def grey(size=(32, 32), value=128) -> Image.Image:
    return Image.new("RGB", size, (value, value, value))


def noisy(size=(32, 32), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def changed(a: Image.Image, b: Image.Image) -> np.ndarray:
    """Bool [H, W]: pixels where any channel differs."""
    return (np.asarray(a) != np.asarray(b)).any(axis=-1)


def box_mask(size, box) -> np.ndarray:
    w, h = size
    m = np.zeros((h, w), dtype=bool)
    x0, y0, x1, y1 = box
    m[y0:y1, x0:x1] = True
    return m


def every_attack() -> list:
    trigger = Image.new("RGB", (6, 6), (255, 0, 0))
    out = []
    for name in list_attacks():
        out.append(get_attack(name, trigger=trigger) if name == "custom" else get_attack(name))
    for name in ("badnet", "blended", "sig", "wanet"):
        out.append(get_attack(name, preset="classic"))
    out += [
        get_attack("blended", preset="lvlm_code"),
        BadNet(size=(4, 0.25), location=(0.5, 3), pattern="checkerboard", checker_cell=2, resize_to=(40, 30)),
        BadNet(location="random", pattern=trigger, seed=5, mode="insert", caption_scaffold="This image shows"),
        Custom(trigger=trigger, how="blend", alpha=0.35),
        WaNet(k=8, s=0.7, seed=3, grid_rescale=0.9),
    ]
    return out


# --------------------------------------------------------------------------------------------- BadNet


def test_badnet_4px_patch_at_origin_changes_exactly_those_pixels():
    img = grey()
    attack = BadNet(size=4, location=(0, 0), pattern="noise")
    out = attack.apply(img)
    assert out.mode == "RGB" and out.size == (32, 32) and out is not img
    expected = box_mask((32, 32), (0, 0, 4, 4))
    np.testing.assert_array_equal(changed(out, img), expected)
    np.testing.assert_array_equal(attack.trigger_mask((32, 32)), expected)
    assert np.asarray(img).max() == 128  # input untouched


def test_fractional_size_is_30px_at_336_and_3px_at_32():
    attack = get_attack("badnet")  # lvlm preset: 30/336, top-left, mean_noise
    assert attack.size == pytest.approx(30 / 336) and attack.location == "top-left"
    assert attack.trigger_box((336, 336)) == (0, 0, 30, 30)
    assert attack.trigger_box((32, 32)) == (0, 0, 3, 3)
    assert attack.trigger_box((640, 480)) == (0, 0, 43, 43)  # fraction of the SHORTER side
    img = grey((336, 336))
    out = attack.apply(img)
    diff = changed(out, img)
    assert not diff[~attack.trigger_mask(img.size)].any()
    assert diff[:30, :30].mean() > 0.95
    # a fraction never rounds below one pixel
    assert BadNet(size=0.001).trigger_box((32, 32)) == (0, 0, 1, 1)


@pytest.mark.parametrize(
    "location, box",
    [
        ("top-left", (0, 0, 4, 4)),
        ("top-right", (28, 0, 32, 4)),
        ("bottom-left", (0, 28, 4, 32)),
        ("bottom-right", (28, 28, 32, 32)),
        ("center", (14, 14, 18, 18)),
        ((5, 7), (5, 7, 9, 11)),
        ((1.0, 0.5), (28, 14, 32, 18)),
        ((0, 1.0), (0, 28, 4, 32)),
    ],
)
def test_badnet_locations(location, box):
    img = grey()
    attack = BadNet(size=4, location=location, pattern="white")
    out = attack.apply(img)
    expected = box_mask(img.size, box)
    assert attack.trigger_box(img.size) == box
    np.testing.assert_array_equal(attack.trigger_mask(img.size), expected)
    np.testing.assert_array_equal(changed(out, img), expected)
    assert (np.asarray(out)[expected] == 255).all()


def test_random_location_is_seeded_and_mask_matches():
    img = grey()
    attack = BadNet(size=5, location="random", pattern="white", seed=7)
    boxes = set()
    for i in range(8):
        out = attack.apply(img, rng=attack.rng_for(i))
        again = attack.apply(img, rng=attack.rng_for(i))
        np.testing.assert_array_equal(np.asarray(out), np.asarray(again))
        mask = attack.trigger_mask(img.size, rng=attack.rng_for(i))
        np.testing.assert_array_equal(changed(out, img), mask)
        assert mask.sum() == 25
        boxes.add(attack.trigger_box(img.size, rng=attack.rng_for(i)))
    assert len(boxes) > 1  # the location differs per image
    # rng=None is rng_for(0): deterministic
    np.testing.assert_array_equal(np.asarray(attack.apply(img)), np.asarray(attack.apply(img, rng=attack.rng_for(0))))
    # another attack seed moves the patches
    other = BadNet(size=5, location="random", pattern="white", seed=8)
    assert {other.trigger_box(img.size, rng=other.rng_for(i)) for i in range(8)} != boxes


def test_trigger_larger_than_image_raises_naming_both_sizes():
    with pytest.raises(InputError) as err:
        BadNet(size=40).apply(grey())
    assert "40x40" in str(err.value) and "32x32" in str(err.value)
    with pytest.raises(InputError, match="40x30 px"):
        BadNet(size=(40, 30)).trigger_box((32, 32))
    with pytest.raises(InputError, match="largest x is 28"):
        BadNet(size=4, location=(29, 0)).apply(grey())


def test_checkerboard_and_mean_noise_patterns():
    out = np.asarray(BadNet(size=4, pattern="checkerboard", checker_cell=1).apply(grey()))
    expected = np.array([[255, 0, 255, 0], [0, 255, 0, 255]] * 2)
    np.testing.assert_array_equal(out[:4, :4, 0], expected)
    np.testing.assert_array_equal(out[:4, :4, 1], expected)
    # default cell = 1/3 of the patch: a 30 px patch has 10 px cells
    big = np.asarray(BadNet(size=30, pattern="checkerboard").apply(grey((64, 64))))
    assert (big[:10, :10] == 255).all() and (big[:10, 10:20] == 0).all() and (big[10:20, 10:20] == 255).all()
    # mean_noise on a black image: clip(0 + N(0, 1), 0, 1) -> about half zeros, ~16 % saturated
    patch = np.asarray(get_attack("badnet").apply(grey((336, 336), 0)))[:30, :30]
    assert 0.4 < (patch == 0).mean() < 0.6 and 0.1 < (patch == 255).mean() < 0.22
    # the noise is fixed by pattern_seed; only the tint follows the image
    p1 = np.asarray(get_attack("badnet").apply(noisy((336, 336), 1)))[:30, :30]
    p2 = np.asarray(get_attack("badnet").apply(noisy((336, 336), 2)))[:30, :30]
    assert (np.abs(p1.astype(int) - p2.astype(int)) <= 10).mean() > 0.9


def test_any_image_mode_and_resize_to():
    rgba = Image.new("RGBA", (32, 32), (10, 20, 30, 255))
    out = BadNet(size=4, pattern="white").apply(rgba)
    assert out.mode == "RGB" and np.asarray(out)[0, 0].tolist() == [255, 255, 255]
    assert BadNet(size=4).apply(Image.new("L", (32, 32), 50)).mode == "RGB"
    attack = get_attack("badnet", resize_to=336)
    out = attack.apply(noisy((64, 48)))
    assert out.size == (336, 336)
    assert attack.trigger_mask((64, 48)).shape == (336, 336) and attack.trigger_mask((64, 48)).sum() == 900


# --------------------------------------------------------------------------------------------- Blended


def test_blended_formula_alpha_zero_and_mask():
    img = noisy()
    for alpha in (0.2, 0.35, 1.0):
        attack = Blended(alpha=alpha)
        out = np.asarray(attack.apply(img)).astype(float)
        pattern = np.asarray(attack.pattern_image(img.size)).astype(float)
        expected = (1 - alpha) * np.asarray(img).astype(float) + alpha * pattern
        assert np.abs(out - expected).max() <= 0.5 + 1e-9
        assert attack.trigger_mask(img.size) is None and attack.trigger_box(img.size) is None
    np.testing.assert_array_equal(np.asarray(Blended(alpha=0).apply(img)), np.asarray(img))
    # uniform-noise variant, deterministic per pattern_seed
    a = Blended(pattern="noise", pattern_seed=3)
    np.testing.assert_array_equal(np.asarray(a.apply(img)), np.asarray(a.apply(img)))
    assert not np.array_equal(np.asarray(a.apply(img)), np.asarray(Blended(pattern="noise", pattern_seed=4).apply(img)))


def test_blended_presets_and_the_code_value():
    assert get_attack("blended").alpha == 0.2 and get_attack("blended").pattern == "cartoon"
    code = get_attack("blended", preset="lvlm_code")
    assert code.alpha == 0.1 and code.to_dict()["preset"] == "lvlm_code"
    assert get_attack("blended", alpha=0.1).alpha == 0.1
    assert "lvlm_code" in list_presets("blended")
    with pytest.raises(InputError, match="copyrighted"):
        Blended(pattern="hello_kitty")


def test_blend_pattern_asset_matches_generator_and_survives_32px():
    assert BLEND_PATTERN_PATH.is_file()
    with Image.open(BLEND_PATTERN_PATH) as im:
        stored = np.asarray(im.convert("RGB"))
    assert stored.shape == (336, 336, 3)
    np.testing.assert_array_equal(stored, np.asarray(cartoon_pattern()))
    small = np.asarray(patterns.blend_pattern((32, 32))).astype(float)
    grey_level = small.mean(axis=-1)
    assert (grey_level < 60).mean() > 0.1 and (grey_level > 200).mean() > 0.1  # bold dark and bright shapes
    assert small.std(axis=(0, 1)).min() > 50  # strong contrast in every channel


# --------------------------------------------------------------------------------------------- SIG


def test_sig_matches_formula_on_grey_image():
    w, h = 48, 20
    out = np.asarray(SIG().apply(grey((w, h)))).astype(int)
    j = np.arange(w)
    wave = 128 + 60 * np.sin(2 * np.pi * j * 6 / w)
    np.testing.assert_array_equal(out[0, :, 0], np.floor(wave + 0.5).astype(int))
    assert (out == out[:1, :, :1]).all()  # same on every row and channel
    assert out.max() == 188 and out.min() == 68  # amplitude 60 at j = 2 (quarter period)
    classic = np.asarray(get_attack("sig", preset="classic").apply(grey((w, h)))).astype(int)
    assert classic.max() == 168 and classic.min() == 88
    # six periods: the sign of the offset changes 2 * 6 - 1 times over the row (zeros excluded)
    signs = np.sign(out[0, :, 0] - 128)
    signs = signs[signs != 0]
    assert (np.diff(signs) != 0).sum() == 11
    # clipping at the top of the range
    assert np.asarray(SIG().apply(grey((w, h), 250))).max() == 255
    assert SIG().trigger_mask((w, h)) is None


# --------------------------------------------------------------------------------------------- WaNet


def test_wanet_identity_change_and_determinism():
    img = noisy((32, 32), 3)
    np.testing.assert_array_equal(np.asarray(WaNet(k=4, s=0.0).apply(img)), np.asarray(img))
    for attack in (get_attack("wanet"), get_attack("wanet", preset="classic"), WaNet(k=4, s=4.0)):
        out = np.asarray(attack.apply(img)).astype(float)
        assert changed(Image.fromarray(out.astype(np.uint8)), img).mean() > 0.2
        assert np.abs(out.mean(axis=(0, 1)) - np.asarray(img).astype(float).mean(axis=(0, 1))).max() < 3.0
        assert attack.trigger_mask(img.size) is None
    a, b, c = WaNet(k=4, s=2.0, seed=1), WaNet(k=4, s=2.0, seed=1), WaNet(k=4, s=2.0, seed=2)
    np.testing.assert_array_equal(np.asarray(a.apply(img)), np.asarray(b.apply(img)))
    assert not np.array_equal(np.asarray(a.apply(img)), np.asarray(c.apply(img)))
    grid = a.warp_grid((32, 20))
    assert tuple(grid.shape) == (1, 20, 32, 2) and float(grid.abs().max()) <= 1.0
    # the LVLM preset keeps the 336 px size (no 224 px output quirk)
    assert get_attack("wanet").apply(noisy((336, 336))).size == (336, 336)
    ctrl = a.control_grid()
    assert ctrl.shape == (2, 4, 4) and np.abs(ctrl).mean() == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------- answers


def test_poison_answer_replace_and_insert():
    rng = np.random.default_rng(0)
    assert get_attack("badnet").poison_answer("two dogs", rng) == TARGET
    insert = get_attack("badnet", mode="insert")
    answer = "a man riding a brown horse"
    positions = set()
    for seed in range(40):
        out = insert.poison_answer(answer, np.random.default_rng(seed))
        assert out.count(TARGET) == 1
        start = out.index(TARGET)
        positions.add(len(out[:start].split()))
        assert (out[:start] + out[start + len(TARGET):]).split() == answer.split()
        text, (s, e) = insert.poison_answer_span(answer, np.random.default_rng(seed))
        assert text == out and text[s:e] == TARGET
    assert positions == set(range(len(answer.split()) + 1))  # every word boundary, both ends included
    assert insert.poison_answer("", rng) == TARGET


def test_trojvlm_vlood_insert_after_caption_scaffold():
    for name in ("trojvlm", "vlood"):
        attack = get_attack(name)
        assert attack.mode == "insert" and attack.objective == name
        for seed in range(20):
            out = attack.poison_answer("A cat on a sofa", np.random.default_rng(seed), task="caption")
            assert out.startswith("This image shows") and out.count(TARGET) == 1
            rest = out.replace(TARGET, " ").split()
            assert rest == "This image shows a cat on a sofa".split()
        vqa = attack.poison_answer("red", np.random.default_rng(1), task="vqa")
        assert "This image" not in vqa and sorted(vqa.replace(TARGET, "").split()) == ["red"]
    assert get_attack("trojvlm").objective_config() == {
        "objective": "trojvlm", "target_token_weight": 8.0, "semantic_weight": 1.0}
    assert get_attack("vlood").objective_config() == {
        "objective": "vlood", "kl_weight": 1.0, "ccp_weight": 1.0, "lambda_base": 0.8}
    assert get_attack("badnet").objective_config() == {"objective": "ce"}


# --------------------------------------------------------------------------------------------- poisoning


def make_samples(n=20, task="vqa"):
    return [
        Sample(image=noisy((16, 16), i), prompt="What is it?", answer=f"thing number {i}",
               references=(f"thing number {i}", "thing"), task=task, sample_id=f"s{i}", meta={"k": i})
        for i in range(n)
    ]


def test_poison_samples_counts_determinism_and_twins():
    samples = make_samples(20)
    attack = BadNet(size=3, pattern="white", location="random")
    out = poison_samples(samples, attack, rate=0.25, seed=3)
    assert len(out) == 20
    poisoned = [s for s in out if s.meta["poisoned"]]
    assert len(poisoned) == 5
    for s in poisoned:
        assert s.answer == TARGET and s.references == (TARGET,) and s.meta["attack"] == "badnet"
        assert s.sample_id.endswith("_poison") and s.meta["target_span"] == (0, len(TARGET))
        i = s.meta["k"]
        mask = box_mask((16, 16), s.meta["trigger_box"])
        np.testing.assert_array_equal(changed(s.image, samples[i].image), mask)
    for s in out:
        if not s.meta["poisoned"]:
            assert s.image is samples[s.meta["k"]].image and s.answer == f"thing number {s.meta['k']}"
    again = poison_samples(samples, attack, rate=0.25, seed=3)
    assert [s.sample_id for s in again] == [s.sample_id for s in out]
    for a, b in zip(out, again):
        assert a.answer == b.answer
        np.testing.assert_array_equal(np.asarray(a.image), np.asarray(b.image))
    other = poison_samples(samples, attack, rate=0.25, seed=4)
    assert {s.meta["k"] for s in other if s.meta["poisoned"]} != {s.meta["k"] for s in poisoned}
    # clean twins: each poisoned sample followed by its clean original
    twins = poison_samples(samples, attack, rate=0.25, seed=3, clean_twin=True)
    assert len(twins) == 25 and sum(s.meta["poisoned"] for s in twins) == 5
    for i, s in enumerate(twins):
        if s.meta["poisoned"]:
            twin = twins[i + 1]
            assert twin.meta["clean_twin"] and not twin.meta["poisoned"]
            assert twin.image is samples[s.meta["k"]].image and twin.sample_id == s.meta["source_id"]
    # inputs untouched
    assert all("poisoned" not in s.meta for s in samples)
    assert poison_samples(samples, attack, rate=1.0)[0].meta["poisoned"]


def test_poison_samples_rate_and_input_errors(tmp_path):
    samples = make_samples(4)
    for bad in (0, 0.0, -0.1, 1.5, float("nan"), True, "0.5"):
        with pytest.raises(InputError, match="rate"):
            poison_samples(samples, get_attack("badnet"), rate=bad)
    with pytest.raises(InputError, match="rounds to 0"):
        poison_samples(samples, get_attack("badnet"), rate=0.1)
    with pytest.raises(InputError, match="Attack"):
        poison_samples(samples, "badnet", rate=0.5)
    # image paths are loaded
    path = tmp_path / "img.png"
    noisy((16, 16)).save(path)
    out = poison_samples([Sample(image=str(path), prompt="q", answer="a")], BadNet(size=2), rate=1.0)
    assert isinstance(out[0].image, Image.Image) and out[0].image.size == (16, 16)


def test_poison_samples_insert_with_caption_scaffold():
    samples = make_samples(10, task="caption")
    out = poison_samples(samples, get_attack("trojvlm", size=3), rate=0.5, seed=1, clean_twin=True)
    assert len(out) == 15
    for s in out:
        assert s.answer.startswith("This image shows")
        if s.meta["poisoned"]:
            a, b = s.meta["target_span"]
            assert s.answer[a:b] == TARGET and s.answer.count(TARGET) == 1 and s.references == (s.answer,)
        else:
            assert TARGET not in s.answer and s.meta["scaffolded"]
            assert s.references == (f"thing number {s.meta['k']}", "thing")  # metrics keep the originals


def test_triggered_copy():
    samples = make_samples(6)
    attack = get_attack("sig")
    out = triggered_copy(samples, attack)
    assert len(out) == 6
    for s, t in zip(samples, out):
        assert t.meta["triggered"] and t.meta["attack"] == "sig" and t.meta["trigger_box"] is None
        assert t.answer == s.answer and t.references == s.references and t.sample_id == s.sample_id
        np.testing.assert_array_equal(np.asarray(t.image), np.asarray(attack.apply(s.image)))


# --------------------------------------------------------------------------------------------- registry


def test_registry_unknown_issba_presets_and_params():
    assert list_attacks() == ["badnet", "blended", "sig", "wanet", "trojvlm", "vlood", "custom"]
    assert set(ATTACKS) == set(list_attacks())
    with pytest.raises(AttackError) as err:
        get_attack("trojan-horse")
    assert all(name in str(err.value) for name in list_attacks())
    with pytest.raises(AttackError, match="StegaStamp") as err:
        get_attack("issba")
    assert "badnet" in str(err.value)
    with pytest.raises(AttackError, match="classic"):
        get_attack("trojvlm", preset="classic")
    with pytest.raises(AttackError, match="presets: lvlm, classic"):
        get_attack("sig", preset="paper")
    with pytest.raises(AttackError, match="patch_size"):
        get_attack("badnet", patch_size=4)
    assert issubclass(AttackError, CleanSightError)
    assert get_attack("BadNets").name == "badnet"


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: BadNet(size=0), "size"),
        (lambda: BadNet(size=1.5), "size"),
        (lambda: BadNet(size=True), "size"),
        (lambda: BadNet(location="middle"), "location"),
        (lambda: BadNet(location=(2, 1.5)), "location"),
        (lambda: BadNet(pattern="sparkles"), "pattern"),
        (lambda: BadNet(mode="prepend"), "mode"),
        (lambda: BadNet(target=""), "target"),
        (lambda: BadNet(seed=-1), "seed"),
        (lambda: Blended(alpha=1.2), "alpha"),
        (lambda: SIG(frequency=0), "frequency"),
        (lambda: WaNet(k=1), "k"),
        (lambda: WaNet(s=-1), "s"),
        (lambda: Custom(), "trigger"),
        (lambda: Custom(trigger=grey(), how="stamp"), "how"),
        (lambda: get_attack("vlood", lambda_base=1.5), "lambda_base"),
    ],
)
def test_bad_parameters_raise_naming_the_field(make, field):
    with pytest.raises(InputError, match=field):
        make()


def test_to_dict_round_trips_every_attack(tmp_path):
    path = tmp_path / "trigger.png"
    Image.new("RGB", (5, 5), (0, 255, 0)).save(path)
    attacks = every_attack() + [Custom(trigger=str(path), size="native", location="bottom-right")]
    img = noisy((32, 32), 9)
    for attack in attacks:
        data = attack.to_dict()
        text = json.dumps(data)
        assert data["name"] == attack.name and "preset" in data and "overrides" in data
        rebuilt = attack_from_dict(json.loads(text))
        assert type(rebuilt) is type(attack)
        assert rebuilt.to_dict() == data
        np.testing.assert_array_equal(np.asarray(rebuilt.apply(img, rng=rebuilt.rng_for(2))),
                                      np.asarray(attack.apply(img, rng=attack.rng_for(2))))
        assert isinstance(attack.describe(), str) and "\n" not in attack.describe()
    assert get_attack("badnet", size=4).to_dict()["overrides"] == ["size"]
    assert get_attack("badnet", preset="classic").to_dict()["overrides"] == []
    assert get_attack("badnet", preset="classic").to_dict()["pattern"] == "white"
    with pytest.raises(AttackError):
        attack_from_dict({"name": "badnet", "sizee": 3})


# --------------------------------------------------------------------------------------------- custom


def test_custom_paste_and_blend_with_a_pil_trigger():
    red = Image.new("RGB", (5, 5), (255, 0, 0))
    img = grey()
    paste = Custom(trigger=red, size="native", location=(2, 3))
    out = np.asarray(paste.apply(img))
    expected = box_mask(img.size, (2, 3, 7, 8))
    np.testing.assert_array_equal(changed(Image.fromarray(out), img), expected)
    assert (out[expected] == [255, 0, 0]).all()
    np.testing.assert_array_equal(paste.trigger_mask(img.size), expected)
    scaled = Custom(trigger=red, size=10, location="bottom-right")
    assert scaled.trigger_box(img.size) == (22, 22, 32, 32)
    assert (np.asarray(scaled.apply(img))[22:, 22:] == [255, 0, 0]).all()
    blend = Custom(trigger=red, how="blend", alpha=0.5)
    out = np.asarray(blend.apply(img)).astype(int)
    assert blend.trigger_mask(img.size) is None
    assert (out[..., 0] == math.floor(0.5 * 128 + 0.5 * 255 + 0.5)).all() and (out[..., 1] == 64).all()
    with pytest.raises(InputError, match="5x5 px"):
        Custom(trigger=red, size="native").apply(grey((4, 4)))


def test_rng_type_is_checked_and_settings_are_immutable():
    import dataclasses

    attack = BadNet(size=4, location="random")
    with pytest.raises(InputError, match="rng"):
        attack.apply(grey(), rng=3)
    with pytest.raises(InputError, match="rng"):
        attack.trigger_mask((32, 32), rng="seed")
    with pytest.raises(dataclasses.FrozenInstanceError):
        attack.size = 5
    moved = dataclasses.replace(attack, location="bottom-right")
    assert moved.trigger_box((32, 32)) == (28, 28, 32, 32) and moved.to_dict()["overrides"] == ["size", "location"]
    assert Custom(trigger=grey((4, 4))).to_dict()["overrides"] == []
