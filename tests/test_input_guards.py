"""Guards on inputs the model cannot meaningfully take: high-bit-depth images, decompression bombs,
prompts longer than the model's positions, and non-finite (NaN / inf) numbers inside the model."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import cleansight_analysis as cs
from cleansight_analysis.errors import InputError, NumericalError
from cleansight_analysis.inputs import to_rgb_image
from cleansight_analysis.inputs.images import MAX_PIXELS
from conftest import noise_image, solid


# ---------------------------------------------------------------------------- high bit depth
def test_16bit_png_is_scaled_by_bit_depth_not_clipped(tmp_path):
    values = (np.arange(64 * 256).reshape(64, 256) * 4).astype(np.uint16)  # 0 .. 65532 gradient
    path = tmp_path / "gradient16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I;16")
    rgb = np.asarray(to_rgb_image(path)).astype(np.int64)
    expected = np.round(values / 257.0).astype(np.int64)
    assert rgb.shape == (64, 256, 3)
    assert np.abs(rgb - expected[..., None]).max() <= 1
    assert (rgb == 255).mean() < 0.01  # naive conversion clips 99.6 % of the pixels to 255


def test_other_high_depth_inputs_are_scaled():
    values = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)
    expected = np.round(values / 257.0)
    for image in (values, Image.fromarray(values.astype(np.int32))):  # uint16 array, PIL mode "I"
        out = np.asarray(to_rgb_image(image))[..., 0]
        assert np.abs(out - expected).max() <= 1
    floats = Image.fromarray(np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32))
    assert floats.mode == "F"
    assert np.asarray(to_rgb_image(floats))[..., 0].max() == 255
    with pytest.raises(InputError, match=r"mode 'F'.*\[0, 1\]"):
        to_rgb_image(Image.fromarray(np.full((8, 8), 300.0, dtype=np.float32)))
    with pytest.raises(InputError, match="negative"):
        to_rgb_image(Image.fromarray(np.full((8, 8), -5, dtype=np.int32)))


# ---------------------------------------------------------------------------- decompression bomb
def _forged_png(path, width, height):
    """A tiny valid PNG whose IHDR claims ``width x height`` (CRC recomputed)."""
    Image.new("RGB", (2, 2), "red").save(path)
    data = bytearray(path.read_bytes())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("size", [(20000, 20000), (11000, 10000)])  # over PIL's error limit / only over ours
def test_decompression_bomb_is_an_input_error(tmp_path, size):
    path = _forged_png(tmp_path / "bomb.png", *size)
    assert path.stat().st_size < 3000
    with pytest.raises(InputError, match=f"{MAX_PIXELS:,} pixels") as err:
        to_rgb_image(path, "images[0][0]")
    message = str(err.value)
    assert "bomb.png" in message and f"{size[0] * size[1]:,} pixels" in message and "images[0][0]" in message


# ---------------------------------------------------------------------------- prompt length
def _prompt_of(llava, n_positions):
    """A prompt whose batch is exactly ``n_positions`` long."""
    base = llava.prepare(solid("red"), "what").seq_len
    prompt = " ".join(["what"] * (n_positions - base + 1))
    batch = llava.prepare(solid("red"), prompt)
    assert batch.seq_len == n_positions
    return prompt, batch


def test_prompt_longer_than_the_model_is_rejected(llava):
    limit = llava.text_config.max_position_embeddings
    assert limit == 2048
    with pytest.raises(InputError, match=r"3,\d\d\d tokens \(64 image \+ .*at most 2,048 positions"):
        llava.prepare(solid("red"), "what " * 3000)
    _, fits = _prompt_of(llava, limit)  # exactly at the limit: accepted
    with pytest.raises(InputError, match="at most 2,048"):  # a too-long batch built by hand
        llava.forward(fits.__class__(**{**fits.__dict__, "input_ids": torch.cat([fits.input_ids] * 2, 1),
                                         "attention_mask": torch.cat([fits.attention_mask] * 2, 1)}))


def test_generation_past_the_model_positions_is_rejected(llava):
    _, batch = _prompt_of(llava, 2046)
    with pytest.raises(InputError, match=r"2,046 positions \+ max_new_tokens=3 needs 2,049 .*max_new_tokens <= 2"):
        llava.generate(batch, max_new_tokens=3)
    gen = llava.generate(batch, max_new_tokens=2, stop_at_eos=False)
    assert gen.tokens.shape == (1, 2)


# ---------------------------------------------------------------------------- non-finite numbers
@pytest.fixture(scope="module")
def broken():
    """A tiny LLaVA whose layer-2 query projection is NaN."""
    model = cs.load_lvlm("tiny-random-llava")
    (weight,) = [p for n, p in model.hf_model.named_parameters() if "layers.2." in n and "q_proj" in n]
    with torch.no_grad():
        weight.fill_(float("nan"))
    return model


@pytest.fixture(scope="module")
def padded(broken):
    return broken.prepare([noise_image(0), noise_image(1, (48, 80))],
                          ["what color is it?", "describe this image in a short sentence ."])


def test_nan_weights_raise_from_attention_rows(broken, padded):
    assert padded.attention_mask.sum(1).min() < padded.seq_len  # left padding present
    for layers in (None, [3], [2]):
        with pytest.raises(NumericalError, match=r"first non-finite: layer 2 \(attention rows\)"):
            broken.attention_rows(padded, layers=layers)
    rows = broken.attention_rows(padded, layers=[0, 1])  # rows before the broken layer are valid
    assert torch.isfinite(rows.values).all()


def test_nan_weights_raise_from_generate_and_forward(broken, padded):
    with pytest.raises(NumericalError, match=r"logits during generation .*layer 2"):
        broken.generate(padded, max_new_tokens=2)
    with pytest.raises(NumericalError, match=r"layer 2"):
        broken.attention_rows(padded, query="generated", max_new_tokens=2)
    with pytest.raises(NumericalError, match=r"^logits .*layer 2"):
        broken.forward(padded)


def test_padding_does_not_trip_the_guards(llava):
    for side in ("right", "left"):
        batch = llava.prepare([noise_image(0), noise_image(1, (48, 80))],
                              ["what?", "describe this image in a short sentence ."], padding_side=side)
        assert batch.attention_mask.sum(1).min() < batch.seq_len
        assert torch.isfinite(llava.forward(batch)).all()
        llava.attention_rows(batch)
    llava.generate(batch, max_new_tokens=2)  # left padded
