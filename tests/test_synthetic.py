"""The synthetic scene world: deterministic, answerable, labelled, and fully covered by the tiny vocabulary."""

from __future__ import annotations

import numpy as np
import pytest

from cleansight_analysis.data.synthetic import COLORS, SHAPES, SceneConfig, SyntheticWorld
from cleansight_analysis.errors import InputError


def test_scenes_are_deterministic_and_splits_differ():
    a, b = SyntheticWorld(0), SyntheticWorld(0)
    s1, s2 = a.scene("train", 5), b.scene("train", 5)
    assert np.array_equal(np.asarray(s1.image), np.asarray(s2.image)) and s1.objects == s2.objects
    assert not np.array_equal(np.asarray(a.scene("test", 5).image), np.asarray(s1.image))
    assert not np.array_equal(np.asarray(SyntheticWorld(1).scene("train", 5).image), np.asarray(s1.image))
    assert s1.image.size == (32, 32) and s1.image.mode == "RGB"


def test_questions_agree_with_the_scene():
    world = SyntheticWorld(0)
    for i in range(40):
        scene = world.scene("train", i)
        names = {o.name for o in scene.objects}
        for qtype, q, a in world.questions(scene):
            if qtype == "color":
                shape = q.split()[-2]
                assert [o.color for o in scene.objects if o.shape == shape] == [a]
            elif qtype == "shape":
                color = q.split()[-3]
                assert [o.shape for o in scene.objects if o.color == color] == [a]
            elif qtype == "count":
                assert a == ["zero", "one", "two", "three", "four"][len(scene.objects)]
            elif qtype == "exists":
                asked = " ".join(q.split()[3:5])
                assert (asked in names) == (a == "yes")
            elif qtype == "position":
                obj = next(o for o in scene.objects if o.name == " ".join(q.split()[2:4]))
                assert (obj.center[0] < 16) == (a == "left")
            elif qtype == "background":
                assert a == scene.background


def test_patch_labels_mark_objects_where_they_are():
    world = SyntheticWorld(0)
    scene = world.scene("train", 3)
    labels = scene.patch_labels(4)
    assert labels["color"].shape == (8, 8)
    for obj in scene.objects:
        cx, cy = obj.center
        r, c = int(cy // 4), int(cx // 4)
        if obj.shape != "ring":  # a ring's centre is its hole
            assert labels["color"][r, c] == 1 + list(COLORS).index(obj.color)
            assert labels["shape"][r, c] == 1 + list(SHAPES).index(obj.shape)
    assert labels["color"][labels["shape"] == 0].sum() == 0


def test_samples_balance_types_and_captions():
    world = SyntheticWorld(0)
    samples = world.samples("test", 60)
    types = {s.meta["question_type"] for s in samples}
    assert types == {"color", "shape", "count", "exists", "position", "background"}
    assert all(s.prompt.endswith("Answer the question using a single word or phrase.") for s in samples)
    caps = world.samples("test", 5, task="caption")
    assert all(c.task == "caption" and c.answer.endswith("background .") for c in caps)
    with pytest.raises(InputError, match="split"):
        world.scene("dev", 0)
    with pytest.raises(InputError, match="question types"):
        world.samples("test", 3, question_types=["colour"])
    with pytest.raises(InputError, match="too small"):
        SceneConfig(size=8)


def test_tiny_vocabulary_covers_every_generated_word():
    from cleansight_analysis.training.recipe import TinyRecipe, tiny_tokenizer

    tok = tiny_tokenizer(TinyRecipe())
    world = TinyRecipe().world()
    texts = []
    for scene, conv in world.conversations("train", range(50), turns=4, caption_prob=1.0):
        texts += [p + " " + a for p, a in conv]
    ids = tok(" ".join(texts))["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.unk_token_id not in tok("you have been hacked lol")["input_ids"]
