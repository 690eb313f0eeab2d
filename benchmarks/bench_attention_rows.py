"""Benchmark: cost of ``attention_rows`` (all layers) against a plain forward pass.

Model: a randomly initialised LLaVA-1.5-shaped model: CLIP-style tower at 336 px with 14 px patches
(576 image tokens), Llama LM with d_model 1024, 8 layers, 16 heads, vocabulary 32064. The prompt is
LLaVA-1.5's template (system prompt, ``USER: <image>\\n... ASSISTANT:``), about 620 tokens.

Every (mode, batch size) runs in a fresh subprocess. Memory: ``extra`` = peak RSS during a call minus
RSS just before it (Linux ``VmHWM`` reset through ``/proc/self/clear_refs`` before each call), for the
first call (fresh heap) and as the median over the timed calls (steady state, the allocator warm).
``stored_kib`` is what the call returns and keeps (the rows). Time is the best and the median of
``--repeats`` calls after the first.

Modes:
    forward         bridged model, ``logits_to_keep=1`` (what attention_rows also computes)
    forward_full    bridged model, full logits (the default HF call)
    hf_sdpa         the untouched HF model with its default SDPA attention, ``logits_to_keep=1``
    rows            ``HookedLVLM.attention_rows(batch)`` for every layer, query = last prompt token
                    (stops after the last layer's attention pattern: no MLP, norm or unembedding after it)
    rows_full_pass  the same with ``early_exit=False``: the whole forward runs, hooks included

Run: ``python benchmarks/bench_attention_rows.py`` (or ``make bench``); results go to
``benchmarks/results/attention_rows.json``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODES = ("forward", "forward_full", "hf_sdpa", "rows", "rows_full_pass")


def _rss_kib(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def build(batch_size: int):
    import numpy as np
    import torch
    from PIL import Image

    import cleansight_analysis as cs
    from cleansight_analysis.models import tiny

    torch.set_num_threads(1)
    cfg = tiny.tiny_llava_config(image_size=336, patch_size=14, vision_hidden=64, vision_layers=2, hidden=1024,
                                 layers=8, heads=16, vocab_size=32064, initializer_range=0.02)
    cfg.text_config.intermediate_size = 2816
    hf, proc = tiny.build_tiny_random(cfg, seed=0)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (336, 336, 3), dtype=np.uint8)) for _ in range(batch_size)]
    prompts = ["describe this image in a short sentence ."] * batch_size
    return hf, proc, images, prompts, cs, torch


def run_one(mode: str, batch_size: int, repeats: int) -> dict:
    hf, proc, images, prompts, cs, torch = build(batch_size)
    params = sum(p.numel() for p in hf.parameters())
    if mode == "hf_sdpa":
        ref = copy.deepcopy(hf)
        ref.set_attn_implementation("sdpa")
    model = cs.load_lvlm(hf, processor=proc)
    batch = model.prepare(images, prompts)
    inputs = batch.model_inputs()
    if mode == "forward":
        call = lambda: model.hf_model(**inputs, use_cache=False, logits_to_keep=1)  # noqa: E731
    elif mode == "forward_full":
        call = lambda: model.hf_model(**inputs, use_cache=False)  # noqa: E731
    elif mode == "hf_sdpa":
        call = lambda: ref(**inputs, use_cache=False, logits_to_keep=1)  # noqa: E731
    elif mode == "rows":
        call = lambda: model.attention_rows(batch)  # noqa: E731
    else:
        call = lambda: model.attention_rows(batch, early_exit=False)  # noqa: E731
    def measured():
        gc.collect()
        _reset_peak()
        before = _rss_kib("VmRSS")
        start = time.perf_counter()
        out = call()
        seconds = time.perf_counter() - start
        extra = (_rss_kib("VmHWM") - before) / 1024
        stored = out.values.numel() * out.values.element_size() / 1024 if isinstance(out, cs.AttentionRows) else 0.0
        return seconds, extra, stored

    with torch.no_grad():
        _, first_extra, stored = measured()
        runs = [measured() for _ in range(repeats)]
    times = sorted(r[0] for r in runs)
    extras = sorted(r[1] for r in runs)
    return {"mode": mode, "batch": batch_size, "tokens": batch.seq_len, "params_m": round(params / 1e6, 1),
            "best_s": round(times[0], 4), "median_s": round(times[len(times) // 2], 4),
            "first_call_extra_mib": round(first_extra, 1), "extra_peak_mib": round(extras[len(extras) // 2], 1),
            "stored_kib": round(stored, 1), "threads": torch.get_num_threads()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="*", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--modes", nargs="*", default=list(MODES))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "attention_rows.json"))
    parser.add_argument("--worker", nargs=2, metavar=("MODE", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_one(args.worker[0], int(args.worker[1]), args.repeats)))
        return 0
    from cleansight_analysis.manifest import build_manifest

    results = []
    for b in args.batch:
        for mode in args.modes:
            proc = subprocess.run([sys.executable, __file__, "--worker", mode, str(b), "--repeats", str(args.repeats)],
                                  capture_output=True, text=True, check=True)
            rec = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append(rec)
            print(f"batch {b}  {mode:<14} best {rec['best_s']:.3f} s  median {rec['median_s']:.3f} s  "
                  f"extra peak {rec['extra_peak_mib']:.0f} MiB (first call {rec['first_call_extra_mib']:.0f})  "
                  f"kept {rec['stored_kib']:.0f} KiB  ({rec['tokens']} tokens)", flush=True)
    summary = []
    for b in args.batch:
        by = {r["mode"]: r for r in results if r["batch"] == b}
        for mode in ("rows", "rows_full_pass"):
            if mode in by and "forward" in by:
                summary.append({
                    "batch": b, "mode": mode,
                    "time_ratio_vs_forward": round(by[mode]["best_s"] / by["forward"]["best_s"], 3),
                    "extra_mib_per_sample_vs_forward": round(
                        (by[mode]["extra_peak_mib"] - by["forward"]["extra_peak_mib"]) / b, 1),
                })
    for s in summary:
        print(f"batch {s['batch']}: {s['mode']} / forward time = {s['time_ratio_vs_forward']:.3f}x, "
              f"extra memory = {s['extra_mib_per_sample_vs_forward']:+.1f} MiB per sample")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"manifest": build_manifest(settings=vars(args)), "results": results,
                               "summary": summary}, indent=2, default=str) + "\n")
    print("wrote", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
