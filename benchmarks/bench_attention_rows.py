"""Benchmark: ``attention_rows`` (all layers) and the bridged forward against the untouched HF model with SDPA.

Model: the LLaVA-1.5-shaped benchmark model of ``bench_common.py`` (random weights, 170 M parameters, 576
image tokens; prompts of about 620 tokens in LLaVA-1.5's template).

Every mode runs in its own process (one torch thread); its calls alternate with those of the reference
process ``hf_sdpa``, which stays alive for the whole batch size (paired timing, ``bench_common.py``). Per
call: process CPU time (the ratios and goals use it: the machine is shared), wall-clock time, and memory:
peak RSS during the call (Linux ``VmHWM``, reset through ``/proc/self/clear_refs`` before each call) as
``peak_rss_mib`` (weights included) and ``extra_peak_mib`` = peak minus RSS just before the call, for the
first call (fresh heap) and as the median over the timed calls (steady state). ``stored_kib``: what the
call returns and keeps (the rows).

Modes (``hf_sdpa`` is the reference every ratio is taken against):
    hf_sdpa         the untouched HF model with HF's SDPA attention, ``logits_to_keep=1`` (no bridge loaded)
    forward         bridged model, ``attention="sdpa"`` (default), ``logits_to_keep=1``
    rows            ``HookedLVLM.attention_rows(batch)`` for every layer, query = last prompt token, SDPA
                    (rows from q and k; stops after the last layer's rows: no MLP, norm or unembedding)
    rows_full_pass  the same with ``early_exit=False``: the whole forward runs
    forward_eager   bridged model, ``attention="eager"`` (the bridge's eager attention in every layer)
    rows_eager      ``attention_rows`` with ``attention="eager"`` (rows sliced from the eager pattern)

Goals (issue 14): ``rows`` <= 1.05x the CPU time of ``hf_sdpa``; its extra memory (its ``extra_peak_mib``
minus ``hf_sdpa``'s) <= 5 % of ``hf_sdpa``'s peak RSS.

Run: ``python benchmarks/bench_attention_rows.py`` (or ``make bench``); results go to
``benchmarks/results/attention_rows.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench_common import (Worker, build_model, machine, paired, ratios, reset_peak_rss, rss_kib,  # noqa: E402 - benchmarks/ is on sys.path
                          serve, stats)

MODES = ("hf_sdpa", "forward", "rows", "rows_full_pass", "forward_eager", "rows_eager")
REFERENCE = "hf_sdpa"


def build(batch_size: int):
    import numpy as np
    from PIL import Image

    hf, proc = build_model()
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (336, 336, 3), dtype=np.uint8)) for _ in range(batch_size)]
    prompts = ["describe this image in a short sentence ."] * batch_size
    return hf, proc, images, prompts


def setup(mode: str, batch_size: int):
    """``(call, tokens)`` of one mode: the function one timed request runs."""
    import cleansight_analysis as cs

    hf, proc, images, prompts = build(batch_size)
    if mode == REFERENCE:  # the untouched model: no bridge in this process
        hf.set_attn_implementation("sdpa")
        from cleansight_analysis.inputs.batch import prepare_batch
        from cleansight_analysis.inputs.templates import LLAVA_SYSTEM_PROMPT
        from cleansight_analysis.models.families import family_for

        batch = prepare_batch(proc, family_for("LlavaForConditionalGeneration"), hf.config, images, prompts,
                              chat_template=True, system_prompt=LLAVA_SYSTEM_PROMPT, padding_side="left")
        inputs = batch.model_inputs()
        return (lambda: hf(**inputs, use_cache=False, logits_to_keep=1)), batch.seq_len
    model = cs.load_lvlm(hf, processor=proc, attention="eager" if mode.endswith("_eager") else "sdpa")
    batch = model.prepare(images, prompts)
    inputs = batch.model_inputs()
    if mode in ("forward", "forward_eager"):
        return (lambda: model.hf_model(**inputs, use_cache=False, logits_to_keep=1)), batch.seq_len
    if mode in ("rows", "rows_eager"):
        return (lambda: model.attention_rows(batch)), batch.seq_len
    return (lambda: model.attention_rows(batch, early_exit=False)), batch.seq_len


def serve_mode(mode: str, batch_size: int) -> None:
    import torch

    call, tokens = setup(mode, batch_size)

    def measure() -> dict:
        gc.collect()
        reset_peak_rss()
        before = rss_kib("VmRSS")
        start, cpu = time.perf_counter(), time.process_time()
        with torch.no_grad():
            out = call()
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        peak = rss_kib("VmHWM")
        values = getattr(out, "values", None)
        stored = values.numel() * values.element_size() / 1024 if isinstance(values, torch.Tensor) else 0.0
        return {"cpu_s": round(cpu, 4), "wall_s": round(wall, 4), "extra_peak_mib": round((peak - before) / 1024, 1),
                "peak_rss_mib": round(peak / 1024, 1), "stored_kib": round(stored, 1), "tokens": tokens,
                "threads": torch.get_num_threads()}

    serve(measure)


def record(mode: str, batch: int, first: dict, mine: list[dict], theirs: list[dict]) -> dict:
    cpu, wall = stats(mine, "cpu_s"), stats(mine, "wall_s")
    extra, ref_extra = stats(mine, "extra_peak_mib")[1], stats(theirs, "extra_peak_mib")[1]
    ref_peak = stats(theirs, "peak_rss_mib")[1]
    return {"mode": mode, "batch": batch, "tokens": first["tokens"], "calls": len(mine),
            "best_cpu_s": cpu[0], "median_cpu_s": cpu[1], "best_s": wall[0], "median_s": wall[1],
            "first_call_extra_mib": first["extra_peak_mib"], "extra_peak_mib": extra,
            "peak_rss_mib": stats(mine, "peak_rss_mib")[1], "stored_kib": first["stored_kib"],
            "ref_best_cpu_s": stats(theirs, "cpu_s")[0], "ref_best_s": stats(theirs, "wall_s")[0],
            "ref_extra_peak_mib": ref_extra, "ref_peak_rss_mib": ref_peak,
            "cpu_ratio": ratios(mine, theirs, "cpu_s"), "wall_ratio": ratios(mine, theirs, "wall_s"),
            "extra_mib_vs_hf_sdpa": round(extra - ref_extra, 1),
            "extra_pct_of_hf_sdpa_peak": round(100 * (extra - ref_extra) / ref_peak, 2),
            "threads": first["threads"]}


def _rounds(args: argparse.Namespace, batch: int) -> int:
    """Paired rounds for ``batch``: ``--rounds`` holds one value or one per ``--batch`` entry."""
    reps = args.rounds
    return reps[0] if len(reps) == 1 else reps[args.batch.index(batch)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="*", default=[1, 8])
    parser.add_argument("--rounds", type=int, nargs="*", default=[5, 3],
                        help="paired reference / mode calls per mode: one value, or one per --batch entry")
    parser.add_argument("--modes", nargs="*", default=list(MODES))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "attention_rows.json"))
    parser.add_argument("--serve", nargs=2, metavar=("MODE", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve_mode(args.serve[0], int(args.serve[1]))
        return 0
    from cleansight_analysis.manifest import build_manifest

    before = machine()
    results = []
    for b in args.batch:
        ref = Worker(__file__, [REFERENCE, str(b)])
        ref_first = ref.call()
        ref_calls: list[dict] = []
        for mode in [m for m in args.modes if m != REFERENCE]:
            worker = Worker(__file__, [mode, str(b)])
            first, mine, theirs = paired(ref, worker, _rounds(args, b))
            worker.close()
            ref_calls += theirs
            rec = record(mode, b, first, mine, theirs)
            results.append(rec)
            print(f"batch {b}  {mode:<14} CPU {rec['best_cpu_s']:.3f} s (hf_sdpa {rec['ref_best_cpu_s']:.3f} s): "
                  f"{rec['cpu_ratio']['best']:.3f}x best, {rec['cpu_ratio']['paired_median']:.3f}x paired median; "
                  f"wall {rec['wall_ratio']['best']:.3f}x; extra memory {rec['extra_mib_vs_hf_sdpa']:+.1f} MiB "
                  f"({rec['extra_pct_of_hf_sdpa_peak']:+.2f} % of hf_sdpa's peak RSS); kept {rec['stored_kib']:.0f} KiB "
                  f"({rec['tokens']} tokens)", flush=True)
        ref.close()
        if ref_calls:
            results.append(record(REFERENCE, b, ref_first, ref_calls, ref_calls))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "serve"}
    out.write_text(json.dumps({"manifest": build_manifest(settings=settings),
                               "machine": {"before": before, "after": machine(),
                                           "note": "shared 2-core machine: other jobs ran alongside; ratios use "
                                                   "process CPU time of paired calls"},
                               "goals": {"rows_cpu_ratio": 1.05, "rows_extra_pct_of_hf_sdpa_peak": 5.0},
                               "results": results}, indent=2, default=str) + "\n")
    print("wrote", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
