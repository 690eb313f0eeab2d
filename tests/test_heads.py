"""Per-head analyses: hook_z ablation, image flattening, head sweeps, activation patching, logit lens."""

from __future__ import annotations

import pytest
import torch

from conftest import noise_image
from tolerances import F32_FORWARD_RTOL
from cleansight_analysis.attacks import get_attack, triggered_copy
from cleansight_analysis.data.base import Sample
from cleansight_analysis.errors import InputError, LayerIndexError
from cleansight_analysis.evaluation import generate_answers
from cleansight_analysis.evaluation.metrics import contains_target, exact_match, rate
from cleansight_analysis.evaluation.intervention_sweeps import head_sweep
from cleansight_analysis.interventions.heads import (
    HeadAblation,
    HeadImageFlatten,
    head_means,
    patch_heads,
)
from cleansight_analysis.interventions.logit_lens import (
    first_answer_token,
    lens_logits,
    logit_lens,
    residual_at_query,
)

PROMPTS = ["what color is it?", "describe this image in a short sentence."]


def _samples(answers=("red", "circle")):
    return [Sample(image=noise_image(10 + i), prompt=p, answer=a, sample_id=f"s{i}")
            for i, (p, a) in enumerate(zip(PROMPTS, answers))]


def _attack():
    return get_attack("badnet", size=16)  # 16 px patch on the 64 px test images


def _recorder(store, key):
    def fn(x, hook):
        store.setdefault(key, []).append(x.detach().clone())
        return x
    return fn


# ----------------------------------------------------------------------------------------- ablation


def test_zero_ablation_removes_exactly_one_head(llava_eager, llava_ref):
    """Zeroing (1, 2) at hook_z equals zeroing that slice of o_proj's input in plain HF, leaves the other
    heads' hook_z untouched, and changes the attention output by exactly o_proj applied to that head."""
    llava = llava_eager  # against HF eager (SDPA against HF SDPA: tests/test_sdpa_rows.py)
    batch = llava.prepare([noise_image(0), noise_image(1, (40, 90))], PROMPTS)
    d_head = llava.text_config.hidden_size // llava.n_heads
    iv = HeadAblation([(1, 2)])
    assert iv.domain == "activation" and "L1H2" in iv.name

    plain, ablated = {}, {}
    rec = lambda s: [("blocks.1.attn.hook_z", _recorder(s, "z")), ("blocks.1.attn.hook_out", _recorder(s, "out"))]
    base_logits = llava.forward(batch, hooks=rec(plain))
    ours = llava.forward(batch, hooks=[*iv.hooks(llava, batch), *rec(ablated)])

    z0, z1 = plain["z"][0], ablated["z"][0]  # [B, T, H, d_head]
    others = [h for h in range(llava.n_heads) if h != 2]
    assert torch.equal(z0[:, :, others], z1[:, :, others])
    assert z1[:, :, 2].abs().max() == 0 and z0[:, :, 2].abs().max() > 1e-3
    w_o = llava_ref.model.language_model.layers[1].self_attn.o_proj.weight  # [d_model, H * d_head]
    contribution = z0[:, :, 2] @ w_o[:, 2 * d_head:3 * d_head].T  # [B, T, d_model]
    assert (plain["out"][0] - ablated["out"][0] - contribution).abs().max() < 1e-5

    def pre(module, args):
        x = args[0].clone()
        x[..., 2 * d_head:3 * d_head] = 0
        return (x,)

    handle = llava_ref.model.language_model.layers[1].self_attn.o_proj.register_forward_pre_hook(pre)
    try:
        with torch.no_grad():
            ref = llava_ref(**batch.model_inputs(), use_cache=False).logits
    finally:
        handle.remove()
    assert (ours - ref).abs().max() <= 1e-5
    assert (ours - base_logits).abs().max() > 1e-3


def test_head_means_are_masked_means_and_mean_ablation_inserts_them(llava):
    # two prompts of different lengths -> left padding, which must not enter the mean
    samples = _samples()
    batch = llava.prepare([s.image for s in samples], [s.prompt for s in samples])
    assert (batch.attention_mask == 0).any()
    store = {}
    llava.forward(batch, hooks=[(f"blocks.{l}.attn.hook_z", _recorder(store, l)) for l in (0, 2)])
    mask = batch.attention_mask.float()
    means = head_means(llava, samples, layers=[0, 2], batch_size=2)
    # one sample per batch: no padding, same token-weighted mean pooled over batches
    assert torch.allclose(head_means(llava, samples, layers=[0, 2], batch_size=1), means, rtol=F32_FORWARD_RTOL,
                          atol=F32_FORWARD_RTOL, equal_nan=True)  # two forwards apart
    assert means.shape == (llava.n_layers, llava.n_heads, llava.text_config.hidden_size // llava.n_heads)
    for layer in (0, 2):
        manual = torch.einsum("bt,bthd->hd", mask, store[layer][0]) / mask.sum()
        assert (means[layer] - manual).abs().max() < 1e-5
    assert torch.isnan(means[1]).all() and torch.isnan(means[3]).all()
    with pytest.raises(InputError, match="NaN"):
        HeadAblation([(1, 0)], method="mean", means=means).hooks(llava, batch)

    # single-position case: when the "mean" is the head's own value at the answer query, mean ablation
    # leaves that position's attention output unchanged while every other position changes
    one = llava.prepare(noise_image(5), "what shape is it?")
    rec = {}
    llava.forward(one, hooks=[("blocks.1.attn.hook_z", _recorder(rec, "z")),
                              ("blocks.1.attn.hook_out", _recorder(rec, "out"))])
    q = one.query_positions[0]
    own = torch.full_like(means, float("nan"))
    own[1, 2] = rec["z"][0][0, q, 2]
    got = {}
    llava.forward(one, hooks=[*HeadAblation([(1, 2)], method="mean", means=own).hooks(llava, one),
                              ("blocks.1.attn.hook_z", _recorder(got, "z")),
                              ("blocks.1.attn.hook_out", _recorder(got, "out"))])
    assert torch.equal(got["z"][0][0, :, 2], own[1, 2].expand(one.seq_len, -1))
    delta = (got["out"][0] - rec["out"][0]).abs().amax(-1)[0]  # [T]
    assert delta[q] < 1e-6
    assert delta[:q].min() > 1e-4


def test_ablation_is_active_at_prefill_and_every_decode_step(llava):
    samples = _samples()
    batch = llava.prepare([s.image for s in samples], [s.prompt for s in samples])
    iv = HeadAblation([(0, 1), (2, 3)])
    seen = {}
    gen = llava.generate(batch, max_new_tokens=4, stop_at_eos=False,
                         hooks=[*iv.hooks(llava, batch), ("blocks.2.attn.hook_z", _recorder(seen, "z"))])
    shapes = [tuple(z.shape[:2]) for z in seen["z"]]
    assert shapes == [(2, batch.seq_len)] + [(2, 1)] * 3  # prefill, then one query per decode step
    for z in seen["z"]:
        assert z[:, :, 3].abs().max() == 0 and z[:, :, :3].abs().amin(-1).max() > 0

    def manual(heads):
        def fn(z, hook):
            z = z.clone()
            z[:, :, heads] = 0
            return z
        return fn

    ref = llava.generate(batch, max_new_tokens=4, stop_at_eos=False,
                         hooks=[("blocks.0.attn.hook_z", manual([1])), ("blocks.2.attn.hook_z", manual([3]))])
    assert torch.equal(gen.sequences, ref.sequences)
    # the evaluation helper takes the intervention as is
    texts = generate_answers(llava, samples, intervention=iv, max_new_tokens=4, progress=False)
    assert texts == llava.generate(batch, max_new_tokens=4, hooks=iv.hooks(llava, batch)).texts


def test_head_image_flatten_edits_only_its_head(llava):
    batch = llava.prepare(noise_image(3), "what color is it?")
    iv = HeadImageFlatten([(2, 1)], eta=1.0)
    assert iv.domain == "attention"
    plain, flat = {}, {}
    llava.forward(batch, hooks=[("blocks.2.attn.hook_pattern", _recorder(plain, "p"))])
    llava.forward(batch, hooks=[*iv.hooks(llava, batch), ("blocks.2.attn.hook_pattern", _recorder(flat, "p"))])
    p0, p1 = plain["p"][0][0], flat["p"][0][0]  # [H, T, T]
    others = [h for h in range(llava.n_heads) if h != 1]
    assert torch.equal(p0[others], p1[others])
    img = batch.groups[0].image
    q = batch.query_positions[0]
    row0, row1 = p0[1, q, img], p1[1, q, img]
    assert row0.std() > 1e-4 and row1.std() < 1e-6  # uniform over the image keys ...
    assert abs(float(row0.sum() - row1.sum())) < 1e-5  # ... with the image mass kept


# ----------------------------------------------------------------------------------------- validation


def test_bad_heads_raise_clear_errors(llava):
    batch = llava.prepare(noise_image(0), "what color is it?")
    with pytest.raises(LayerIndexError, match="layer 4 .* 4 LM layers"):
        HeadAblation([(4, 0)]).hooks(llava, batch)
    with pytest.raises(LayerIndexError, match="head 7 .* 4 heads"):
        HeadAblation([(0, 7)]).hooks(llava, batch)
    with pytest.raises(LayerIndexError, match="head 9"):
        HeadImageFlatten([(1, 9)]).hooks(llava, batch)
    with pytest.raises(InputError, match="not a \\(layer, head\\) pair"):
        HeadAblation([(0, "a")])
    with pytest.raises(InputError, match="empty"):
        HeadAblation([])
    with pytest.raises(InputError, match="method"):
        HeadAblation([(0, 0)], method="resample")
    with pytest.raises(InputError, match="head_means"):
        HeadAblation([(0, 0)], method="mean")
    with pytest.raises(InputError, match="eta"):
        HeadImageFlatten([(0, 0)], eta=1.5)
    with pytest.raises(LayerIndexError, match="layer 9"):  # before any generation
        head_sweep(llava, _samples(), _attack(), heads=[(9, 0)], progress=False)
    # a lone pair and negative indices are accepted and normalised
    assert HeadAblation((1, 2)).heads == ((1, 2),)
    assert [name for name, _ in HeadAblation([(-1, -1)]).hooks(llava, batch)] == ["blocks.3.attn.hook_z"]


# ----------------------------------------------------------------------------------------- sweep


def test_head_sweep_rows_and_values(llava):
    attack = _attack()
    base = _samples()
    clean_out = generate_answers(llava, base, max_new_tokens=3, progress=False)
    trig_out = generate_answers(llava, triggered_copy(base, attack), max_new_tokens=3, progress=False)
    # answers = the model's own clean outputs and target = its first triggered output, so that the
    # baseline is 1.0 / >= 0.5 and ablations have something to lower
    samples = _samples(answers=clean_out)
    target = trig_out[0]
    frame = head_sweep(llava, samples, attack, target=target, max_new_tokens=3, progress=False)
    n_heads = llava.n_layers * llava.n_heads
    assert len(frame) == 1 + n_heads
    assert list(frame.columns[:9]) == ["layer", "head", "kind", "method", "asr", "clean_acc", "asr_drop",
                                       "clean_drop", "n"]
    baseline = frame.iloc[0]
    assert (baseline['layer'], baseline['head'], baseline['kind']) == (-1, -1, "baseline")
    assert baseline.clean_acc == 1.0 and baseline.asr >= 0.5
    heads = frame.iloc[1:]
    assert sorted(zip(heads['layer'], heads['head'])) == [(l, h) for l in range(4) for h in range(4)]
    assert set(heads.kind) == {"ablate"} and set(heads.method) == {"zero"} and set(frame.n) == {2}
    assert frame[["asr", "clean_acc"]].apply(lambda c: c.between(0, 1)).all().all()
    assert torch.allclose(torch.tensor(heads.asr_drop.values), torch.tensor((baseline.asr - heads.asr).values))
    assert (heads.clean_drop > 0).any()  # some head matters on this model
    # one row against an independent evaluation through generate_answers
    row = heads[(heads['layer'] == 0) & (heads['head'] == 0)].iloc[0]
    iv = HeadAblation([(0, 0)])
    acc = rate(exact_match(a, s.refs) == 1.0
               for a, s in zip(generate_answers(llava, samples, intervention=iv, max_new_tokens=3, progress=False),
                               samples))
    asr = rate(contains_target(a, target) for a in generate_answers(
        llava, triggered_copy(samples, attack), intervention=iv, max_new_tokens=3, progress=False))
    assert (row.clean_acc, row.asr) == (acc, asr)

    flat = head_sweep(llava, samples, attack, kind="flatten", heads=[(1, 0), (2, 2)], target=target,
                      max_new_tokens=3, progress=False)
    assert len(flat) == 3 and list(flat.kind) == ["baseline", "flatten", "flatten"]
    assert flat.iloc[0].asr == baseline.asr and flat.iloc[0].clean_acc == baseline.clean_acc


# ----------------------------------------------------------------------------------------- patching


def test_patch_heads_identities(llava):
    attack = _attack()
    clean = _samples()
    trig = triggered_copy(clean, attack)
    # a run patched with itself does not move
    same = patch_heads(llava, trig, trig, target=attack.target, progress=False)
    assert len(same) == llava.n_layers * llava.n_heads
    assert same.delta.abs().max() == 0.0 and set(same.direction) == {"triggered->triggered"}
    # every head of every layer patched at once: the residual at every TEXT position equals the source's
    # (only image embeddings differ, attention is the only mixing step and all of it is patched), so the
    # answer log-prob is the source's exactly although the two runs differ
    frame = patch_heads(llava, clean, trig, target=attack.target, joint=True, progress=False)
    joint = frame[frame.layer == -1].iloc[0]
    assert set(frame.direction) == {"clean->triggered"}
    assert abs(joint.logprob_source - joint.logprob_unpatched) > 1e-3
    assert abs(joint.logprob_target - joint.logprob_source) < F32_FORWARD_RTOL * max(1.0, abs(joint.logprob_source))
    assert abs(joint.restored - 1.0) < 1e-3
    single = frame[frame.layer >= 0]
    assert (single.delta - (single.logprob_target - single.logprob_unpatched)).abs().max() < 1e-9
    assert single.delta.abs().max() > 1e-4
    # reverse direction by argument order; a custom label; token id instead of text
    tid = first_answer_token(llava, clean[0].prompt, attack.target)
    back = patch_heads(llava, trig, clean, target_token_id=tid, heads=[(2, 1)], direction="trig->clean",
                       progress=False)
    fwd_row = frame[(frame['layer'] == 2) & (frame['head'] == 1)].iloc[0]
    assert back.iloc[0].logprob_unpatched == pytest.approx(fwd_row.logprob_source, rel=F32_FORWARD_RTOL,
                                                                    abs=F32_FORWARD_RTOL)
    assert back.iloc[0].target_token_id == tid and back.iloc[0].direction == "trig->clean"


def test_patch_one_head_matches_hf_o_proj_input_swap(llava, llava_ref):
    attack = _attack()
    clean = _samples()
    trig = triggered_copy(clean, attack)
    frame = patch_heads(llava, clean, trig, target=attack.target, heads=[(1, 3)], per_sample=True,
                        progress=False)
    assert list(frame.sample_id) == ["s0", "s1"]
    d_head = llava.text_config.hidden_size // llava.n_heads
    sl = slice(3 * d_head, 4 * d_head)
    o_proj = llava_ref.model.language_model.layers[1].self_attn.o_proj
    src_batch = llava.prepare([s.image for s in clean], [s.prompt for s in clean])
    dst_batch = llava.prepare([s.image for s in trig], [s.prompt for s in trig])
    cached = {}

    def grab(module, args):
        cached["x"] = args[0].clone()

    h = o_proj.register_forward_pre_hook(grab)
    with torch.no_grad():
        llava_ref(**src_batch.model_inputs(), use_cache=False)
    h.remove()

    def swap(module, args):
        x = args[0].clone()
        x[..., sl] = cached["x"][..., sl]
        return (x,)

    h = o_proj.register_forward_pre_hook(swap)
    try:
        with torch.no_grad():
            logits = llava_ref(**dst_batch.model_inputs(), use_cache=False).logits[:, -1]
    finally:
        h.remove()
    tid = first_answer_token(llava, clean[0].prompt, attack.target)
    expected = logits.log_softmax(-1)[:, tid]
    assert torch.allclose(torch.tensor(frame.logprob_target.values, dtype=torch.float32), expected, rtol=F32_FORWARD_RTOL,
                          atol=F32_FORWARD_RTOL)


def test_patch_heads_rejects_misaligned_pairs(llava):
    clean = _samples()
    other = [clean[1], clean[0]]  # different prompts -> different tokens
    with pytest.raises(InputError, match="identical token sequences"):
        patch_heads(llava, clean, other, target="red", progress=False)
    with pytest.raises(InputError, match="exactly one of"):
        patch_heads(llava, clean, clean, progress=False)
    with pytest.raises(InputError, match="2 source samples but 1"):
        patch_heads(llava, clean, clean[:1], target="red", progress=False)


# ----------------------------------------------------------------------------------------- logit lens


def test_first_answer_token_uses_the_answer_context(llava):
    vocab = llava.tokenizer.get_vocab()
    assert first_answer_token(llava, "what color is it?", "red") == vocab["red"]
    assert first_answer_token(llava, "what color is it?", "Red square") == vocab["red"]  # lower-casing tokenizer
    assert first_answer_token(llava, "what color is it?", "you have been hacked lol") == vocab["you"]
    with pytest.raises(InputError, match="non-empty"):
        first_answer_token(llava, "what color is it?", "  ")


def test_lens_of_the_last_layer_is_the_model_output(llava):
    batch = llava.prepare([noise_image(0), noise_image(1)], PROMPTS, padding_side="right")
    q = batch.query_positions
    assert len(set(q.tolist())) == 2  # right padding: the answer queries sit at different positions
    resid = residual_at_query(llava, batch)  # [B, L, d]
    assert resid.shape == (2, llava.n_layers, llava.text_config.hidden_size)
    logits = llava.forward(batch)[torch.arange(2), q]  # [B, V]
    assert (lens_logits(llava, resid[:, -1]) - logits).abs().max() < 1e-5
    assert (lens_logits(llava, resid[:, 0]) - logits).abs().max() > 1e-2  # earlier layers are not the output


def test_logit_lens_frame(llava):
    attack = _attack()
    samples = _samples()
    iv = HeadAblation([(2, 0), (2, 3)])
    frame = logit_lens(llava, samples, attack, intervention=iv, batch_size=1)
    conditions = ["clean", "triggered", f"triggered+{iv.name}"]
    assert list(frame.condition.unique()) == conditions
    assert len(frame) == len(samples) * llava.n_layers * 3
    assert (frame["diff"] - (frame.p_correct - frame.p_target)).abs().max() < 1e-12
    vocab = llava.tokenizer.get_vocab()
    assert set(frame.correct_token_id) == {vocab["red"], vocab["circle"]}
    assert set(frame.target_token_id) == {vocab["you"]}
    # last layer = the model's own next-token probabilities, in every condition
    trig = triggered_copy(samples, attack)
    for name, items, hooks in [("clean", samples, None), ("triggered", trig, None), (conditions[2], trig, iv)]:
        batch = llava.prepare([s.image for s in items], [s.prompt for s in items])
        probs = llava.forward(batch, hooks=hooks.hooks(llava, batch) if hooks else (),
                              logits_to_keep=1)[:, -1].softmax(-1)
        last = frame[(frame.condition == name) & (frame.layer == llava.n_layers - 1)].sort_values("sample")
        for i, s in enumerate(items):
            assert last.p_correct.iloc[i] == pytest.approx(float(probs[i, vocab[s.answer]]), abs=F32_FORWARD_RTOL)
            assert last.p_target.iloc[i] == pytest.approx(float(probs[i, vocab["you"]]), abs=F32_FORWARD_RTOL)
    # the ablation in layer 2 cannot change layers 0-1 and must change layers 2-3
    a = frame[frame.condition == "triggered"].set_index(["sample", "layer"]).p_correct
    b = frame[frame.condition == conditions[2]].set_index(["sample", "layer"]).p_correct
    early = [(s, l) for s in range(2) for l in (0, 1)]
    assert (a.loc[early] - b.loc[early]).abs().max() == 0.0
    late = [(s, l) for s in range(2) for l in (2, 3)]
    assert (a.loc[late] - b.loc[late]).abs().max() > 0.0
