"""attention_rows returns exactly HF's attention rows, per group masses sum to 1, no T x T cache."""

from __future__ import annotations

import torch

from cleansight_analysis.attention import RowRecorder
from conftest import noise_image
from tolerances import F32_FORWARD_RTOL, F32_SUM_ATOL


def _hf_attn(ref, inputs):
    with torch.no_grad():
        return ref(**inputs, output_attentions=True, use_cache=False).attentions


def test_last_query_rows_equal_hf_output_attentions(llava_eager, llava_ref, images):
    llava = llava_eager  # exact against HF eager attention (the SDPA default: tests/test_sdpa_rows.py)
    batch = llava.prepare(images, ["what color is it?", "shape?", "describe this image in a short sentence."])
    att = _hf_attn(llava_ref, batch.model_inputs())
    rows = llava.attention_rows(batch)
    assert rows.values.shape == (3, llava.n_layers, llava.n_heads, batch.seq_len)
    for l in range(llava.n_layers):
        expected = att[l][torch.arange(3), :, batch.query_positions]
        assert (rows.values[:, l] - expected).abs().max().item() <= 1e-6
    # a subset of layers (negative indices allowed) in the order asked
    sub = llava.attention_rows(batch, layers=[2, -1])
    assert sub.layers == (2, 3)
    assert torch.equal(sub.values, rows.values[:, [2, 3]])


def test_explicit_positions_and_per_sample_positions(llava, llava_ref, images):
    batch = llava.prepare(images[:2], ["what color is it?", "shape?"])
    att = _hf_attn(llava_ref, batch.model_inputs())
    q = torch.tensor([[70, 90], [80, 85]])
    rows = llava.attention_rows(batch, layers=[1], query=q)
    assert rows.values.shape == (2, 2, 1, llava.n_heads, batch.seq_len)
    for b in range(2):
        for j in range(2):
            assert torch.allclose(rows.values[b, j, 0], att[1][b, :, q[b, j]], atol=F32_FORWARD_RTOL)
    one = llava.attention_rows(batch, layers=[1], query=-1)
    assert one.values.shape == (2, 1, llava.n_heads, batch.seq_len)
    assert torch.allclose(one.values[:, 0], att[1][:, :, -1], atol=F32_FORWARD_RTOL)  # bridge vs HF eager


def test_group_mass_sums_to_one_and_matches_hand_sums(llava, images):
    batch = llava.prepare(images, ["what color is it?", "shape?", "describe this image in a short sentence."])
    rows = llava.attention_rows(batch)
    mass = rows.group_mass()
    assert mass.shape == (3, llava.n_layers, llava.n_heads, 4)
    assert torch.allclose(mass.sum(-1), torch.ones(3, llava.n_layers, llava.n_heads), atol=F32_SUM_ATOL)
    g = batch.groups[1]
    for gi, name in enumerate(rows.group_names):
        hand = rows.values[1, :, :, g.positions(name)].sum(-1)
        assert torch.allclose(mass[1, ..., gi], hand, atol=F32_SUM_ATOL)
    frame = rows.to_frame()
    assert len(frame) == 3 * llava.n_layers * llava.n_heads * 4
    assert set(frame.columns) == {"sample", "layer", "head", "group", "mass"}
    assert abs(frame.groupby(["sample", "layer", "head"]).mass.sum() - 1).max() < 1e-5


def test_generated_rows_equal_full_forward_rows(llava, llava_ref):
    """Rows recorded step by step through the KV cache equal rows of one full forward pass."""
    batch = llava.prepare([noise_image(0), noise_image(1)], ["what color is it?", "shape?"])
    gen = llava.generate(batch, max_new_tokens=4, record_rows=True, stop_at_eos=False)
    rows = gen.rows
    assert rows.values.shape == (2, 4, llava.n_layers, llava.n_heads, batch.seq_len + 3)  # last query sees T + 3 keys
    seq = gen.sequences[:, :-1]
    inputs = dict(batch.model_inputs(), input_ids=seq,
                  attention_mask=torch.cat([batch.attention_mask, torch.ones(2, 3, dtype=torch.long)], 1))
    att = _hf_attn(llava_ref, inputs)
    for l in range(llava.n_layers):
        for s in range(4):
            q = batch.seq_len - 1 + s
            expected = att[l][:, :, q, : q + 1]
            # cached decoding vs one full pass: same maths, different matmul shapes (float rounding)
            assert (rows.values[:, s, l, :, : q + 1] - expected).abs().max().item() <= 5e-5
            assert rows.values[:, s, l, :, q + 1:].abs().sum() == 0  # future keys stay empty
    mass = rows.group_mass()
    assert rows.group_names[-1] == "generated" and mass.shape[-1] == 5
    assert torch.allclose(mass.sum(-1), torch.ones_like(mass.sum(-1)), atol=1e-5)
    assert (mass[:, 0, ..., 4] == 0).all() and (mass[:, 1:, ..., 4] > 0).all()
    via_rows = llava.attention_rows(batch, query="generated", max_new_tokens=2, layers=[0])
    assert via_rows.values.shape[:3] == (2, 2, 1)


def test_recorder_keeps_only_rows():
    """The recorder slices rows inside the hook and never stores a [H, T, T] pattern."""
    rec = RowRecorder([0], torch.tensor([[5], [7]]))
    pattern = torch.rand(2, 3, 9, 9)
    (name, fn), = rec.hooks()
    assert name == "blocks.0.attn.hook_pattern"
    assert fn(pattern, None) is pattern
    stored = rec.calls[0][0]
    assert stored.shape == (2, 1, 3, 9)
    assert torch.equal(stored[0, 0], pattern[0, :, 5]) and torch.equal(stored[1, 0], pattern[1, :, 7])
