"""SDPA attention (issue 14): rows and key masks served from q and k equal what eager attention gives.

Two kinds of comparison (tolerances.py derives both bounds):

* **same inputs** (:data:`SDPA_ROWS_ATOL` = 1e-5): layer ``l`` runs SDPA in one pass and eager in the other
  (a no-op ``hook_pattern`` hook on ``l`` alone forces eager there); every layer before ``l`` runs identically,
  so the rows differ only by how ``rows_from_qk`` and eager attention accumulate the ``q . k`` dot products;
* **two forwards apart** (:data:`F32_FORWARD_RTOL`): ``attention="sdpa"`` against ``attention="eager"``, where
  every earlier layer (and the vision tower) ran another attention kernel.

Discrete outputs (generated tokens, flags, pruned positions) must be identical. The SDPA path is also
bit-identical to the untouched HF model with ``attn_implementation="sdpa"``.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import torch

import cleansight_analysis as cs
from cleansight_analysis.defenses.cleansight import MASK_SCOPES, CleanSight, CleanSightConfig
from cleansight_analysis.detection import key_mask_hooks, positions_mask
from cleansight_analysis.errors import InputError
from cleansight_analysis.interventions.perturbations import AttentionUniform
from cleansight_analysis.models import tiny
from cleansight_analysis.models.hooknames import hook_attn, hook_pattern, hook_z
from cleansight_analysis.models.rows import RowRecorder
from conftest import noise_image
from test_cleansight import _force_flags, _samples
from tolerances import F32_FORWARD_RTOL, SDPA_ROWS_ATOL, SDPA_SCORE_SPAN

PROMPTS = ["what color is it?", "shape?", "describe this image in a short sentence."]
MODELS = ("llava", "llava_next")


def _noop(x, hook):
    return x


@contextmanager
def _eager(model):
    model.attention = "eager"
    try:
        yield model
    finally:
        model.attention = "sdpa"


@contextmanager
def _eager_calls(model):
    """``{layer: calls}`` of the bridge's eager attention forward while the context is open."""
    calls = {layer: 0 for layer in model._attention.sites}
    saved = {}
    for layer, site in model._attention.sites.items():
        saved[layer] = site._eager

        def counted(*args, _layer=layer, _fn=site._eager, **kwargs):
            calls[_layer] += 1
            return _fn(*args, **kwargs)

        site._eager = counted
    try:
        yield calls
    finally:
        for layer, site in model._attention.sites.items():
            site._eager = saved[layer]


def _batch(model, side="left", n=3):
    ims = [noise_image(0), noise_image(1, (48, 80)), noise_image(2, (90, 40))][:n]
    return model.prepare(ims, PROMPTS[:n], padding_side=side)


@pytest.fixture(scope="module")
def hf_sdpa():
    """Untouched HF copies of the tiny models (same seeds) with HF's own SDPA attention."""
    out = {}
    for name, build in (("llava", tiny.tiny_random_llava), ("llava_next", tiny.tiny_random_llava_next)):
        model, _ = build()
        model.set_attn_implementation("sdpa")
        out[name] = model
    return out


# --------------------------------------------------------------------------- the SDPA path is HF's SDPA
@pytest.mark.parametrize("name", MODELS)
def test_sdpa_path_is_hf_sdpa_bit_for_bit(request, hf_sdpa, name):
    model = request.getfixturevalue(name)
    assert model.attention == "sdpa" and model.config.text_config._attn_implementation == "cleansight_sdpa"
    batch = _batch(model)
    with _eager_calls(model) as calls:
        logits = model.forward(batch)
        gen = model.generate(batch, max_new_tokens=5, stop_at_eos=False)
    assert sum(calls.values()) == 0
    with torch.no_grad():
        ref = hf_sdpa[name](**batch.model_inputs(), use_cache=False).logits
    assert torch.equal(logits, ref)  # padding positions included
    from transformers import GenerationConfig

    tok = model.tokenizer
    cfg = GenerationConfig(max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        ref_seq = hf_sdpa[name].generate(**batch.model_inputs(), generation_config=cfg)
    assert torch.equal(gen.sequences, ref_seq)


def test_hook_z_ablation_runs_on_the_sdpa_path(llava, hf_sdpa):
    """hook_z (o_proj's input) fires on the SDPA path: zeroing a head equals zeroing its slice in HF SDPA."""
    batch = _batch(llava)
    d_head = llava.text_config.hidden_size // llava.n_heads

    def zero_head(z, hook):  # [B, T, H, d_head]
        assert z.shape[2:] == (llava.n_heads, d_head)
        z = z.clone()
        z[:, :, 2] = 0
        return z

    with _eager_calls(llava) as calls:
        ours = llava.forward(batch, hooks=[(hook_z(1), zero_head)])
    assert sum(calls.values()) == 0

    def pre(module, args):
        x = args[0].clone()
        x[..., 2 * d_head:3 * d_head] = 0
        return (x,)

    ref_model = hf_sdpa["llava"]
    handle = ref_model.model.language_model.layers[1].self_attn.o_proj.register_forward_pre_hook(pre)
    try:
        with torch.no_grad():
            ref = ref_model(**batch.model_inputs(), use_cache=False).logits
    finally:
        handle.remove()
    assert torch.equal(ours, ref)
    assert (ours - llava.forward(batch)).abs().max().item() > 1e-3


# --------------------------------------------------------------------------- rows, same inputs
@pytest.mark.parametrize("name", MODELS)
def test_score_span_stays_within_the_tolerance_derivation(request, name):
    """SDPA_ROWS_ATOL assumes S = |q||k| / sqrt(d) summed over d stays <= SDPA_SCORE_SPAN on these models."""
    model = request.getfixturevalue(name)
    batch = _batch(model)
    seen = {}

    def keep(x, hook):
        seen[hook.name] = x.detach().clone()  # [B, T, H, d] (hook_rot_q / hook_rot_k)
        return x

    layers = range(model.n_layers)
    model.forward(batch, hooks=[(hook_attn(l, p), keep) for l in layers for p in ("rot_q", "rot_k")])
    real = batch.attention_mask.bool()
    t = batch.seq_len
    # the scores that get weight: real queries, real keys at or before them (masked ones get exactly 0)
    live = real[:, :, None] & real[:, None, :] & torch.ones(t, t, dtype=torch.bool).tril()[None]
    span = 0.0
    for l in layers:
        q, k = seen[hook_attn(l, "rot_q")], seen[hook_attn(l, "rot_k")]
        k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
        s = torch.einsum("bqhd,bkhd->bhqk", q.abs(), k.abs()) * q.shape[-1] ** -0.5
        span = max(span, float(s.masked_fill(~live[:, None], 0).amax()))
    assert 1.0 < span <= SDPA_SCORE_SPAN


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_rows_equal_eager_rows_from_the_same_inputs(request, name, side):
    model = request.getfixturevalue(name)
    batch = _batch(model, side)
    positions = batch.query_positions[:, None] - torch.tensor([[0, 3, 20]])  # [B, Q] per sample
    worst = 0.0
    for query in ("last", positions):
        for l in range(model.n_layers):
            with _eager_calls(model) as sdpa_calls:
                a = model.attention_rows(batch, layers=[l], query=query).values
            with _eager_calls(model) as eager_calls:
                b = model.attention_rows(batch, layers=[l], query=query, hooks=[(hook_pattern(l), _noop)]).values
            assert sum(sdpa_calls.values()) == 0
            assert eager_calls == {x: int(x == l) for x in eager_calls}  # eager in that layer only
            assert a.shape == b.shape and torch.isfinite(a).all()
            worst = max(worst, (a - b).abs().max().item())
    assert worst <= SDPA_ROWS_ATOL


@pytest.mark.parametrize("name", MODELS)
def test_generated_rows_equal_eager_rows_from_the_same_inputs(request, name):
    model = request.getfixturevalue(name)
    batch = _batch(model, "left")
    for l in range(model.n_layers):
        a = model.generate(batch, max_new_tokens=4, record_rows=[l], stop_at_eos=False)
        with _eager_calls(model) as calls:
            b = model.generate(batch, max_new_tokens=4, record_rows=[l], stop_at_eos=False,
                               hooks=[(hook_pattern(l), _noop)])
        assert calls[l] == 4 and sum(calls.values()) == 4  # prefill + 3 decode steps, that layer only
        assert torch.equal(a.sequences, b.sequences)
        assert a.rows.values.shape == b.rows.values.shape
        assert (a.rows.values - b.rows.values).abs().max().item() <= SDPA_ROWS_ATOL


def test_declared_hooks_of_an_outer_context_survive_an_inner_eager_hook(llava):
    """Rows handed to SDPA by an outer hooks context are still read when an inner hook forces eager."""
    batch = _batch(llava)
    plain = llava.attention_rows(batch).values
    rec = RowRecorder(list(range(llava.n_layers)), batch.query_positions[:, None])
    with llava.hooks(rec.hooks()):
        llava.forward(batch, hooks=[(hook_pattern(2), _noop)], logits_to_keep=1)
    nested = rec.stacked()[:, 0]
    assert nested.shape == plain.shape
    assert (nested - plain).abs().max().item() <= SDPA_ROWS_ATOL


# --------------------------------------------------------------------------- rows, SDPA vs eager mode
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_rows_sdpa_mode_vs_eager_mode(request, name, side):
    model = request.getfixturevalue(name)
    batch = _batch(model, side)
    positions = batch.query_positions[:, None] - torch.tensor([[0, 3, 20]])
    queries = ["last", positions] + (["generated"] if side == "left" else [])
    sdpa = [model.attention_rows(batch, query=q, max_new_tokens=3) for q in queries]
    with _eager(model):
        eager = [model.attention_rows(batch, query=q, max_new_tokens=3) for q in queries]
    for a, b in zip(sdpa, eager):
        assert a.values.shape == b.values.shape
        assert (a.values - b.values).abs().max().item() <= F32_FORWARD_RTOL
        if a.valid is not None:
            assert torch.equal(a.valid, b.valid)


# --------------------------------------------------------------------------- key masks
def _image_half(batch):
    """Every other image token of each sample: a [B, T] key mask."""
    return positions_mask([g.image[::2] for g in batch.groups], batch.seq_len)


@pytest.mark.parametrize("name", MODELS)
def test_key_masks_enter_sdpa_and_match_eager(request, name):
    model = request.getfixturevalue(name)
    batch = _batch(model)
    mask = _image_half(batch)
    hooks = key_mask_hooks(model, mask, from_layer=1)
    with _eager_calls(model) as calls:
        rows = model.attention_rows(batch, hooks=hooks)
        masked = model.generate(batch, max_new_tokens=5, hooks=hooks)
        plain = model.generate(batch, max_new_tokens=5)
        probe = key_mask_hooks(model, mask, layers=[2], query=batch.query_positions)  # one query row only
        probed = model.attention_rows(batch, hooks=probe, query=batch.query_positions[:, None] - torch.tensor([[0, 1]]))
    assert sum(calls.values()) == 0  # no eager attention anywhere
    hidden = mask[:, None, None, :].expand_as(rows.values)
    assert (rows.values[:, 1:][hidden[:, 1:]] == 0).all()        # exactly zero weight from layer 1 on
    assert (rows.values[:, 0][hidden[:, 0]] > 0).any()           # layer 0 untouched
    assert (probed.values[:, 0, 2][mask[:, None, :].expand(-1, model.n_heads, -1)] == 0).all()
    assert (probed.values[:, 1, 2][mask[:, None, :].expand(-1, model.n_heads, -1)] > 0).any()  # other rows keep them
    with _eager(model):
        rows_e = model.attention_rows(batch, hooks=hooks)
        masked_e = model.generate(batch, max_new_tokens=5, hooks=hooks)
        plain_e = model.generate(batch, max_new_tokens=5)
        probed_e = model.attention_rows(batch, hooks=probe,
                                        query=batch.query_positions[:, None] - torch.tensor([[0, 1]]))
    assert (rows.values - rows_e.values).abs().max().item() <= F32_FORWARD_RTOL
    assert (probed.values - probed_e.values).abs().max().item() <= F32_FORWARD_RTOL
    assert masked.texts == masked_e.texts and torch.equal(masked.sequences, masked_e.sequences)
    assert plain.texts == plain_e.texts and torch.equal(plain.sequences, plain_e.sequences)
    assert not torch.equal(masked.sequences, plain.sequences) or name == "llava_next"  # the mask acts


# --------------------------------------------------------------------------- where eager still runs
def test_eager_runs_only_where_a_hook_needs_the_pattern(llava):
    batch = _batch(llava)
    fired = []
    with _eager_calls(llava) as calls:
        llava.forward(batch, hooks=[(hook_z(1), _noop), (hook_attn(0, "q"), _noop), (hook_attn(3, "out"), _noop)])
    assert sum(calls.values()) == 0
    with _eager_calls(llava) as calls:
        llava.forward(batch, hooks=[(hook_attn(2, "attn_scores"), _noop)])
    assert calls == {0: 0, 1: 0, 2: 1, 3: 0}
    with _eager_calls(llava) as calls:  # a name filter matching every LM pattern (and the vision tower's)
        llava.forward(batch, hooks=[(lambda n: n.endswith("hook_pattern"), lambda p, hook: fired.append(hook.name))])
    assert calls == {l: 1 for l in range(llava.n_layers)}
    assert any(not n.startswith("blocks.") for n in fired)  # the vision tower's patterns fired too (eager there)
    with _eager_calls(llava) as calls:  # a pattern perturbation: eager in the edited layers only
        llava.forward(batch, hooks=AttentionUniform(1.0, layers=[1, 3]).hooks(llava, batch))
    assert calls == {0: 0, 1: 1, 2: 0, 3: 1}
    with _eager(llava), _eager_calls(llava) as calls:
        llava.forward(batch)
    assert calls == {l: 1 for l in range(llava.n_layers)}


def test_attention_mode_bad_input():
    with pytest.raises(InputError, match="attention must be one of"):
        cs.load_lvlm("tiny-random-llava", attention="flash")


def test_attention_mode_setter_rejects_unknown(llava):
    with pytest.raises(InputError, match="attention must be one of"):
        llava.attention = "flash_attention_2"
    assert llava.attention == "sdpa"


# --------------------------------------------------------------------------- CleanSight
@pytest.fixture(scope="module")
def fitted(llava):
    return CleanSight(config=CleanSightConfig.paper(layers=[1, 2], tau=1e-4)).fit(llava, _samples(12))


def test_cleansight_scores_and_generation_match_eager(llava, fitted):
    import copy

    samples = _samples(3, offset=40)
    batch = llava.prepare([s.image for s in samples], [s.prompt for s in samples])
    with _eager_calls(llava) as calls:
        scores = fitted.score(llava, batch)
        feats = fitted.features(llava, batch)
    assert sum(calls.values()) == 0
    with _eager(llava):
        scores_e = fitted.score(llava, batch)
        feats_e = fitted.features(llava, batch)
    # ratios of masses two forwards apart (as batched vs single in test_cleansight.py)
    torch.testing.assert_close(feats, feats_e, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(scores, scores_e, rtol=1e-3, atol=1e-6)
    top = int(torch.argmax(scores))
    for scope in MASK_SCOPES:
        d = copy.deepcopy(fitted)
        d.config = CleanSightConfig(**{**fitted.config.to_dict(), "mask_scope": scope})
        d = _force_flags(d, llava, batch, [top])
        with _eager_calls(llava) as calls:
            out = d.generate(llava, batch, max_new_tokens=4)
        assert sum(calls.values()) == 0, scope
        with _eager(llava):
            out_e = d.generate(llava, batch, max_new_tokens=4)
        assert out.flags.tolist() == out_e.flags.tolist() == [i == top for i in range(3)]
        assert all(torch.equal(p, q) for p, q in zip(out.pruned, out_e.pruned)) and out.pruned[top].numel() > 0
        assert out.texts == out_e.texts, scope
        assert torch.equal(out.info["tokens"], out_e.info["tokens"])


# ------------------------------------------------------------------ the prompt once, the last token per variant
@pytest.mark.parametrize("name", MODELS)
def test_last_token_logits_equal_full_forwards(request, name):
    """``last_token_logits`` (prefix once + one decode step per hook set) against one full forward per hook
    set, on a left-padded batch of prompts of different lengths: two forwards apart (F32_FORWARD_RTOL of the
    logits' scale). A mask on the last query's row changes the logits by far more than that, so the test
    also shows each variant's hooks were active in its step and only there."""
    from cleansight_analysis.detection.pruning import image_mask

    model = request.getfixturevalue(name)
    batch = model.prepare([noise_image(70 + i) for i in range(3)], PROMPTS)
    assert not bool(batch.attention_mask.all())  # padded: the prefix keeps its padding mask
    variants = [[], *[key_mask_hooks(model, image_mask(batch), layers=[layer], query=batch.query_positions)
                      for layer in range(model.n_layers)], []]
    fast = model.last_token_logits(batch, variants)
    full = torch.stack([model.forward(batch, hooks=v, logits_to_keep=1)[:, -1] for v in variants])
    assert fast.shape == (len(variants), 3, full.shape[-1])
    scale = float(full.abs().max())
    torch.testing.assert_close(fast, full, rtol=0, atol=F32_FORWARD_RTOL * scale)
    assert torch.equal(fast[0], fast[-1])  # the trimmed cache serves the last variant as it served the first
    moved = (full[1:-1] - full[0]).abs().amax(dim=(1, 2))
    assert float(moved.max()) > 100 * F32_FORWARD_RTOL * scale


def test_last_token_logits_bad_input(llava):
    batch = llava.prepare([noise_image(1), noise_image(2)], PROMPTS[:2], padding_side="right")
    assert not llava.decodes_last_token(batch)  # the predicate fusion_onset_profile asks first
    with pytest.raises(InputError, match="last position must be a real token"):
        llava.last_token_logits(batch, [[]])
    left = llava.prepare([noise_image(1)], PROMPTS[:1])
    assert llava.decodes_last_token(left)
    with pytest.raises(InputError, match="at least one hook set"):
        llava.last_token_logits(left, [])


def test_fusion_onset_profile_with_and_without_the_shared_prefix(llava, monkeypatch):
    """The profile from ``last_token_logits`` (what left-padded batches use) equals the one from a full
    forward per blocked layer. A KL effect moves by at most ``2 * max|d logit|`` when the logits move by
    ``d`` (its gradient in the logits is a difference of two distributions), so the bound is twice the
    logits' forward tolerance at their scale."""
    from cleansight_analysis.defenses.layers import fusion_onset_profile

    samples = _samples(5, offset=50)
    fast_path, used, scale = type(llava).last_token_logits, [], []

    def counted(self, batch, variants):
        used.append(len(variants))
        out = fast_path(self, batch, variants)
        scale.append(float(out.abs().max()))
        return out

    monkeypatch.setattr(type(llava), "last_token_logits", counted)
    fast = fusion_onset_profile(llava, samples, batch_size=3)
    assert used == [llava.n_layers + 1] * 2
    monkeypatch.setattr(type(llava), "last_token_logits", lambda self, batch, variants: torch.stack(
        [self.forward(batch, hooks=v, logits_to_keep=1)[:, -1] for v in variants]))
    slow = fusion_onset_profile(llava, samples, batch_size=3)
    np.testing.assert_allclose(fast, slow, rtol=0, atol=2 * F32_FORWARD_RTOL * max(scale))
    assert np.all(fast >= 0) and fast.max() > 100 * 2 * F32_FORWARD_RTOL * max(scale)
