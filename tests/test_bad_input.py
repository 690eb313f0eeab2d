"""Each kind of bad input gets one clear error that names the problem (or a documented conversion)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cleansight_analysis.errors import CleanSightError, InputError, LayerIndexError
from cleansight_analysis.inputs import to_rgb_image
from conftest import solid


def test_image_modes_are_converted_to_rgb(llava):
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 0))  # fully transparent -> white
    assert to_rgb_image(rgba).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb_image(Image.new("L", (10, 20), 77)).getpixel((3, 3)) == (77, 77, 77)
    assert to_rgb_image(Image.new("P", (10, 20))).mode == "RGB"
    assert to_rgb_image(np.full((8, 9, 3), 0.5)).getpixel((0, 0)) == (128, 128, 128)
    assert to_rgb_image(torch.ones(3, 8, 8)).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb_image(np.zeros((8, 9), dtype=np.uint8)).size == (9, 8)
    gray = llava.prepare(Image.new("L", (64, 64), 128), "what color is it?")
    rgb = llava.prepare(Image.new("RGB", (64, 64), (128, 128, 128)), "what color is it?")
    assert torch.equal(gray.pixel_values, rgb.pixel_values)


@pytest.mark.parametrize("bad, message", [
    (np.full((8, 8, 3), 3.0), r"\[0, 1\]"),
    (np.zeros((8, 8, 5), dtype=np.uint8), "not an image"),
    (np.zeros((8, 8), dtype=np.int64), "dtype"),
    (Image.new("RGB", (1, 64)), "at least 2 px"),
    (Image.new("RGB", (2, 400)), "aspect ratio"),
    ("no/such/file.png", "does not exist"),
    (12, "expected a PIL image"),
    (np.full((4, 4), np.nan), "NaN"),
])
def test_bad_images_are_rejected_by_name(llava, bad, message):
    with pytest.raises(InputError, match=message) as err:
        llava.prepare([solid("red"), bad], ["what color?", "what color?"])
    assert "images[1][0]" in str(err.value)


def test_prompt_errors(llava):
    with pytest.raises(InputError, match="placeholder"):
        llava.prepare(solid("red"), "what color is it?", chat_template=False)
    with pytest.raises(InputError, match="placeholder"):
        llava.prepare([[solid("red"), solid("blue")]], ["<image> what color?"])
    with pytest.raises(InputError, match="empty"):
        llava.prepare(solid("red"), "   ")
    with pytest.raises(InputError, match="string"):
        llava.prepare(solid("red"), [3])


def test_batch_shape_errors(llava):
    with pytest.raises(InputError, match="empty batch"):
        llava.prepare([], [])
    with pytest.raises(InputError, match="2 image entries for 3 prompts"):
        llava.prepare([solid("red"), solid("blue")], ["a", "b", "c"])
    with pytest.raises(InputError, match="no image"):
        llava.prepare([[]], ["what color?"])
    with pytest.raises(InputError, match="expected a Batch"):
        llava.attention_rows({"input_ids": torch.zeros(1, 3)})


def test_layer_and_query_errors(llava):
    batch = llava.prepare([solid("red"), solid("blue")], ["what color is it?", "shape?"])
    for bad in (4, -5, [0, 7]):
        with pytest.raises(LayerIndexError, match="out of range .* 4 LM layers"):
            llava.attention_rows(batch, layers=bad)
    with pytest.raises(InputError, match="padding"):
        llava.attention_rows(batch, query=0)  # sample 1 is left-padded
    with pytest.raises(InputError, match="outside the sequence"):
        llava.attention_rows(batch, query=batch.seq_len)
    with pytest.raises(InputError, match="query must be"):
        llava.attention_rows(batch, query="first")
    right = llava.prepare([solid("red"), solid("blue")], ["what color is it?", "shape?"], padding_side="right")
    with pytest.raises(InputError, match="left padding"):
        llava.generate(right, max_new_tokens=2)
    with pytest.raises(InputError, match="max_new_tokens"):
        llava.generate(batch, max_new_tokens=0)


def test_errors_share_one_base_class():
    assert issubclass(InputError, CleanSightError) and issubclass(LayerIndexError, CleanSightError)
    assert issubclass(CleanSightError, ValueError)
