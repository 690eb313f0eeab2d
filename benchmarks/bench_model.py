"""The LLaVA-1.5-shaped CPU benchmark model shared by the benchmarks, and the machine they ran on.

A randomly initialised (seed 0) LLaVA-1.5-shaped model: CLIP-style tower at 336 px with 14 px patches (576
image tokens, 2 layers of width 64), Llama LM with d_model 1024, 8 layers, 16 heads, MLP 2816, vocabulary
32064 (170 M parameters). LLaVA-1.5's prompt template makes prompts of about 620 tokens.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path


def build_model():
    """``(hf_model, processor)``: the benchmark model with eager attention configured (untouched)."""
    import torch

    from cleansight_analysis.models import tiny

    torch.set_num_threads(1)
    cfg = tiny.tiny_llava_config(image_size=336, patch_size=14, vision_hidden=64, vision_layers=2, hidden=1024,
                                 layers=8, heads=16, vocab_size=32064, initializer_range=0.02)
    cfg.text_config.intermediate_size = 2816
    return tiny.build_tiny_random(cfg, seed=0)


def machine() -> dict:
    """CPU model, cores, memory and load average (the development machine is shared with other jobs)."""
    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")),
               platform.processor())
    mem = -1
    if Path("/proc/meminfo").exists():
        mem = next((int(line.split()[1]) // 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                    if line.startswith("MemTotal:")), -1)
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_total_mib": mem, "loadavg": load}
