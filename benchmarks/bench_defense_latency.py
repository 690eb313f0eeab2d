"""Benchmark: generation latency of the undefended, CleanSight and masked model against the untouched HF model.

Model: the LLaVA-1.5-shaped benchmark model of ``bench_common.py`` (random weights, 170 M parameters, prompts
of about 620 tokens). Inputs: the first ``batch`` clean test scenes of the synthetic world. Every mode runs
in its own process (one torch thread) with the batch prepared once; its calls of greedy generation
(``--max-new-tokens``, no stop at EOS, so every mode decodes the same number of steps) alternate with
those of the reference process ``hf_sdpa``, which stays alive for the whole batch size (paired timing,
``bench_common.py``). The first call of each mode is a warm-up; ratios use process CPU time (the machine
is shared); wall-clock time is recorded too.

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
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench_common import Worker, build_model, machine, paired, ratios, serve, stats  # noqa: E402 - benchmarks/ is on sys.path

MODES = ("hf_sdpa", "undefended", "cleansight", "cleansight_flagged", "mask_all_layers", "cleansight_all_layers",
         "undefended_eager", "cleansight_eager", "mask_all_layers_eager", "authors_style")
REFERENCE = "hf_sdpa"
GOALS = {"cleansight": 1.05, "mask_all_layers": 1.15}


def _samples(n: int):
    from cleansight_analysis.evaluation.runner import image_of, synthetic_samples

    chosen = synthetic_samples("test", n)
    return [image_of(s) for s in chosen], [s.prompt for s in chosen]


def setup(mode: str, batch_size: int, max_new_tokens: int, calibration: str | None):
    """``(call, prompt tokens)`` of one mode: the function one timed request runs."""
    from transformers import GenerationConfig

    import cleansight_analysis as cs
    from cleansight_analysis.defenses.cleansight import CleanSight
    from cleansight_analysis.detection import key_mask_hooks, positions_mask

    hf, proc = build_model()
    images, prompts = _samples(batch_size)
    base = mode.removesuffix("_eager")
    if mode == REFERENCE:  # the untouched model: no bridge in this process
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
        return (lambda: hf.generate(**inputs, generation_config=config, use_cache=True)), batch.seq_len
    eager = mode.endswith("_eager") or mode == "authors_style"
    model = cs.load_lvlm(hf, processor=proc, attention="eager" if eager else "sdpa")
    batch = model.prepare(images, prompts)
    if base == "authors_style":
        singles = [model.prepare([im], [p]) for im, p in zip(images, prompts)]
        return (lambda: [model.generate(one, max_new_tokens=max_new_tokens, record_rows=True, stop_at_eos=False)
                         for one in singles][-1]), batch.seq_len
    if base == "undefended":
        return (lambda: model.generate(batch, max_new_tokens=max_new_tokens, stop_at_eos=False)), batch.seq_len
    if base == "mask_all_layers":
        hooks = key_mask_hooks(model, positions_mask([g.image[::4] for g in batch.groups], batch.seq_len), from_layer=0)
        return (lambda: model.generate(batch, max_new_tokens=max_new_tokens, hooks=hooks,
                                       stop_at_eos=False)), batch.seq_len
    defense = CleanSight.load(calibration, model=model)
    if base in ("cleansight_flagged", "cleansight_all_layers"):
        defense.calibration.gamma = float("-inf")
    if base == "cleansight_all_layers":
        defense.config = replace(defense.config, mask_scope="all_layers")
    # CleanSight's generate stops a sample at EOS like every defense; the step count is recorded and compared
    return (lambda: defense.generate(model, batch, max_new_tokens=max_new_tokens)), batch.seq_len


def serve_mode(mode: str, batch_size: int, max_new_tokens: int, calibration: str | None) -> None:
    import torch

    call, tokens = setup(mode, batch_size, max_new_tokens, calibration)

    def measure() -> dict:
        start, cpu = time.perf_counter(), time.process_time()
        with torch.no_grad():
            out = call()
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        info: dict = {"cpu_s": round(cpu, 4), "wall_s": round(wall, 4), "tokens": tokens,
                      "new_tokens": _steps(out, tokens), "threads": torch.get_num_threads()}
        if hasattr(out, "flags"):
            info["flagged"] = int(out.flags.sum())
            info["pruned_mean"] = round(sum(int(p.numel()) for p in out.pruned) / len(out.pruned), 1)
        return info

    serve(measure)


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


def _rounds(args: argparse.Namespace, batch: int) -> int:
    """Paired rounds for ``batch``: ``--rounds`` holds one value or one per ``--batch`` entry."""
    reps = args.rounds
    return reps[0] if len(reps) == 1 else reps[args.batch.index(batch)]


def record(mode: str, batch: int, first: dict, mine: list[dict], theirs: list[dict]) -> dict:
    cpu, wall = stats(mine, "cpu_s"), stats(mine, "wall_s")
    rec = {"mode": mode, "batch": batch, "tokens": first["tokens"], "new_tokens": first["new_tokens"],
           "calls": len(mine), "best_cpu_s": cpu[0], "median_cpu_s": cpu[1], "best_s": wall[0], "median_s": wall[1],
           "ref_best_cpu_s": stats(theirs, "cpu_s")[0], "ref_best_s": stats(theirs, "wall_s")[0],
           "cpu_ratio": ratios(mine, theirs, "cpu_s"), "wall_ratio": ratios(mine, theirs, "wall_s"),
           "same_steps": first["new_tokens"] == theirs[0]["new_tokens"], "threads": first["threads"]}
    for key in ("flagged", "pruned_mean"):
        if key in first:
            rec[key] = first[key]
    if mode in GOALS:
        rec["goal"] = GOALS[mode]
        rec["goal_met"] = rec["cpu_ratio"]["best"] <= GOALS[mode]
    return rec


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="*", default=[1, 8])
    parser.add_argument("--rounds", type=int, nargs="*", default=[5, 3],
                        help="paired reference / mode calls per mode: one value, or one per --batch entry")
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--val", type=int, default=16, help="clean calibration scenes for CleanSight")
    parser.add_argument("--layers", type=int, nargs="*", default=[5, 6, 7], help="CleanSight detection layers")
    parser.add_argument("--modes", nargs="*", default=list(MODES))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "defense_latency.json"))
    parser.add_argument("--serve", nargs=3, metavar=("MODE", "BATCH", "CALIBRATION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        mode, batch, cal = args.serve
        serve_mode(mode, int(batch), args.max_new_tokens, cal)
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
            common = [str(b), str(cal), "--max-new-tokens", str(args.max_new_tokens)]
            ref = Worker(__file__, [REFERENCE, *common])
            ref_first = ref.call()
            ref_calls: list[dict] = []
            for mode in [m for m in args.modes if m != REFERENCE]:
                worker = Worker(__file__, [mode, *common])
                first, mine, theirs = paired(ref, worker, _rounds(args, b))
                worker.close()
                ref_calls += theirs
                rec = record(mode, b, first, mine, theirs)
                results.append(rec)
                goal = f" (goal <= {GOALS[mode]})" if mode in GOALS else ""
                print(f"batch {b}  {mode:<22} CPU {rec['best_cpu_s']:.3f} s (hf_sdpa {rec['ref_best_cpu_s']:.3f} s): "
                      f"{rec['cpu_ratio']['best']:.3f}x best, {rec['cpu_ratio']['paired_median']:.3f}x paired median"
                      f"{goal}; wall {rec['wall_ratio']['best']:.3f}x ({rec['new_tokens']} new tokens, "
                      f"{rec['tokens']} prompt tokens)", flush=True)
            ref.close()
            if ref_calls:
                results.append(record(REFERENCE, b, ref_first, ref_calls, ref_calls))
    settings = {k: v for k, v in vars(args).items() if k != "serve"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"manifest": build_manifest(settings=settings),
                               "machine": {"before": before, "after": machine(),
                                           "note": "shared 2-core machine: other jobs ran alongside; ratios use "
                                                   "process CPU time of paired calls"},
                               "cleansight": fitted, "goals": GOALS, "results": results},
                              indent=2, default=str) + "\n")
    print("wrote", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
