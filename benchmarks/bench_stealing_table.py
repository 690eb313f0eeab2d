"""Benchmark: the stealing table for N clean + N triggered samples on a shipped tiny model.

What is timed: ``stealing_tables(model, samples, attack)`` (batched forwards, query rows only, early exit
after the last requested layer) building the full sample x layer x head table, after one warm-up call
on a few samples. Model load and sample generation are not timed.

Run: ``python benchmarks/bench_stealing_table.py [--model tiny-llava/badnet] [--n 300]``; the result goes
to ``benchmarks/results/stealing_table.json`` with a manifest (machine, threads, versions).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llava/badnet")
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "stealing_table.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    import cleansight_analysis as cs
    from cleansight_analysis.attacks import attack_from_dict
    from cleansight_analysis.attention import StealingSettings, stealing_tables
    from cleansight_analysis.manifest import build_manifest
    from cleansight_analysis.models.registry import lookup
    from cleansight_analysis.training.recipe import TinyRecipe

    model = cs.load_lvlm(args.model)
    attack = attack_from_dict(lookup(args.model).card["attack"])
    samples = TinyRecipe().world().samples("test", args.n)
    settings = StealingSettings(batch_size=args.batch_size)
    stealing_tables(model, samples[:8], attack, settings=settings, progress=False)  # warm-up
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        table = stealing_tables(model, samples, attack, settings=settings, progress=False)
        times.append(time.perf_counter() - start)
    result = {"model": args.model, "n_clean": args.n, "n_triggered": args.n, "rows": len(table),
              "seconds_best": round(min(times), 2), "seconds_all": [round(t, 2) for t in times],
              "goal_seconds": 60, "manifest": build_manifest(model=model, settings=vars(args))}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"{args.model}: stealing table for {args.n} clean + {args.n} triggered samples "
          f"({len(table)} rows): best {min(times):.1f} s of {args.repeats}")


if __name__ == "__main__":
    main()
