"""Measure the detector's feature x whitening x threshold settings on the shipped tiny family (docs/detector.md).

For each backdoored member (tiny-llava/badnet, blended, sig, wanet, trojvlm, vlood): one forward pass over
``--draws`` x ``--n-val`` clean calibration scenes (``--draws`` disjoint calibration sets), ``--n-test`` clean test scenes and ``--n-triggered`` triggered copies of
test scenes gives the group masses of every layer (:func:`cleansight_analysis.detection.sample_masses`); then
:func:`cleansight_analysis.detection.measure.compare_detectors` scores every setting on every single layer and
on the fusion-onset window CleanSight picks by default (``layers="auto"``). The tidy table goes to
``data/results/detector_features.parquet`` with a manifest, and ``docs/detector.md`` is regenerated from it
(``--docs-only`` rewrites the document from the saved table without running any model).

Run: ``python benchmarks/detector_features.py`` (about 5 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
ATTACKS = ("badnet", "blended", "sig", "wanet", "trojvlm", "vlood")
TABLE = "detector_features"


def measure(args: argparse.Namespace):
    import pandas as pd

    import cleansight_analysis as cs
    from cleansight_analysis.attacks import attack_from_dict, triggered_copy
    from cleansight_analysis.defenses.layers import select_detection_layers
    from cleansight_analysis.detection import sample_masses
    from cleansight_analysis.detection.measure import compare_detectors
    from cleansight_analysis.models.registry import lookup
    from cleansight_analysis.training.recipe import TinyRecipe

    world = TinyRecipe(seed=args.seed).world()
    cal = world.samples("calibration", args.n_val * args.draws)
    test = world.samples("test", args.n_test)
    parts = []
    for attack_name in args.attacks:
        t0 = time.perf_counter()
        name = f"tiny-llava/{attack_name}"
        model = cs.load_lvlm(name)
        attack = attack_from_dict(lookup(name).card["attack"])
        layers = list(range(model.n_layers))
        onset = select_detection_layers(model, cal[:16], method="fusion_onset", window=3)
        trig = triggered_copy(test[:args.n_triggered], attack, seed=args.seed)
        masses = {c: sample_masses(model, s, layers, batch_size=args.batch_size)[0]
                  for c, s in (("calibration", cal), ("clean", test), ("triggered", trig))}
        windows = {f"L{layer}": [layer] for layer in layers}
        windows["onset"] = onset
        part = compare_detectors(masses, windows, quantile=args.quantile, n_val=args.n_val)
        part.insert(0, "attack", attack_name)
        parts.append(part)
        print(f"{name}: onset window {onset}, {time.perf_counter() - t0:.0f} s", flush=True)
    return pd.concat(parts, ignore_index=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS))
    parser.add_argument("--n-val", type=int, default=200)
    parser.add_argument("--draws", type=int, default=5, help="disjoint calibration sets of --n-val scenes")
    parser.add_argument("--n-test", type=int, default=1000)
    parser.add_argument("--n-triggered", type=int, default=256)
    parser.add_argument("--quantile", type=float, default=0.99)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", default=str(ROOT / "data" / "results"))
    parser.add_argument("--docs", default=str(ROOT / "docs" / "detector.md"))
    parser.add_argument("--docs-only", action="store_true", help="rewrite the document from the saved table")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from cleansight_analysis.results import load_table, save_table

    if args.docs_only:
        table = load_table(Path(args.out) / f"{TABLE}.parquet")
    else:
        table = measure(args)
        settings = {k: v for k, v in vars(args).items() if k not in ("out", "docs", "docs_only")}
        save_table(table, args.out, TABLE, model="tiny-llava/{" + ",".join(args.attacks) + "}", seed=args.seed,
                   settings=settings)
    import detector_doc

    Path(args.docs).write_text(detector_doc.render(table))
    print(f"wrote {args.docs}")


if __name__ == "__main__":
    main()
