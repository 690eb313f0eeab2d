"""The hooked model computes exactly what HF eager attention computes (logits and attention)."""

from __future__ import annotations

import torch

from cleansight_analysis.models import tiny
from conftest import noise_image


def _ref_outputs(ref, batch):
    with torch.no_grad():
        return ref(**batch.model_inputs(), output_attentions=True, use_cache=False)


def test_registry_builder_is_deterministic():
    a, _ = tiny.tiny_random_llava()
    b, _ = tiny.tiny_random_llava()
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)


def test_llava_logits_and_attention_match_hf_eager(llava_eager, llava_ref, images):
    llava = llava_eager  # the eager path (the SDPA default equals HF's SDPA model: tests/test_sdpa_rows.py)
    batch = llava.prepare(images, ["What color is it?", "Describe this image.", "shape?"])
    ref = _ref_outputs(llava_ref, batch)
    logits = llava.forward(batch)
    assert logits.shape == ref.logits.shape
    assert (logits - ref.logits).abs().max().item() <= 1e-5
    # every layer, every head, every query row and key
    seen = {}
    hooks = [(f"blocks.{l}.attn.hook_pattern", lambda p, hook: seen.__setitem__(hook.name, p.clone()))
             for l in range(llava.n_layers)]
    llava.forward(batch, hooks=hooks)
    assert len(seen) == llava.n_layers
    for l in range(llava.n_layers):
        ours = seen[f"blocks.{l}.attn.hook_pattern"]
        assert (ours - ref.attentions[l]).abs().max().item() <= 1e-5
    # the attention is far from uniform (else these checks would be weak)
    assert ref.attentions[1].max() > 0.5


def test_llava_next_gqa_logits_and_attention_match_hf_eager(llava_next_eager, llava_next_ref):
    llava_next = llava_next_eager  # the eager path, as above
    assert llava_next.n_kv_heads < llava_next.n_heads
    ims = [noise_image(3, (64, 30)), noise_image(4, (40, 70))]
    batch = llava_next.prepare(ims, ["What color is it?", "Describe this image in a short sentence."])
    ref = _ref_outputs(llava_next_ref, batch)
    assert (llava_next.forward(batch) - ref.logits).abs().max().item() <= 1e-5
    rows = llava_next.attention_rows(batch)
    for l in range(llava_next.n_layers):
        expected = ref.attentions[l][torch.arange(2), :, batch.query_positions]  # [B, H, K]
        assert (rows.values[:, l] - expected).abs().max().item() <= 1e-5
