"""load_lvlm: registry names, local folders, in-memory models; unsupported and unsafe sources refused."""

from __future__ import annotations

import socket

import pytest
import torch

import cleansight_analysis as cs
from cleansight_analysis.errors import ModelSourceError, UnsupportedModelError
from cleansight_analysis.models import tiny
from conftest import noise_image


@pytest.fixture()
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _logits(model):
    batch = model.prepare(noise_image(0), "what color is it?")
    return model.forward(batch, logits_to_keep=1)


def test_registry_lists_tiny_models():
    names = [m.name for m in cs.registered_models()]
    assert "tiny-random-llava" in names and "tiny-random-llava-next" in names


def test_local_folder_round_trip(tmp_path, no_network):
    hf, proc = tiny.tiny_random_llava()
    hf.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    from_folder = cs.load_lvlm(tmp_path)
    from_registry = cs.load_lvlm("tiny-random-llava")
    assert from_folder.family.architecture == "LlavaForConditionalGeneration"
    # same weights; tensors loaded from safetensors may take other BLAS paths (~1e-6 rounding)
    assert (_logits(from_folder) - _logits(from_registry)).abs().max() <= 1e-5
    half = cs.load_lvlm(str(tmp_path), dtype="bfloat16")
    assert half.dtype == torch.bfloat16
    assert half.prepare(noise_image(1), "shape?").input_ids.shape[0] == 1


def test_llava_next_folder_round_trip(tmp_path, no_network):
    hf, proc = tiny.tiny_random_llava_next()
    hf.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    model = cs.load_lvlm(tmp_path)
    assert model.family.name == "llava_next"
    batch = model.prepare(noise_image(2, (64, 30)), "what color is it?")
    assert batch.groups[0].images[0].grids[-1].name == "highres"


def test_in_memory_model_needs_processor(no_network):
    hf, proc = tiny.tiny_random_llava()
    with pytest.raises(ModelSourceError, match="processor"):
        cs.load_lvlm(hf)
    model = cs.load_lvlm(hf, processor=proc, name="mine")
    assert model.name == "mine" and model.n_layers == 4


def test_unknown_source_lists_registered_models(no_network):
    with pytest.raises(ModelSourceError, match="tiny-random-llava"):
        cs.load_lvlm("llava-hf/llava-1.5-7b-hf")
    with pytest.raises(ModelSourceError, match="HF model"):
        cs.load_lvlm(42)


def test_folder_without_weights_and_pickled_weights(tmp_path):
    hf, _ = tiny.tiny_random_llava()
    hf.config.save_pretrained(tmp_path)
    with pytest.raises(ModelSourceError, match="no weights"):
        cs.load_lvlm(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelSourceError, match="pickled weights"):
        cs.load_lvlm(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelSourceError, match="config.json"):
        cs.load_lvlm(empty)


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    text_only = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(UnsupportedModelError) as err:
        cs.load_lvlm(text_only, processor=object())
    msg = str(err.value)
    assert "LlamaForCausalLM" in msg and "LlavaForConditionalGeneration" in msg and "LlavaNextForConditionalGeneration" in msg
    text_only.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError):
        cs.load_lvlm(tmp_path)


def test_bad_device_and_dtype():
    with pytest.raises(ModelSourceError, match="dtype"):
        cs.load_lvlm("tiny-random-llava", dtype="int8")
    with pytest.raises(ModelSourceError, match="device"):
        cs.load_lvlm("tiny-random-llava", device="tpu:0")


def test_no_torchvision_installed():
    import importlib.util

    assert importlib.util.find_spec("torchvision") is None
