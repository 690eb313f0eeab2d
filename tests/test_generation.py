"""Hooked greedy generation: equals HF without hooks; hooks act at prefill and every decode step."""

from __future__ import annotations

import torch

from conftest import noise_image

MOST_NEGATIVE = torch.finfo(torch.float32).min


def _batch(model):
    return model.prepare([noise_image(0), noise_image(1, (40, 90)), noise_image(2)],
                         ["what color is it?", "shape?", "describe this image in a short sentence."])


def test_no_hooks_equals_hf_greedy_generate(llava, llava_ref):
    batch = _batch(llava)
    gen = llava.generate(batch, max_new_tokens=8, stop_at_eos=False)
    with torch.no_grad():
        ref = llava_ref.generate(**batch.model_inputs(), max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(gen.sequences, ref)
    assert gen.tokens.shape == (3, 8) and len(gen.texts) == 3


def test_no_hooks_equals_hf_greedy_generate_llava_next(llava_next, llava_next_ref):
    batch = llava_next.prepare([noise_image(3, (64, 30)), noise_image(4)], ["what color is it?", "shape?"])
    gen = llava_next.generate(batch, max_new_tokens=6, stop_at_eos=False)
    with torch.no_grad():
        ref = llava_next_ref.generate(**batch.model_inputs(), max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(gen.sequences, ref)


def test_image_key_mask_acts_at_prefill_and_every_step(llava):
    batch = _batch(llava)
    image_cols = [g.image for g in batch.groups]
    calls = []

    def hide_image(scores, hook):  # [B, H, Q, K]
        calls.append(tuple(scores.shape))
        scores = scores.clone()
        for b, cols in enumerate(image_cols):
            scores[b, :, :, cols] = MOST_NEGATIVE
        return scores

    plain = llava.generate(batch, max_new_tokens=6, stop_at_eos=False)
    masked = llava.generate(batch, max_new_tokens=6, stop_at_eos=False,
                            hooks=llava.lm_hooks("attn_scores", hide_image))
    assert not torch.equal(plain.tokens, masked.tokens)
    T = batch.seq_len
    expected = [(3, 4, T, T)] * 4 + [(3, 4, 1, T + s) for s in range(1, 6) for _ in range(4)]
    assert calls == expected
    # the mask really removed the image: rows recorded under it put no mass on image keys
    rows = llava.attention_rows(batch, hooks=llava.lm_hooks("attn_scores", hide_image))
    assert rows.group_mass()[..., 1].max() < 1e-12
    # masking the image is the same as an image-free prompt only if the image matters: logits differ
    a = llava.forward(batch, logits_to_keep=1)
    b = llava.forward(batch, logits_to_keep=1, hooks=llava.lm_hooks("attn_scores", hide_image))
    assert (a - b).abs().max() > 1e-2


def test_hook_z_ablation_is_on_o_proj_input(llava_eager, llava_ref):
    """Zeroing head 2 of layer 1 at hook_z equals zeroing that head's slice of o_proj's input in HF."""
    llava = llava_eager  # against HF eager (SDPA against HF SDPA: tests/test_sdpa_rows.py)
    batch = _batch(llava)
    d_head = llava.text_config.hidden_size // llava.n_heads

    def zero_head(z, hook):  # [B, T, H, d_head]
        assert z.shape[2:] == (llava.n_heads, d_head)
        z = z.clone()
        z[:, :, 2] = 0
        return z

    ours = llava.forward(batch, hooks=[("blocks.1.attn.hook_z", zero_head)])

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
    assert (ours - ref).abs().max().item() <= 1e-5
    assert (ours - llava.forward(batch)).abs().max().item() > 1e-3
