"""Shared fixtures: tiny random LLaVA / LLaVA-NeXT models built from configs (CPU, offline)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import cleansight_analysis as cs  # noqa: E402
from cleansight_analysis.models import tiny  # noqa: E402

torch.set_num_threads(1)


def solid(color, size=(64, 64)):
    return Image.new("RGB", size, color)


def noise_image(seed: int, size=(64, 64)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="session")
def llava():
    """HookedLVLM over the registry's tiny-random-llava."""
    return cs.load_lvlm("tiny-random-llava")


@pytest.fixture(scope="session")
def llava_ref():
    """An untouched HF copy of the same tiny LLaVA (same seed, eager attention)."""
    model, _ = tiny.tiny_random_llava()
    return model


@pytest.fixture(scope="session")
def llava_next():
    return cs.load_lvlm("tiny-random-llava-next")


@pytest.fixture(scope="session")
def llava_eager():
    """The same tiny LLaVA with the bridge's eager attention in every layer (``attention="eager"``): the
    path whose logits and attention equal HF eager attention to 1e-5, padding positions included (the
    default SDPA path equals HF's SDPA model instead; tests/test_sdpa_rows.py)."""
    return cs.load_lvlm("tiny-random-llava", attention="eager")


@pytest.fixture(scope="session")
def llava_next_eager():
    return cs.load_lvlm("tiny-random-llava-next", attention="eager")


@pytest.fixture(scope="session")
def llava_next_ref():
    model, _ = tiny.tiny_random_llava_next()
    return model


@pytest.fixture()
def images():
    return [noise_image(0), noise_image(1, (48, 80)), noise_image(2, (90, 40))]
