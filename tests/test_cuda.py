"""GPU smoke check (skipped without CUDA): bf16 on the GPU agrees with float32 on the CPU."""

from __future__ import annotations

import pytest
import torch

import cleansight_analysis as cs
from conftest import noise_image

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_cuda_bf16_matches_cpu_float32(llava):
    gpu = cs.load_lvlm("tiny-random-llava", device="cuda")
    assert gpu.device.type == "cuda" and gpu.dtype == torch.bfloat16
    batch = gpu.prepare([noise_image(0), noise_image(1)], ["what color is it?", "shape?"])
    rows_gpu = gpu.attention_rows(batch).group_mass()
    rows_cpu = llava.attention_rows(batch).group_mass()
    assert (rows_gpu - rows_cpu).abs().max() < 0.05
    out = gpu.generate(batch, max_new_tokens=4)
    assert out.tokens.shape == (2, 4)
