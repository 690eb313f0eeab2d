"""Benchmark: ``attention_rows`` (all layers) and the bridged forward against the untouched HF model with SDPA.

Model: the LLaVA-1.5-shaped benchmark model of ``bench_model.py`` (random weights, 170 M parameters, 576
image tokens; prompts of about 620 tokens in LLaVA-1.5's template).

Every (mode, batch size) runs in a fresh subprocess, one after the other (one torch thread). Memory: peak RSS
during a call (Linux ``VmHWM``, reset through ``/proc/self/clear_refs`` before each call): ``peak_rss_mib``
(weights included) and ``extra_peak_mib`` = peak minus RSS just before the call, for the first call (fresh
heap) and as the median over the timed calls (steady state). ``stored_kib`` is what the call returns and
keeps (the rows). Time: best and median of ``--repeats`` calls after the first, as process CPU time (one
thread: the work done, robust to other jobs on the shared machine; the ratios and goals use it) and as
wall-clock time.

Modes (``hf_sdpa`` is the reference every ratio is taken against):
    hf_sdpa         the untouched HF model with HF's SDPA attention, ``logits_to_keep=1`` (no bridge loaded)
    forward         bridged model, ``attention="sdpa"`` (default), ``logits_to_keep=1``
    rows            ``HookedLVLM.attention_rows(batch)`` for every layer, query = last prompt token, SDPA
                    (rows from q and k; stops after the last layer's rows: no MLP, norm or unembedding)
    rows_full_pass  the same with ``early_exit=False``: the whole forward runs
    forward_eager   bridged model, ``attention="eager"`` (the bridge's eager attention in every layer)
    rows_eager      ``attention_rows`` with ``attention="eager"`` (rows sliced from the eager pattern)

Goals (issue 14): ``rows`` <= 1.05x the (best CPU) time of ``hf_sdpa``; its extra memory (its ``extra_peak_mib``
minus ``hf_sdpa``'s) <= 5 % of ``hf_sdpa``'s peak RSS.

Run: ``python benchmarks/bench_attention_rows.py`` (or ``make bench``); results go to
``benchmarks/results/attention_rows.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench_model import build_model, machine  # noqa: E402 - the benchmarks folder is on sys.path

MODES = ("hf_sdpa", "forward", "rows", "rows_full_pass", "forward_eager", "rows_eager")
REFERENCE = "hf_sdpa"


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
    from PIL import Image

    hf, proc = build_model()
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (336, 336, 3), dtype=np.uint8)) for _ in range(batch_size)]
    prompts = ["describe this image in a short sentence ."] * batch_size
    return hf, proc, images, prompts


def run_one(mode: str, batch_size: int, repeats: int) -> dict:
    import torch

    import cleansight_analysis as cs

    hf, proc, images, prompts = build(batch_size)
    params = sum(p.numel() for p in hf.parameters())
    if mode == REFERENCE:  # the untouched model: no bridge in this process
        hf.set_attn_implementation("sdpa")
        from cleansight_analysis.inputs.batch import prepare_batch
        from cleansight_analysis.inputs.templates import LLAVA_SYSTEM_PROMPT
        from cleansight_analysis.models.families import family_for

        batch = prepare_batch(proc, family_for("LlavaForConditionalGeneration"), hf.config, images, prompts,
                              chat_template=True, system_prompt=LLAVA_SYSTEM_PROMPT, padding_side="left")
        inputs = batch.model_inputs()
        call = lambda: hf(**inputs, use_cache=False, logits_to_keep=1)  # noqa: E731
    else:
        model = cs.load_lvlm(hf, processor=proc, attention="eager" if mode.endswith("_eager") else "sdpa")
        batch = model.prepare(images, prompts)
        inputs = batch.model_inputs()
        if mode in ("forward", "forward_eager"):
            call = lambda: model.hf_model(**inputs, use_cache=False, logits_to_keep=1)  # noqa: E731
        elif mode in ("rows", "rows_eager"):
            call = lambda: model.attention_rows(batch)  # noqa: E731
        else:
            call = lambda: model.attention_rows(batch, early_exit=False)  # noqa: E731

    def measured():
        gc.collect()
        _reset_peak()
        before = _rss_kib("VmRSS")
        start, cpu = time.perf_counter(), time.process_time()
        out = call()
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        peak = _rss_kib("VmHWM")
        values = getattr(out, "values", None)
        stored = values.numel() * values.element_size() / 1024 if isinstance(values, torch.Tensor) else 0.0
        return seconds, (peak - before) / 1024, peak / 1024, stored, cpu

    with torch.no_grad():
        _, first_extra, _, stored, _ = measured()
        runs = [measured() for _ in range(repeats)]
    times = sorted(r[0] for r in runs)
    extras = sorted(r[1] for r in runs)
    peaks = sorted(r[2] for r in runs)
    cpus = sorted(r[4] for r in runs)
    return {"mode": mode, "batch": batch_size, "tokens": batch.seq_len, "params_m": round(params / 1e6, 1),
            "best_cpu_s": round(cpus[0], 4), "median_cpu_s": round(cpus[len(cpus) // 2], 4),
            "best_s": round(times[0], 4), "median_s": round(times[len(times) // 2], 4),
            "first_call_extra_mib": round(first_extra, 1), "extra_peak_mib": round(extras[len(extras) // 2], 1),
            "peak_rss_mib": round(peaks[len(peaks) // 2], 1), "stored_kib": round(stored, 1),
            "threads": torch.get_num_threads()}


def summarise(results: list[dict], batches: list[int]) -> list[dict]:
    summary = []
    for b in batches:
        by = {r["mode"]: r for r in results if r["batch"] == b}
        ref = by.get(REFERENCE)
        if ref is None:
            continue
        for mode, rec in by.items():
            if mode == REFERENCE:
                continue
            extra = rec["extra_peak_mib"] - ref["extra_peak_mib"]
            summary.append({
                "batch": b, "mode": mode,
                "cpu_ratio_best": round(rec["best_cpu_s"] / ref["best_cpu_s"], 3),
                "cpu_ratio_median": round(rec["median_cpu_s"] / ref["median_cpu_s"], 3),
                "time_ratio_best": round(rec["best_s"] / ref["best_s"], 3),
                "time_ratio_median": round(rec["median_s"] / ref["median_s"], 3),
                "extra_mib_vs_hf_sdpa": round(extra, 1),
                "extra_pct_of_hf_sdpa_peak": round(100 * extra / ref["peak_rss_mib"], 2),
            })
    return summary


def _repeats(args: argparse.Namespace, batch: int) -> int:
    """Timed calls for ``batch``: ``--repeats`` holds one value or one per ``--batch`` entry."""
    reps = args.repeats
    return reps[0] if len(reps) == 1 else reps[args.batch.index(batch)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="*", default=[1, 8])
    parser.add_argument("--repeats", type=int, nargs="*", default=[5, 3],
                        help="timed calls per mode: one value, or one per --batch entry")
    parser.add_argument("--modes", nargs="*", default=list(MODES))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "attention_rows.json"))
    parser.add_argument("--worker", nargs=2, metavar=("MODE", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_one(args.worker[0], int(args.worker[1]), args.repeats[0])))
        return 0
    from cleansight_analysis.manifest import build_manifest

    before = machine()
    results = []
    for b in args.batch:
        for mode in args.modes:
            proc = subprocess.run([sys.executable, __file__, "--worker", mode, str(b), "--repeats", str(_repeats(args, b))],
                                  capture_output=True, text=True, check=True)
            rec = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append(rec)
            print(f"batch {b}  {mode:<14} CPU best {rec['best_cpu_s']:.3f} s  wall best {rec['best_s']:.3f} s  "
                  f"median {rec['median_s']:.3f} s  "
                  f"extra peak {rec['extra_peak_mib']:.0f} MiB (first call {rec['first_call_extra_mib']:.0f})  "
                  f"peak RSS {rec['peak_rss_mib']:.0f} MiB  kept {rec['stored_kib']:.0f} KiB  ({rec['tokens']} tokens)",
                  flush=True)
    summary = summarise(results, args.batch)
    for s in summary:
        print(f"batch {s['batch']}: {s['mode']:<14} / hf_sdpa CPU time = {s['cpu_ratio_best']:.3f}x best "
              f"({s['cpu_ratio_median']:.3f}x median; wall {s['time_ratio_best']:.3f}x best); extra memory {s['extra_mib_vs_hf_sdpa']:+.1f} MiB "
              f"({s['extra_pct_of_hf_sdpa_peak']:+.2f} % of hf_sdpa's peak RSS)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"manifest": build_manifest(settings=vars(args)),
                               "machine": {"before": before, "after": machine(),
                                           "note": "shared 2-core machine: other jobs ran alongside"},
                               "goals": {"rows_time_ratio": 1.05, "rows_extra_pct_of_hf_sdpa_peak": 5.0},
                               "results": results, "summary": summary}, indent=2, default=str) + "\n")
    print("wrote", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
