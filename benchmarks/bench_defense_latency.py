"""Benchmark: CleanSight's generation latency relative to the undefended model (goal: ratio <= 1.10).

What is timed, on the same clean test inputs and in the same process (after one untimed warm-up each):

- ``undefended``: ``NoDefense`` prepare + greedy generate, batch 8;
- ``cleansight``: a fitted CleanSight's prepare + generate (detection and pruning inside the one
  generation pass), batch 8;
- ``authors_style``: the reference code's approach as a second baseline: batch 1, and for every sample
  the eager attention rows of every layer's output recorded for every decoding query
  (``model.generate(..., record_rows=True)``) before its answer is used.

Each configuration is timed ``--repeats`` times, interleaved, and the best time kept. Calibration
(``fit``) is not timed. Run: ``python benchmarks/bench_defense_latency.py [--model tiny-llava/badnet]
[--n 64]``; the result goes to ``benchmarks/results/defense_latency.json`` with a manifest.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llava/badnet")
    parser.add_argument("--n", type=int, default=64, help="clean test samples")
    parser.add_argument("--val", type=int, default=100, help="clean calibration samples for CleanSight")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "defense_latency.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import cleansight_analysis as cs
    from cleansight_analysis.defenses import NoDefense, get_defense
    from cleansight_analysis.evaluation.runner import run_defense, synthetic_samples
    from cleansight_analysis.manifest import build_manifest

    model = cs.load_lvlm(args.model, device=args.device)
    samples = synthetic_samples("test", args.n)
    defense = get_defense("cleansight").fit(model, synthetic_samples("calibration", args.val))
    undefended = NoDefense()
    common = dict(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, progress=False)

    def authors_style(subset) -> None:
        for s in subset:  # batch 1, eager rows of every layer for every decoding query
            batch = model.prepare([s.image], [s.prompt])
            model.generate(batch, max_new_tokens=args.max_new_tokens, record_rows=True)

    runs = {
        "undefended": lambda sub: run_defense(model, undefended, sub, **common),
        "cleansight": lambda sub: run_defense(model, defense, sub, **common),
        "authors_style": authors_style,
    }
    for fn in runs.values():  # warm-up
        fn(samples[:args.batch_size])
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.repeats):
        for key, fn in runs.items():
            times[key].append(_time(lambda: fn(samples)))
    best = {k: min(v) for k, v in times.items()}
    result = {
        "model": args.model, "n": args.n, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
        "seconds_best": {k: round(v, 4) for k, v in best.items()},
        "seconds_all": {k: [round(t, 4) for t in v] for k, v in times.items()},
        "ratio_cleansight": round(best["cleansight"] / best["undefended"], 4),
        "ratio_authors_style": round(best["authors_style"] / best["undefended"], 4),
        "goal_ratio": 1.10,
        "cleansight": defense.to_dict(),
        "manifest": build_manifest(model=model, settings=vars(args)),
    }
    result["goal_met"] = result["ratio_cleansight"] <= result["goal_ratio"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"{args.model}: undefended {best['undefended']:.2f} s, CleanSight {best['cleansight']:.2f} s "
          f"(ratio {result['ratio_cleansight']:.3f}, goal <= 1.10), authors-style batch-1 eager rows "
          f"{best['authors_style']:.2f} s (ratio {result['ratio_authors_style']:.2f}) on {args.n} clean inputs")


if __name__ == "__main__":
    main()
