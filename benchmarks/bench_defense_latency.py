"""Benchmark: generation latency of the undefended, CleanSight and masked model against the untouched HF model.

Model: the LLaVA-1.5-shaped benchmark model of ``bench_model.py`` (random weights, 170 M parameters, prompts
of about 620 tokens). Inputs: the first ``batch`` clean test scenes of the synthetic world. Every (mode,
batch size) runs in a fresh subprocess, one after the other, one torch thread: the batch is prepared once,
one untimed warm-up call, then ``--repeats`` timed calls of greedy generation (``--max-new-tokens``, no
stop at EOS, so every mode decodes the same number of steps); best and median kept, as process CPU time
(one thread: the work done, robust to other jobs on the shared machine; the ratios and goals use it) and as
wall-clock time.

CleanSight is calibrated once (not timed) in the parent process on ``--val`` clean calibration scenes
(detection layers ``--layers``, ``tau="auto"``, every other setting default) and loaded by the workers.

Modes (``hf_sdpa`` is the reference every ratio is taken against):
    hf_sdpa              the untouched HF model with HF's SDPA attention: ``hf_model.generate`` (no bridge)
    undefended           the bridged model (``attention="sdpa"``): ``HookedLVLM.generate``
    cleansight           CleanSight's one-pass ``generate`` (rows of the detection layers read inside SDPA,
                         detection at ``l_e``, Omega masked in flight for flagged samples)
    cleansight_flagged   the same with every sample flagged (``gamma = -inf``): Omega masked in ``l_e``, every
                         later layer at prefill and every layer at every decode step
    mask_all_layers      ``generate`` with a key mask (every 4th image token) in every layer, at prefill and at
                         every decode step (``key_mask_hooks(model, mask, from_layer=0)``)
    cleansight_all_layers  CleanSight with ``mask_scope="all_layers"``, every sample flagged: a detection pass
                         that stops at ``l_e``, then one generation masking Omega in every layer (two passes)
    *_eager              the same on ``attention="eager"`` (the bridge's eager attention in every layer)
    authors_style        the reference code's approach: one sample at a time, eager attention, the rows of every
                         layer for every decoding query recorded (``generate(..., record_rows=True)``)

Goals (issue 14): ``cleansight`` <= 1.05x and ``mask_all_layers`` <= 1.15x the (best CPU) time of ``hf_sdpa``.

Run: ``python benchmarks/bench_defense_latency.py``; results go to ``benchmarks/results/defense_latency.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench_model import build_model, machine  # noqa: E402 - the benchmarks folder is on sys.path

MODES = ("hf_sdpa", "undefended", "cleansight", "cleansight_flagged", "mask_all_layers", "cleansight_all_layers",
         "undefended_eager", "cleansight_eager", "mask_all_layers_eager", "authors_style")
REFERENCE = "hf_sdpa"
GOALS = {"cleansight": 1.05, "mask_all_layers": 1.15}


def _samples(n: int):
    from cleansight_analysis.evaluation.runner import image_of, synthetic_samples

    chosen = synthetic_samples("test", n)
    return [image_of(s) for s in chosen], [s.prompt for s in chosen]


def run_one(mode: str, batch_size: int, repeats: int, max_new_tokens: int, calibration: str | None) -> dict:
    import torch
    from transformers import GenerationConfig

    import cleansight_analysis as cs
    from cleansight_analysis.defenses.cleansight import CleanSight
    from cleansight_analysis.detection import key_mask_hooks, positions_mask

    hf, proc = build_model()
    images, prompts = _samples(batch_size)
    base = mode.removesuffix("_eager")
    if mode == REFERENCE:
        hf.set_attn_implementation("sdpa")
        from cleansight_analysis.inputs.batch import prepare_batch
        from cleansight_analysis.inputs.templates import LLAVA_SYSTEM_PROMPT
        from cleansight_analysis.models.families import family_for

        batch = prepare_batch(proc, family_for("LlavaForConditionalGeneration"), hf.config, images, prompts,
                              chat_template=True, system_prompt=LLAVA_SYSTEM_PROMPT, padding_side="left")
        tok = proc.tokenizer
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=None,
                                  pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
        inputs = batch.model_inputs()
        call = lambda: hf.generate(**inputs, generation_config=config, use_cache=True)  # noqa: E731
    else:
        eager = mode.endswith("_eager") or mode == "authors_style"
        model = cs.load_lvlm(hf, processor=proc, attention="eager" if eager else "sdpa")
        batch = model.prepare(images, prompts)
        if base == "authors_style":
            singles = [model.prepare([im], [p]) for im, p in zip(images, prompts)]

            def call():
                return [model.generate(one, max_new_tokens=max_new_tokens, record_rows=True, stop_at_eos=False)
                        for one in singles][-1]
        elif base == "undefended":
            call = lambda: model.generate(batch, max_new_tokens=max_new_tokens, stop_at_eos=False)  # noqa: E731
        elif base == "mask_all_layers":
            mask = positions_mask([g.image[::4] for g in batch.groups], batch.seq_len)
            hooks = key_mask_hooks(model, mask, from_layer=0)
            call = lambda: model.generate(batch, max_new_tokens=max_new_tokens, hooks=hooks,  # noqa: E731
                                          stop_at_eos=False)
        else:
            defense = CleanSight.load(calibration, model=model)
            if base in ("cleansight_flagged", "cleansight_all_layers"):
                defense.calibration.gamma = float("-inf")
            if base == "cleansight_all_layers":
                defense.config = replace(defense.config, mask_scope="all_layers")
            # CleanSight's generate stops a sample at EOS like every defense; the random model never emits it
            # in these few steps (checked: the step count is recorded and compared below)
            call = lambda: defense.generate(model, batch, max_new_tokens=max_new_tokens)  # noqa: E731

    with torch.no_grad():
        out = call()  # warm-up
        times, cpus = [], []
        for _ in range(repeats):
            start, cpu = time.perf_counter(), time.process_time()
            call()
            times.append(time.perf_counter() - start)
            cpus.append(time.process_time() - cpu)
    times.sort()
    cpus.sort()
    info: dict = {}
    if hasattr(out, "flags"):
        info = {"flagged": int(out.flags.sum()), "pruned_mean": float(sum(int(p.numel()) for p in out.pruned) /
                                                                     len(out.pruned))}
    steps = _steps(out, batch.seq_len)
    return {"mode": mode, "batch": batch_size, "tokens": batch.seq_len, "new_tokens": steps,
            "best_cpu_s": round(cpus[0], 4), "median_cpu_s": round(cpus[len(cpus) // 2], 4),
            "best_s": round(times[0], 4), "median_s": round(times[len(times) // 2], 4),
            "all_cpu_s": [round(t, 4) for t in cpus], "all_s": [round(t, 4) for t in times],
            "threads": torch.get_num_threads(), **info}


def _steps(out, prompt_len: int) -> int:
    """Decoding steps the call ran (the longest answer)."""
    if hasattr(out, "info"):
        return int(out.info["tokens"].shape[1])
    if hasattr(out, "tokens"):
        return int(out.tokens.shape[1])
    return int(out.shape[1] - prompt_len)


def calibrate(path: Path, val: int, layers: list[int], batch_size: int) -> dict:
    """Fit CleanSight on the benchmark model (``attention="sdpa"``) and save it to ``path``."""
    import cleansight_analysis as cs
    from cleansight_analysis.defenses.cleansight import CleanSight, CleanSightConfig
    from cleansight_analysis.evaluation.runner import synthetic_samples

    hf, proc = build_model()
    model = cs.load_lvlm(hf, processor=proc)
    start = time.perf_counter()
    defense = CleanSight(config=CleanSightConfig(layers=layers, batch_size=batch_size)).fit(
        model, synthetic_samples("calibration", val))
    seconds = time.perf_counter() - start
    defense.save(path)
    return {"fit_s": round(seconds, 2), **{k: v for k, v in defense.to_dict().items() if k != "name"}}


def _repeats(args: argparse.Namespace, batch: int) -> int:
    """Timed calls for ``batch``: ``--repeats`` holds one value or one per ``--batch`` entry."""
    reps = args.repeats
    return reps[0] if len(reps) == 1 else reps[args.batch.index(batch)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="*", default=[1, 8])
    parser.add_argument("--repeats", type=int, nargs="*", default=[5, 3],
                        help="timed calls per mode: one value, or one per --batch entry")
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--val", type=int, default=16, help="clean calibration scenes for CleanSight")
    parser.add_argument("--layers", type=int, nargs="*", default=[5, 6, 7], help="CleanSight detection layers")
    parser.add_argument("--modes", nargs="*", default=list(MODES))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "defense_latency.json"))
    parser.add_argument("--worker", nargs=3, metavar=("MODE", "BATCH", "CALIBRATION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        mode, batch, cal = args.worker
        print(json.dumps(run_one(mode, int(batch), args.repeats[0], args.max_new_tokens, cal)))
        return 0
    from cleansight_analysis.manifest import build_manifest

    before = machine()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        cal = Path(tmp) / "cleansight.json"
        fitted = calibrate(cal, args.val, args.layers, max(args.batch))
        print(f"CleanSight fitted in {fitted['fit_s']:.1f} s (layers {args.layers}, {args.val} clean scenes)",
              flush=True)
        for b in args.batch:
            for mode in args.modes:
                cmd = [sys.executable, __file__, "--worker", mode, str(b), str(cal), "--repeats", str(_repeats(args, b)),
                       "--max-new-tokens", str(args.max_new_tokens)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise RuntimeError(f"worker {mode} batch {b} failed:\n{proc.stderr[-3000:]}")
                rec = json.loads(proc.stdout.strip().splitlines()[-1])
                results.append(rec)
                print(f"batch {b}  {mode:<22} CPU best {rec['best_cpu_s']:.3f} s  wall best {rec['best_s']:.3f} s  "
                      f"median {rec['median_s']:.3f} s  "
                      f"({rec['new_tokens']} new tokens, {rec['tokens']} prompt tokens)", flush=True)
    summary = []
    for b in args.batch:
        by = {r["mode"]: r for r in results if r["batch"] == b}
        ref = by.get(REFERENCE)
        if ref is None:
            continue
        for mode, rec in by.items():
            if mode == REFERENCE:
                continue
            row = {"batch": b, "mode": mode, "cpu_ratio_best": round(rec["best_cpu_s"] / ref["best_cpu_s"], 3),
                   "cpu_ratio_median": round(rec["median_cpu_s"] / ref["median_cpu_s"], 3),
                   "time_ratio_best": round(rec["best_s"] / ref["best_s"], 3),
                   "time_ratio_median": round(rec["median_s"] / ref["median_s"], 3),
                   "same_steps": rec["new_tokens"] == ref["new_tokens"]}
            if mode in GOALS:
                row["goal"] = GOALS[mode]
                row["goal_met"] = row["cpu_ratio_best"] <= GOALS[mode]
            summary.append(row)
            print(f"batch {b}: {mode:<22} / hf_sdpa CPU time = {row['cpu_ratio_best']:.3f}x best "
                  f"({row['cpu_ratio_median']:.3f}x median; wall {row['time_ratio_best']:.3f}x best)"
                  + (f" (goal <= {GOALS[mode]})" if mode in GOALS else ""))
    settings = {k: v for k, v in vars(args).items() if k != "worker"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"manifest": build_manifest(settings=settings),
                               "machine": {"before": before, "after": machine(),
                                           "note": "shared 2-core machine: other jobs ran alongside"},
                               "cleansight": fitted, "goals": GOALS, "results": results, "summary": summary},
                              indent=2, default=str) + "\n")
    print("wrote", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
