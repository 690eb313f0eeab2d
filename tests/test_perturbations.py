"""Perturbations: pixel kinds, the attention-flattening edit (prefill, padding, decode, head scope), sweeps."""

from __future__ import annotations

import math
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from cleansight_analysis.attacks import get_attack, triggered_copy
from cleansight_analysis.data.base import Sample
from cleansight_analysis.errors import InputError, LayerIndexError
from cleansight_analysis.evaluation import generate_answers, normalize_text
from cleansight_analysis.interventions.perturbations import (
    PERTURBATION_KINDS,
    PIXEL_KINDS,
    AttentionUniform,
    Noise,
    get_perturbation,
    interpolate_image_attention,
)
from cleansight_analysis.evaluation.intervention_sweeps import SWEEP_COLUMNS, perturbation_sweep
from conftest import noise_image
from tolerances import F32_SUM_ATOL

#: the interpolation rewrites probabilities of one float32 tensor: sums over <= ~600 keys, one reduction apart
ATOL = F32_SUM_ATOL


def structured_image(size=(128, 96)) -> Image.Image:
    """Smooth, bright, left-right symmetric picture (values 170..255, far from the grey fill of 127).

    A mirror leaves it unchanged, while shrinking, rotating (grey corners), blurring, compressing and
    noise all move it away from itself more the stronger they are.
    """
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    dx = np.abs(x - (w - 1) / 2)
    arr = np.stack([y / h, dx / (w / 2), 0.5 + 0.5 * np.sin(y / 4) * np.cos(dx / 6)], -1)
    return Image.fromarray((170 + 85 * np.clip(arr, 0, 1)).astype(np.uint8), "RGB")


def mad(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean())


# ------------------------------------------------------------------------------------------ pixel kinds
@pytest.mark.parametrize("kind", PIXEL_KINDS)
def test_pixel_kinds_identity_size_determinism_monotone(kind):
    img = structured_image()
    grey = img.convert("L")  # any mode in, RGB out
    assert get_perturbation(kind, 0.0).apply_image(img).tobytes() == img.tobytes()
    out = get_perturbation(kind, 0.6, seed=3).apply_image(grey)
    assert out.mode == "RGB" and out.size == img.size
    a = get_perturbation(kind, 0.6, seed=3).apply_image(img)
    b = get_perturbation(kind, 0.6, seed=3).apply_image(img)
    assert a.tobytes() == b.tobytes() and a.size == img.size and a.mode == "RGB"
    distortion = [mad(img, get_perturbation(kind, t, seed=3).apply_image(img)) for t in (0.25, 0.5, 1.0)]
    assert 0 < distortion[0] < distortion[1] < distortion[2], distortion


@pytest.mark.parametrize("kind", ["st", "noise"])
def test_random_kinds_depend_on_seed_and_image(kind):
    img = structured_image()
    a = get_perturbation(kind, 0.8, seed=0).apply_image(img)
    assert a.tobytes() != get_perturbation(kind, 0.8, seed=1).apply_image(img).tobytes()
    # per-image draws: the same setting transforms two images differently, unless per_image=False
    draws = [get_perturbation("st", 1.0, seed=0).draw(get_perturbation("st", 1.0, seed=0).rng_for(im))
             for im in (img, noise_image(0, img.size))]
    assert draws[0] != draws[1]
    fixed = get_perturbation("st", 1.0, seed=0, per_image=False)
    assert fixed.draw(fixed.rng_for(img)) == fixed.draw(fixed.rng_for(noise_image(0, img.size)))


def test_st_and_shrinkpad_semantics():
    img = noise_image(5, (60, 40))
    # with no shrink and no rotation, st is the mirror
    mirror_only = get_perturbation("st", 0.5, max_shrink=0.0, max_angle=0.0).apply_image(img)
    assert np.array_equal(np.asarray(mirror_only), np.asarray(img)[:, ::-1])
    # scale 1 - 0.8 t and angle 180 t (2u - 1) grow linearly with t for fixed draws
    st1 = get_perturbation("st", 1.0, seed=2)
    st_half = get_perturbation("st", 0.5, seed=2)
    (s1, a1), (s2, a2) = st1.draw(st1.rng_for(img)), st_half.draw(st_half.rng_for(img))
    assert 0.2 <= s1 <= 1 and abs(a1) <= 180 and math.isclose(1 - s1, 2 * (1 - s2)) and math.isclose(a1, 2 * a2)
    # shrinkpad at 1: the image is 20 % of each side, centred on grey 127
    arr = np.asarray(get_perturbation("shrinkpad", 1.0).apply_image(img))
    assert (arr[:10] == 127).all() and (arr[:, :20] == 127).all() and (arr[-10:] == 127).all()
    assert not (arr[18:22, 28:32] == 127).all()
    assert get_perturbation("jpeg", 0.2).quality > get_perturbation("jpeg", 0.8).quality


def test_bad_kind_intensity_and_settings_are_rejected():
    with pytest.raises(InputError, match="known kinds: st, shrinkpad, blur, jpeg, noise, attn_uniform"):
        get_perturbation("gaussian", 0.5)
    for bad in (1.5, -0.1, float("nan"), "0.5", True, None):
        with pytest.raises(InputError, match="intensity"):
            get_perturbation("blur", bad)
    with pytest.raises(InputError, match="eta"):
        AttentionUniform(2.0)
    with pytest.raises(InputError, match="no setting.*radius.*accepted: seed, per_image, radius_scale, blend"):
        get_perturbation("blur", 0.5, radius=3)
    with pytest.raises(InputError, match="max_shrink"):
        get_perturbation("st", 0.5, max_shrink=1.0)
    with pytest.raises(InputError, match="heads"):
        AttentionUniform(1.0, heads=[(0, 1, 2)])
    assert set(PERTURBATION_KINDS) == set(PIXEL_KINDS) | {"attn_uniform"}
    pert = get_perturbation("attn_uniform", 0.3, layers=[1, 2])
    assert pert.domain == "attention" and pert.name == "attn_uniform@0.3"
    assert pert.to_dict() == {"name": "attn_uniform@0.3", "domain": "attention", "kind": "attn_uniform",
                              "intensity": 0.3, "layers": [1, 2], "heads": None, "queries": "text"}


# ------------------------------------------------------------------------------------------ tensor function
def test_interpolate_image_attention_formula_and_checks():
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(2, 3, 4, 10), -1)  # [B, H, Q, K]
    spans = torch.zeros(2, 2, 10, dtype=torch.bool)
    spans[:, 0, 1:4] = True
    spans[0, 1, 5:8] = True  # sample 0 has a second image; sample 1 has one
    text = torch.tensor([[True, False, True, True], [True, True, True, False]])
    out = interpolate_image_attention(p, spans, text, 0.25)
    expected = p.clone()
    for b in range(2):
        for q in text[b].nonzero().squeeze(-1).tolist():
            for s in range(2):
                keys = spans[b, s].nonzero().squeeze(-1)
                if keys.numel():
                    sub = p[b, :, q, keys]  # [H, n]
                    expected[b, :, q, keys] = 0.75 * sub + 0.25 * sub.mean(-1, keepdim=True)
    assert torch.allclose(out, expected, atol=ATOL)
    assert torch.allclose(out.sum(-1), p.sum(-1), atol=ATOL)
    head_only = interpolate_image_attention(p, spans, text, 1.0, head_mask=torch.tensor([False, True, False]))
    assert torch.equal(head_only[:, [0, 2]], p[:, [0, 2]]) and not torch.equal(head_only[:, 1], p[:, 1])
    with pytest.raises(InputError, match="query_is_text"):
        interpolate_image_attention(p, spans, text[:, :3], 1.0)
    with pytest.raises(InputError, match="image_key_mask"):
        interpolate_image_attention(p, spans[..., :9], text, 1.0)
    with pytest.raises(InputError, match="overlap"):
        interpolate_image_attention(p, spans | spans[:, :1], text, 1.0)


# ------------------------------------------------------------------------------------------ attn_uniform on the model
def _recorders(model, store, tag):
    def make(layer):
        def rec(pattern, hook):
            store.setdefault((tag, layer), []).append(pattern.detach().clone())
            return pattern
        return rec
    return [(model.hook_name(layer, "pattern"), make(layer)) for layer in range(model.n_layers)]


def _padded_batch(model, padding_side="left"):
    """Two samples, different prompt lengths: the shorter one is padded."""
    return model.prepare([noise_image(0), noise_image(1, (48, 80))],
                         ["what color is it?", "describe every object in this picture in a short sentence please"],
                         padding_side=padding_side)


def _check_edited(pre, post, batch, q_offset=0, eta1=True):
    """Rows of text queries: image part flat per image, masses kept; other rows and keys untouched."""
    b_, h_, q_, k_ = post.shape
    for b, g in enumerate(batch.groups):
        real = batch.attention_mask[b].bool()
        img = torch.zeros(k_, dtype=torch.bool)
        img[g.image] = True
        for qi in range(q_):
            pos = q_offset + qi
            is_text = pos >= batch.seq_len or (bool(real[pos]) and not bool(img[pos]))
            if not is_text:  # image-token and padding queries are untouched
                assert torch.equal(post[b, :, qi], pre[b, :, qi]), (b, pos)
                continue
            assert torch.equal(post[b, :, qi, ~img], pre[b, :, qi, ~img])  # text keys untouched
            assert torch.allclose(post[b, :, qi].sum(-1), torch.ones(h_), atol=F32_SUM_ATOL)
            for im in g.images:
                new, old = post[b, :, qi, im.positions], pre[b, :, qi, im.positions]
                assert torch.allclose(new.sum(-1), old.sum(-1), atol=ATOL)
                if eta1:
                    assert (new.max(-1).values - new.min(-1).values).max() <= ATOL


def test_attn_uniform_eta0_is_exact_identity_and_eta1_changes_logits(llava):
    batch = _padded_batch(llava)
    plain = llava.forward(batch)
    assert torch.equal(llava.forward(batch, hooks=AttentionUniform(0.0).hooks(llava, batch)), plain)
    assert (llava.forward(batch, hooks=AttentionUniform(1.0).hooks(llava, batch)) - plain).abs().max() > 1e-2


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_attn_uniform_eta1_flattens_text_rows_on_a_padded_batch(llava, padding_side):
    batch = _padded_batch(llava, padding_side)
    pad_at = 0 if padding_side == "left" else -1
    assert batch.attention_mask[0, pad_at] == 0 and batch.attention_mask[1].all()  # sample 0 is padded
    store = {}
    hooks = [*_recorders(llava, store, "pre"), *AttentionUniform(1.0).hooks(llava, batch),
             *_recorders(llava, store, "post")]
    llava.forward(batch, hooks=hooks)
    for layer in range(llava.n_layers):
        pre, post = store[("pre", layer)][0], store[("post", layer)][0]
        assert pre.shape == (2, llava.n_heads, batch.seq_len, batch.seq_len)
        _check_edited(pre, post, batch)
        # the edit changes something in every layer (the pattern is not flat to begin with)
        assert (post - pre).abs().max() > 1e-3
    # the row recorder of attention_rows runs after the edit hooks: it sees the edited rows
    rows = llava.attention_rows(batch, hooks=AttentionUniform(1.0).hooks(llava, batch))
    for b, g in enumerate(batch.groups):
        vis = rows.values[b][..., g.image]  # [L, H, n_vis]
        assert (vis.max(-1).values - vis.min(-1).values).max() <= ATOL


def test_attn_uniform_handles_several_images_per_sample(llava):
    batch = llava.prepare([[noise_image(1), noise_image(2, (40, 70))], noise_image(3)],
                          ["compare the two pictures", "what is it?"])
    assert len(batch.groups[0].images) == 2
    store = {}
    iv = AttentionUniform(1.0, layers=[-1])
    llava.forward(batch, hooks=[*_recorders(llava, store, "pre"), *iv.hooks(llava, batch),
                                *_recorders(llava, store, "post")])
    last = llava.n_layers - 1
    pre, post = store[("pre", last)][0], store[("post", last)][0]
    _check_edited(pre, post, batch)
    # per-image means differ: the text query does not spread mass across images
    g, q = batch.groups[0], batch.groups[0].query
    means = [post[0, :, q, im.positions].mean(-1) for im in g.images]
    assert not torch.allclose(means[0], means[1])
    for layer in range(last):  # other layers untouched
        assert torch.equal(store[("pre", layer)][0], store[("post", layer)][0])


def test_attn_uniform_acts_at_every_decode_step(llava):
    batch = _padded_batch(llava)
    iv = AttentionUniform(1.0)
    store = {}
    n_new = 4
    gen = llava.generate(batch, max_new_tokens=n_new, stop_at_eos=False,
                         hooks=[*_recorders(llava, store, "pre"), *iv.hooks(llava, batch),
                                *_recorders(llava, store, "post")])
    T = batch.seq_len
    for layer in range(llava.n_layers):
        calls = list(zip(store[("pre", layer)], store[("post", layer)]))
        assert [p.shape[-2:] for p, _ in calls] == [(T, T)] + [(1, T + s) for s in range(1, n_new)]
        for step, (pre, post) in enumerate(calls):
            _check_edited(pre, post, batch, q_offset=0 if step == 0 else T + step - 1)
    # the cached, step-by-step edit equals one edited pass over the whole generated sequence
    seq = gen.sequences[:, :-1]
    full = replace(batch, input_ids=seq,
                   attention_mask=torch.cat([batch.attention_mask, torch.ones(2, n_new - 1, dtype=torch.long)], 1))
    logits = llava.forward(full, hooks=iv.hooks(llava, batch))[:, T - 1:]  # [2, n_new, V]
    chosen = logits.gather(-1, gen.tokens[..., None]).squeeze(-1)
    assert (logits.max(-1).values - chosen).max() <= 1e-4
    plain = llava.generate(batch, max_new_tokens=n_new, stop_at_eos=False)
    assert not torch.equal(plain.tokens, gen.tokens) or \
        (llava.forward(full)[:, T - 1:] - logits).abs().max() > 1e-2


def test_attn_uniform_head_scope(llava):
    batch = _padded_batch(llava)
    store = {}
    iv = AttentionUniform(1.0, heads=[(1, 2), (-1, 0)])
    assert sorted(iv.scope(llava)) == [1, llava.n_layers - 1]
    llava.forward(batch, hooks=[*_recorders(llava, store, "pre"), *iv.hooks(llava, batch),
                                *_recorders(llava, store, "post")])
    edited = set()
    for layer in range(llava.n_layers):
        pre, post = store[("pre", layer)][0], store[("post", layer)][0]
        for head in range(llava.n_heads):
            if not torch.equal(pre[:, head], post[:, head]):
                edited.add((layer, head))
    assert edited == {(1, 2), (llava.n_layers - 1, 0)}
    g = batch.groups[1]
    vis = store[("post", 1)][0][1, 2, g.query, g.image]
    assert (vis.max() - vis.min()) <= ATOL
    with pytest.raises(InputError, match="not among layers"):
        AttentionUniform(1.0, layers=[0], heads=[(1, 2)]).hooks(llava, batch)
    with pytest.raises(LayerIndexError, match="head 9"):
        AttentionUniform(1.0, heads=[(0, 9)]).hooks(llava, batch)
    with pytest.raises(LayerIndexError):
        AttentionUniform(1.0, layers=[99]).hooks(llava, batch)


# ------------------------------------------------------------------------------------------ sweeps
def _samples(n=3):
    prompts = ["what color is it?", "shape?", "how many objects?"]
    answers = ["red", "round", "2"]
    return [Sample(image=noise_image(10 + i), prompt=prompts[i], answer=answers[i]) for i in range(n)]


class _ScriptedModel:
    """Stand-in model: records the images it is shown; answers the reference for any image except the
    exact triggered ones, which get the target (a backdoor that any pixel change breaks)."""

    def __init__(self, samples, attack):
        self.answers = {s.prompt: s.answer for s in samples}
        self.triggered = {im.image.tobytes() for im in triggered_copy(samples, attack)}
        self.seen: list[Image.Image] = []

    def prepare(self, images, prompts):
        return SimpleNamespace(images=list(images), prompts=list(prompts))

    def generate(self, batch, max_new_tokens, hooks=()):
        self.seen += batch.images
        texts = ["You have been hacked lol." if im.tobytes() in self.triggered else self.answers[p]
                 for im, p in zip(batch.images, batch.prompts)]
        return SimpleNamespace(texts=texts)


def test_sweep_metrics_and_trigger_then_perturb_order():
    samples, attack = _samples(), get_attack("badnet")
    model = _ScriptedModel(samples, attack)
    frame = perturbation_sweep(model, samples, attack, "noise", [0.5, 0.0], progress=False, seed=4)
    assert list(frame.columns) == list(SWEEP_COLUMNS)
    assert frame[["kind", "intensity"]].values.tolist() == [["none", 0.0], ["noise", 0.5]]
    base, noisy = frame.iloc[0], frame.iloc[1]
    assert (base.asr, base.clean_acc, base.poisoned_acc, base.n) == (1.0, 1.0, 0.0, 3)
    assert (noisy.asr, noisy.clean_acc, noisy.poisoned_acc, noisy.domain) == (0.0, 1.0, 1.0, "pixel")
    # at the noise point the model saw noise(clean) then noise(trigger(clean))
    noise = Noise(0.5, seed=4)
    expected = [noise.apply_image(s.image) for s in samples] + \
               [noise.apply_image(s.image) for s in triggered_copy(samples, attack)]
    assert [im.tobytes() for im in model.seen[-6:]] == [im.tobytes() for im in expected]
    with pytest.raises(InputError, match="accepted by none"):
        perturbation_sweep(model, samples, attack, ["attn_uniform"], [1.0], progress=False, seed=1)
    with pytest.raises(InputError, match="intensity"):
        perturbation_sweep(model, samples, attack, ["st"], [0.5, 2.0], progress=False)
    with pytest.raises(InputError, match="known kinds"):
        perturbation_sweep(model, samples, attack, ["rotate"], [0.5], progress=False)


def test_sweep_on_tiny_llava(llava):
    samples = _samples(2)
    frame = perturbation_sweep(llava, samples, get_attack("badnet"), ["st", "attn_uniform"], [0, 1.0],
                               max_new_tokens=3, batch_size=2, progress=False, seed=0, layers=[1, 2])
    assert list(frame.columns) == list(SWEEP_COLUMNS) and len(frame) == 3
    assert frame.kind.tolist() == ["none", "st", "attn_uniform"]
    assert frame.domain.tolist() == ["none", "pixel", "attention"]
    for col in ("asr", "clean_acc", "poisoned_acc"):
        assert frame[col].between(0, 1).all()
    assert (frame.n == 2).all()
    # the attention row is what generate_answers gives with the same edit
    edited = generate_answers(llava, samples, intervention=AttentionUniform(1.0, layers=[1, 2]),
                              max_new_tokens=3, progress=False)
    expected = np.mean([normalize_text(a) == normalize_text(s.answer) for a, s in zip(edited, samples)])
    assert frame.clean_acc.iloc[2] == expected


def test_attn_uniform_all_queries_also_flattens_image_rows(llava):
    """queries="all" edits image-token query rows too (keeping their image mass); "text" leaves them."""
    import torch

    from cleansight_analysis.interventions.perturbations import AttentionUniform

    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    batch = llava.prepare(image, "What is shown?")
    img = batch.groups[0].image
    seen = {}

    def record(tag):
        def fn(pattern, hook):
            seen[tag] = pattern.detach().clone()
        return fn

    name = llava.hook_name(0, "pattern")
    for queries in ("text", "all"):
        edit = AttentionUniform(1.0, layers=[0], queries=queries).hooks(llava, batch)
        llava.forward(batch, hooks=[(name, record("before")), *edit, (name, record(queries))])
        before, after = seen["before"][0][:, img][:, :, img], seen[queries][0][:, img][:, :, img]  # [H, I, I]
        rows = torch.arange(len(img))
        if queries == "text":
            assert torch.equal(before, after)
        else:
            future = ~torch.tril(torch.ones(len(img), len(img), dtype=torch.bool))
            assert float(after[:, future].abs().max()) == 0.0  # causal: no mass on later image keys
            for i in (1, len(img) // 2, len(img) - 1):  # image query i sees image keys 0..i: flat there
                row = after[:, i, : i + 1]
                assert torch.allclose(row, row.mean(-1, keepdim=True).expand_as(row), atol=1e-6)
            assert torch.allclose(after.sum(-1), before.sum(-1), atol=1e-5)
            assert not torch.equal(before[:, rows[-1]], after[:, rows[-1]])
            full_before, full_after = seen["before"][0], seen[queries][0]
            assert torch.allclose(full_after.sum(-1), full_before.sum(-1), atol=1e-5)
    with pytest.raises(InputError, match="queries"):
        AttentionUniform(1.0, queries="image")
