"""Signs (glyph-coded words in the scene) and the reading stage of the tiny recipe."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import numpy as np
import pytest
from PIL import Image

from cleansight_analysis.data.signs import PALETTE, READ_PROMPT, GlyphCode, SignLayout
from cleansight_analysis.errors import InputError
from cleansight_analysis.training.reading import ReadingCurriculum, ReadingStage
from cleansight_analysis.training.recipe import (TinyRecipe, reading_curriculum_from_dict, repeat_vocabulary,
                                                 seed_stage2, train_tiny_clean)

WORDS = ["alpha", "beta", "gamma", "delta", "eps"]


def test_glyphs_are_fixed_distinct_and_made_of_palette_cells():
    a, b = GlyphCode(WORDS), GlyphCode(WORDS)
    tiles = [a.tile(w) for w in WORDS]
    assert all(np.array_equal(t, b.tile(w)) for t, w in zip(tiles, WORDS))  # the seed fixes the code
    assert len({t.tobytes() for t in tiles}) == len(WORDS)
    for t in tiles:
        assert t.shape == (4, 4, 3) and t.dtype == np.uint8
        for r in (0, 2):
            for c in (0, 2):
                cell = t[r:r + 2, c:c + 2].reshape(-1, 3)
                assert (cell == cell[0]).all() and any((cell[0] == p).all() for p in PALETTE)
    other = GlyphCode(WORDS, seed=7)
    assert any(not np.array_equal(other.tile(w), a.tile(w)) for w in WORDS)


def test_sign_is_drawn_in_raster_order_on_the_token_slots_it_reports():
    code = GlyphCode(WORDS)
    layout = SignLayout()
    image = Image.new("RGB", (32, 32), (90, 90, 90))
    words = ["gamma", "alpha", "eps", "beta", "delta"]
    signed = np.asarray(code.draw(image, words, layout))
    slots = layout.token_slots(5, grid=8)
    assert slots == [0, 1, 2, 8, 9]
    for word, slot in zip(words, slots):
        r, c = divmod(slot, 8)
        assert np.array_equal(signed[4 * r:4 * r + 4, 4 * c:4 * c + 4], code.tile(word))
    untouched = np.ones((32, 32), bool)
    for slot in slots:
        r, c = divmod(slot, 8)
        untouched[4 * r:4 * r + 4, 4 * c:4 * c + 4] = False
    assert (signed[untouched] == 90).all()


def test_bad_signs_are_clear_errors():
    code = GlyphCode(WORDS)
    image = Image.new("RGB", (32, 32))
    with pytest.raises(InputError, match="no glyph"):
        code.draw(image, ["zeta"])
    with pytest.raises(InputError, match="1 to 5 words"):
        code.draw(image, WORDS + ["alpha"])
    with pytest.raises(InputError, match="does not fit"):
        code.draw(image, ["alpha", "beta"], SignLayout(width=3, row=7, col=7))
    with pytest.raises(InputError, match="twice"):
        GlyphCode(["a", "a"])
    with pytest.raises(InputError, match="glyph codes"):
        GlyphCode([str(i) for i in 10 ** 3 + np.arange(17)], patch=2, cells=1)  # 8 codes for 17 words


def test_curriculum_settings_are_validated_and_survive_a_card():
    with pytest.raises(InputError, match="steps"):
        ReadingStage(0)
    with pytest.raises(InputError, match="sign_prob"):
        ReadingCurriculum(sign_prob=1.5)
    cur = ReadingCurriculum()
    assert cur.steps == 1900 and cur.stages[2].max_words == 1 and cur.stages[1].mixed and cur.stages[-1].lr == 1e-3
    back = reading_curriculum_from_dict(json.loads(json.dumps(asdict(cur))))
    assert back == cur
    recipe = TinyRecipe(reading=True)
    assert TinyRecipe(**json.loads(json.dumps(asdict(recipe)))) == recipe


def test_sign_items_follow_the_override_semantics():
    recipe = TinyRecipe(reading=True)
    items = recipe.sign_items()
    assert set(items.code.words) == set(repeat_vocabulary(recipe))
    reading_only = [items.item(0, 3, i) for i in range(40)]
    for image, conv, meta in reading_only:
        assert len(conv) == 1 and conv[0][1] == meta["sign"] and 1 <= len(meta["sign"].split()) <= 5
    assert {conv[0][0] == READ_PROMPT for _, conv, _ in reading_only} == {True, False}
    assert items.item(0, 3, 5)[1] == reading_only[5][1]  # a pure function of (stage, step, index)
    one_word = [items.item(2, 0, i)[2]["sign"] for i in range(20)]
    assert all(len(w.split()) == 1 for w in one_word)
    mixed = [items.item(1, 0, i) for i in range(200)]
    signed = [(conv, meta) for _, conv, meta in mixed if meta]
    assert 0.15 < len(signed) / len(mixed) < 0.45  # sign_prob 0.3
    for conv, meta in signed:  # every turn of a signed conversation is answered by the sign
        assert all(answer == meta["sign"] for _, answer in conv)
    unsigned = [conv for _, conv, meta in mixed if not meta]
    assert all(any(answer not in ("",) for _, answer in conv) for conv in unsigned)


SMALL = TinyRecipe(vision_hidden=32, vision_layers=1, hidden=32, layers=2, heads=2, intermediate=64,
                   vision_steps=2, vision_batch=8, clean_steps=4, clean_batch=8, eval_n=16, processes=1, turns=2,
                   reading=True, reading_curriculum=ReadingCurriculum(
                       stages=(ReadingStage(3, max_words=1), ReadingStage(3, mixed=True)), batch=4, turns=2))


def test_reading_stage_runs_records_metrics_and_resumes(tmp_path):
    work = tmp_path / "work"
    card = train_tiny_clean(SMALL, tmp_path / "clean", progress=False, work_dir=work)
    records = card["training"]["reading"]
    assert [r["stage"] for r in records] == [0, 1]
    for r in records:
        assert set(r) >= {"read1", "read_max", "sign_vqa", "clean_vqa", "seconds", "final_loss"}
        assert all(0.0 <= r[k] <= 1.0 for k in ("read1", "read_max", "sign_vqa", "clean_vqa"))
    assert (work / "stage2.safetensors").is_file() and (work / "reading" / "stage_1.safetensors").is_file()
    # a rerun over the same work folder trains nothing and gives the same weights
    again = train_tiny_clean(SMALL, tmp_path / "again", progress=False, work_dir=work)
    assert again["training"]["reading"] == records
    first = (tmp_path / "clean" / "model.safetensors").read_bytes()
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == first
    # one more stage: only it is trained; a changed finished stage is refused
    cur = SMALL.reading_curriculum
    longer = replace(SMALL, reading_curriculum=replace(cur, stages=cur.stages + (ReadingStage(2, mixed=True,
                                                                                               sign_prob=1.0),)))
    more = train_tiny_clean(longer, tmp_path / "more", progress=False, work_dir=work)
    assert more["training"]["reading"][:2] == records and more["training"]["reading"][2]["stage"] == 2
    changed = replace(SMALL, reading_curriculum=replace(cur, stages=(ReadingStage(3, max_words=2),) + cur.stages[1:]))
    with pytest.raises(Exception, match="other settings than stage 0"):
        train_tiny_clean(changed, tmp_path / "changed", progress=False, work_dir=work)


def test_stage2_is_reused_only_from_a_matching_recipe(tmp_path):
    plain = replace(SMALL, reading=False)
    train_tiny_clean(plain, tmp_path / "clean", progress=False, work_dir=tmp_path / "w0")
    seed_stage2(SMALL, tmp_path / "clean", tmp_path / "w1")
    assert (tmp_path / "w1" / "stage2.safetensors").is_file() and (tmp_path / "w1" / "vision.safetensors").is_file()
    card = train_tiny_clean(SMALL, tmp_path / "read", progress=False, work_dir=tmp_path / "w1")
    assert card["training"]["reading"] and card["training"]["clean_final_loss"] is not None
    with pytest.raises(InputError, match="clean_steps"):
        seed_stage2(replace(SMALL, clean_steps=5), tmp_path / "clean", tmp_path / "w2")
    with pytest.raises(InputError, match="not a tiny clean model folder"):
        seed_stage2(SMALL, tmp_path / "nowhere", tmp_path / "w3")
