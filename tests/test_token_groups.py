"""Token groups are derived from ids: checked against hand-built sequences and HF's own packing."""

from __future__ import annotations

import torch

from cleansight_analysis.inputs.groups import GROUP_NAMES
from conftest import noise_image, solid

N_IMG = 64  # tiny-random-llava: 64 px images, 8 px patches


def rng(a, b):
    return torch.arange(a, b)


def words(model, batch, i, positions):
    return model.tokenizer.convert_ids_to_tokens(batch.input_ids[i, positions].tolist())


def test_single_sample_positions_by_hand(llava):
    b = llava.prepare(solid("red"), "what color is it?", system_prompt=None)
    # <s> user : <image>x64 what color is it ? assistant :
    assert b.input_ids.shape == (1, 3 + N_IMG + 5 + 2)
    g = b.groups[0]
    assert torch.equal(g.system, rng(0, 3))
    assert torch.equal(g.image, rng(3, 3 + N_IMG))
    assert torch.equal(g.prompt, rng(67, 72))
    assert torch.equal(g.template_tail, rng(72, 74))
    assert g.query == 73 and g.seq_len == 74
    assert words(llava, b, 0, g.prompt) == ["what", "color", "is", "it", "?"]
    assert words(llava, b, 0, g.template_tail) == ["assistant", ":"]
    assert (b.input_ids[0, g.image] == llava.image_token_id).all()
    assert g.images[0].grid_shape == (8, 8)
    assert torch.equal(g.images[0].grid.positions, rng(3, 67).reshape(8, 8))


def test_default_system_prompt_is_llava_v1(llava):
    b = llava.prepare(solid("red"), "what color is it?")
    g = b.groups[0]
    sys_words = words(llava, b, 0, g.system)
    assert sys_words[:4] == ["<s>", "a", "chat", "between"] and sys_words[-2:] == ["user", ":"]
    assert words(llava, b, 0, g.prompt) == ["what", "color", "is", "it", "?"]


def test_batch_of_three_with_left_and_right_padding(llava):
    prompts = ["what color is it?", "shape?", "describe this image in a short sentence."]
    lengths = [3 + N_IMG + n + 2 for n in (5, 2, 8)]
    T = max(lengths)
    ims = [noise_image(i) for i in range(3)]
    for side in ("left", "right"):
        b = llava.prepare(ims, prompts, system_prompt=None, padding_side=side)
        assert b.input_ids.shape == (3, T)
        for i, (g, n) in enumerate(zip(b.groups, lengths)):
            start = T - n if side == "left" else 0
            assert int(b.attention_mask[i].sum()) == n
            assert torch.equal(g.system, rng(start, start + 3))
            assert torch.equal(g.image, rng(start + 3, start + 3 + N_IMG))
            assert torch.equal(g.prompt, rng(start + 3 + N_IMG, start + n - 2))
            assert torch.equal(g.template_tail, rng(start + n - 2, start + n))
            assert g.query == start + n - 1
        assert torch.equal(b.query_positions, torch.tensor([g.query for g in b.groups]))
    # every real token is in exactly one group; padding in none
    member = b.groups[1].membership()
    assert torch.equal(member.sum(1), b.attention_mask[1].float())


def test_two_images_in_one_sample(llava):
    b = llava.prepare([[solid("red"), solid("blue")]], ["what color ?"], system_prompt=None)
    g = b.groups[0]
    assert len(g.images) == 2
    assert torch.equal(g.images[0].positions, rng(3, 67))
    assert torch.equal(g.images[1].positions, rng(67, 131))
    assert torch.equal(g.prompt, rng(131, 134)) and torch.equal(g.template_tail, rng(134, 136))
    assert b.pixel_values.shape[0] == 2 and b.images_per_sample == [2]


def test_placeholders_inside_prompt_and_no_template(llava):
    b = llava.prepare([[solid("red"), solid("blue")]], ["red <image> or blue <image> ?"], system_prompt=None)
    g = b.groups[0]
    # <s> user : red <img> or blue <img> ? assistant :
    assert torch.equal(g.system, rng(0, 3))
    assert words(llava, b, 0, g.prompt) == ["red", "or", "blue", "?"]
    assert torch.equal(g.images[0].positions, rng(4, 68)) and torch.equal(g.images[1].positions, rng(70, 134))
    raw = llava.prepare(solid("red"), "<image> what color ?", chat_template=False)
    g = raw.groups[0]
    assert torch.equal(g.system, rng(0, 1)) and torch.equal(g.image, rng(1, 65))
    assert torch.equal(g.prompt, rng(65, 68)) and g.template_tail.numel() == 0 and g.query == 67


def test_llava_next_grid_matches_hf_packing(llava_next):
    """Tag every vision feature with (tile, row, col), pack it with HF, read it back through our grids."""
    from transformers.models.llava_next.modeling_llava_next import (
        get_anyres_image_grid_shape, image_size_to_num_patches)

    cfg = llava_next.config
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    ims = [noise_image(5, (64, 30)), noise_image(6, (40, 70)), noise_image(7, (33, 33))]
    b = llava_next.prepare([ims], ["what color ?"], system_prompt=None)
    g = b.groups[0]
    sizes = b.image_sizes.tolist()
    feats = []
    for size in sizes:
        n = image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        p, i, j = torch.meshgrid(torch.arange(n), torch.arange(side), torch.arange(side), indexing="ij")
        feats.append(torch.stack([p, i, j], -1).reshape(n, side * side, 3).float())
    packed, lens = llava_next.hf_model.model.pack_image_features(
        feats, torch.tensor(sizes), "default", image_newline=torch.full((3,), -1.0))
    assert [im.positions.numel() for im in g.images] == lens.tolist()
    assert int((b.input_ids[0] == llava_next.image_token_id).sum()) == int(lens.sum())
    for im, seq, size in zip(g.images, packed, sizes):
        local = lambda pos: seq[pos - im.positions[0]]  # noqa: E731
        base, high = im.grids
        assert base.name == "base" and high.name == "highres"
        bp = local(base.positions)  # [side, side, 3]
        ii, jj = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        assert (bp[..., 0] == 0).all() and torch.equal(bp[..., 1], ii.float()) and torch.equal(bp[..., 2], jj.float())
        _, tiles_w = get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        hp = local(high.positions)  # [rows, cols, 3]
        tile = hp[..., 0].long() - 1
        R = (tile // tiles_w) * side + hp[..., 1].long()
        C = (tile % tiles_w) * side + hp[..., 2].long()
        r, c = torch.meshgrid(torch.arange(high.shape[0]), torch.arange(high.shape[1]), indexing="ij")
        assert (tile >= 0).all()
        assert ((R - r) == (R - r)[0, 0]).all() and ((C - c) == (C - c)[0, 0]).all()  # a contiguous crop
        assert (local(im.extras["newline"]) == -1).all() and im.extras["newline"].numel() == high.shape[0]
    # a wide image gets a wide grid, a tall one a tall grid
    assert g.images[0].grid_shape[1] > g.images[0].grid_shape[0]
    assert g.images[1].grid_shape[0] > g.images[1].grid_shape[1]


def test_paint_lays_scores_on_the_grid(llava):
    b = llava.prepare(solid("red"), "what color is it?", system_prompt=None)
    im = b.groups[0].images[0]
    scores = torch.arange(b.seq_len, dtype=torch.float)
    assert torch.equal(im.paint(scores), scores[3:67].reshape(8, 8))
    assert im.paint(torch.stack([scores, -scores])).shape == (2, 8, 8)


def test_group_names_order():
    assert GROUP_NAMES == ("system", "image", "prompt", "template_tail")


def test_sentencepiece_style_tokenizer_groups():
    """A LLaMA-like BPE tokenizer (Metaspace '▁' pieces, sub-word splits) gets the same group boundaries."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    import cleansight_analysis as cs
    from cleansight_analysis.inputs import LLAVA_SYSTEM_PROMPT
    from cleansight_analysis.models import tiny

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    core.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    corpus = [LLAVA_SYSTEM_PROMPT + " USER: what color is the shape in this image? ASSISTANT: a red circle."] * 20
    core.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<unk>"]))
    core.add_special_tokens(["<image>"])
    core.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})
    cfg = tiny.tiny_llava_config()
    cfg.image_token_id = tok.convert_tokens_to_ids("<image>")
    hf, _ = tiny.build_tiny_random(cfg)
    model = cs.load_lvlm(hf, processor=tiny.processor_for(cfg, tok))
    b = model.prepare([solid("red"), solid("blue")], ["what color is the shape?", "describe it"])
    for i, instruction in enumerate(["what color is the shape?", "describe it"]):
        g = b.groups[i]
        pieces = lambda name: tok.convert_ids_to_tokens(b.input_ids[i, g.positions(name)].tolist())  # noqa: E731
        assert pieces("template_tail") == ["▁ASSISTANT:"]
        assert pieces("system")[0] == "<s>" and "▁USER:" in pieces("system")
        # the instruction's pieces (after the "\n" that follows the image) spell the instruction
        assert tok.convert_tokens_to_string(pieces("prompt")[1:]).strip() == instruction
        assert g.image.numel() == N_IMG and g.query == b.seq_len - 1
