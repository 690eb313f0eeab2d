"""The ``cleansight`` subcommands: each ``cmd_<name>(args)`` runs one and returns its exit code."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from .. import GROUP_NAMES, distributed, load_lvlm
from ..attacks import triggered_copy
from ..attention import StealingSettings, head_separability, layer_separability, stealing_tables, thief_tokens
from ..defenses import get_defense
from ..defenses.cleansight import CleanSight
from ..defenses.registry import available_defenses
from ..errors import InputError, ModelSourceError, OutputExistsError
from ..evaluation import evaluate_backdoor
from ..evaluation.grid import attack_defense_table, wide_table
from ..evaluation.intervention_sweeps import head_sweep, perturbation_sweep
from ..evaluation.runner import evaluate, synthetic_samples
from ..interventions import get_perturbation, logit_lens, patch_heads
from ..interventions.perturbations import PIXEL_KINDS
from ..manifest import build_manifest
from ..models import SUPPORTED_ARCHITECTURES
from ..models.registry import MODELS_DIR, lookup, registered_models
from ..notebooks import find_notebooks, run_notebooks
from ..results import save_table
from ..training.backdoor import BackdoorSettings, train_backdoor
from ..training.family import build_family
from ..training.recipe import TinyRecipe
from .args import (
    _attack_from_args,
    _console,
    _defense_settings,
    _eval_samples,
    _json_text,
    _model_and_attack,
    _prepare_out_file,
    _process_device,
    _refuse_existing_tables,
    _training_samples,
)


def cmd_info(args: argparse.Namespace) -> int:
    from rich.table import Table

    m = build_manifest()
    con = _console()
    table = Table(title="cleansight-analysis", show_header=False)
    for k, v in m["versions"].items():
        table.add_row(k, str(v))
    table.add_row("git revision", str(m["git_revision"]))
    table.add_row("torch threads", str(torch.get_num_threads()))
    table.add_row("CUDA", str(m["machine"]["cuda"]))
    table.add_row("architectures", ", ".join(SUPPORTED_ARCHITECTURES))
    table.add_row("registered models", ", ".join(r.name for r in registered_models()))
    con.print(table)
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    from rich.table import Table


    table = Table(title="registered models (load with cleansight_analysis.load_lvlm(name))")
    for col in ("name", "attack", "mode", "clean acc", "ASR", "false triggers", "source"):
        table.add_column(col, justify="right" if col in ("clean acc", "ASR", "false triggers") else "left")

    def fmt(value: Any) -> str:
        return f"{value:.3f}" if isinstance(value, (int, float)) and value == value else "-"

    from rich.markup import escape

    for entry in registered_models():
        card = entry.card or {}
        metrics = card.get("metrics") or {}
        attack_card = card.get("attack")
        attack = attack_card.get("name", "?") if isinstance(attack_card, dict) else ("none" if card else "-")
        source = "built from config" if entry.builder else str(entry.path)
        # names and paths come from files on disk: printed literally, never as rich markup
        table.add_row(escape(entry.name), escape(str(attack)), escape(str(card.get("mode", "-"))),
                      fmt(metrics.get("clean_acc")), fmt(metrics.get("asr")),
                      fmt(metrics.get("false_trigger_rate")), escape(source))
    _console().print(table)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from rich.table import Table


    model = load_lvlm(args.model, device=args.device)
    batch = model.prepare(args.image, args.prompt)
    rows = model.attention_rows(batch, layers=args.layers)
    frame = rows.to_frame()
    if args.csv:
        frame.to_csv(_prepare_out_file(args.csv), index=False)
    table = Table(title=f"{model.name}: share of the answer query's attention (mean over heads)")
    table.add_column("layer", justify="right")
    for g in GROUP_NAMES:
        table.add_column(g, justify="right")
    pivot = frame.pivot_table(index="layer", columns="group", values="mass", aggfunc="mean", observed=True)
    for layer, row in pivot.iterrows():
        table.add_row(str(layer), *(f"{row[g]:.3f}" for g in GROUP_NAMES))
    _console().print(table)
    return 0


def _check_figure_model(spec: str) -> None:
    """``figures --model``: a registry name, a family (``tiny-llava``) or a local folder, else one line."""

    names = [m.name for m in registered_models()]
    if lookup(spec) is not None or any(n.startswith(f"{spec}/") for n in names) or Path(spec).is_dir():
        return
    families = sorted({n.split("/")[0] for n in names if "/" in n})
    raise ModelSourceError(f"--model {spec!r} is neither a registered model, a family ({', '.join(families)}) "
                           "nor a local folder")


def cmd_figures(args: argparse.Namespace) -> int:
    if not find_notebooks(args.notebooks, args.only):
        what = f" whose name contains one of {args.only}" if args.only else ""
        raise InputError(f"no notebooks in {args.notebooks!r}{what}")
    params = {}
    if args.model:
        _check_figure_model(args.model)
        params["model"] = args.model
    if args.device:
        params["device"] = args.device
    records = run_notebooks(args.notebooks, args.output, smoke=args.smoke, only=args.only, parameters=params,
                            figures_dir=args.figures_dir, results_dir=args.results_dir, recompute=args.recompute,
                            jobs=args.jobs)
    total = sum(r["seconds"] for r in records)
    print(f"{len(records)} notebook(s) in {total:.1f} s")
    return 0


def cmd_tiny_build(args: argparse.Namespace) -> int:
    if args.reuse_stage2 and not args.reading:
        raise InputError("--reuse-stage2 cannot go with --no-reading (it skips stages 1-2 before the reading stage)")
    build_family(args.out or MODELS_DIR, recipe=TinyRecipe(seed=args.seed, reading=args.reading), only=args.only,
                 jobs=args.jobs, force=args.force, reuse_stage2=args.reuse_stage2)
    return 0


def cmd_backdoor(args: argparse.Namespace) -> int:
    attack = _attack_from_args(args, announce=True)
    samples = _training_samples(args.data, args.n, args.seed)
    settings = BackdoorSettings(mode=args.mode, poison_rate=args.poison_rate, steps=args.steps,
                                batch_size=args.batch_size, lr=args.lr, lora_r=args.lora_r,
                                lora_alpha=args.lora_alpha or 2 * args.lora_r, seed=args.seed,
                                clean_twin=args.clean_twin)
    card = train_backdoor(args.base, samples, attack, settings, args.out, device=args.device,
                          overwrite=args.overwrite, resume=args.resume)
    print(f"wrote {args.out} (load with cleansight_analysis.load_lvlm({str(args.out)!r})); "
          f"final loss {card['training']['final_loss']:.3f}")
    return 0


def cmd_eval_backdoor(args: argparse.Namespace) -> int:
    model, attack = _model_and_attack(args)
    samples = _eval_samples(args)
    report = evaluate_backdoor(model, samples, attack, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    out = {**report.to_dict(), "model": args.model, "attack": attack.to_dict() if attack else None, "data": args.data}
    text = _json_text(out)
    if args.json:
        _prepare_out_file(args.json).write_text(text + "\n")
    print(text)
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    """``cleansight calibrate``: fit CleanSight on ``--n`` clean calibration samples and save it."""

    if Path(args.out).exists() and not args.overwrite:
        raise OutputExistsError(f"{args.out!r} exists; pass --overwrite to replace it")
    model = load_lvlm(args.model, device=args.device)
    settings = _defense_settings(args.defense_settings)
    if args.layers:
        settings["layers"] = args.layers
    if args.quantile is not None:
        settings["quantile"] = args.quantile
    if args.tau is not None:
        settings["tau"] = args.tau
    defense = get_defense("cleansight", **settings)
    defense.progress = True
    defense.fit(model, synthetic_samples("calibration", args.n, args.seed))
    defense.save(_prepare_out_file(args.out))
    print(f"wrote {args.out} (CleanSight calibrated on {args.n} clean samples of {args.model})")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``cleansight evaluate``: one row of Tables 1-4 as JSON (under ``accelerate launch`` the test batches
    are shared between the processes and only the main process prints / writes the row)."""

    model, attack = _model_and_attack(args, need_attack=True)
    fit = True
    if args.calibration:
        if args.defense != "cleansight":
            raise InputError("--calibration is a saved CleanSight: use it with --defense cleansight")
        defense = CleanSight.load(args.calibration, model=model)
        fit = False
    else:
        defense = get_defense(args.defense, **_defense_settings(args.defense_settings))
    samples = _eval_samples(args) if args.data != "synthetic" else None
    row = evaluate(model, attack, defense, n_test=args.n, n_val=args.val, seed=args.seed, samples=samples,
                   max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, fit=fit)
    row.update(model_source=args.model, data=args.data, calibration=args.calibration)
    if not distributed.is_main():
        return 0
    if distributed.launched():
        row["processes"] = distributed.rank_and_world()[1]
    text = _json_text(row)
    if args.json:
        _prepare_out_file(args.json).write_text(text + "\n")
    print(text)
    return 0


#: Shipped backdoored tiny models used by ``cleansight tables`` (one per attack).
TABLE_MODELS = ("badnet", "blended", "sig", "wanet", "trojvlm", "vlood")
TABLE_DEFENSES = ("none", "cleansight", "blur", "st", "jpeg", "strip")


def cmd_tables(args: argparse.Namespace) -> int:
    """``cleansight tables``: attacks x defenses over the shipped tiny models, saved with manifests (under
    ``accelerate launch`` every row's test batches are shared between the processes; the main process
    writes)."""
    _refuse_existing_tables(args.out, list(TABLES_WRITTEN), args.overwrite)
    distributed.barrier()  # every process checked --out before the main one writes there
    start = time.perf_counter()
    models = {}
    for name in args.models:
        source = name if lookup(name) is not None or "/" in name else f"tiny-llava/{name}"
        models[name] = source
    unknown = [name for name in args.defenses if name not in available_defenses()]
    if unknown:
        raise InputError(f"--defenses: unknown defense(s) {', '.join(unknown)}; known: {', '.join(available_defenses())}")
    defenses = list(args.defenses)
    settings = {"n_test": args.n, "n_val": args.val, "seed": args.seed, "max_new_tokens": args.max_new_tokens,
                "batch_size": args.batch_size}
    tidy = attack_defense_table(models, defenses, layout="long", device=_process_device(args.device), **settings)
    if not distributed.is_main():
        return 0

    common = {"seed": args.seed, "settings": {**settings, "models": models, "defenses": defenses}, "fmt": args.format}
    written = [save_table(tidy, args.out, "attack_defense_long", **common)]
    for metric_set, name in ((("asr", "clean_utility"), "table1_asr_cu"),
                             (("asr", "clean_utility", "poisoned_utility", "tpr", "fpr", "auroc", "latency_ratio"),
                              "attack_defense_all")):
        written.append(save_table(wide_table(tidy, metrics=metric_set), args.out, name, **common))
    for path in written:
        print(f"wrote {path}")
    print(f"tables: {len(models)} models x {len(defenses)} defenses in {time.perf_counter() - start:.1f} s")
    return 0


#: Tables each analysis writes under ``--out``.
ANALYSIS_TABLES: dict[str, list[str]] = {
    "stealing": ["stealing", "separability_layers", "separability_heads", "thief_tokens"],
    "perturb": ["perturb"], "heads": ["heads", "patching"], "logit-lens": ["logit_lens"]}
#: Tables ``cleansight tables`` writes under ``--out``.
TABLES_WRITTEN = ("attack_defense_long", "table1_asr_cu", "attack_defense_all")


def cmd_analyze(args: argparse.Namespace) -> int:
    """``cleansight analyze {stealing,perturb,heads,logit-lens}``: tables + manifests under ``--out``.

    The analyses are not split: under ``accelerate launch`` the main process runs them, the others exit."""
    if not distributed.is_main():
        return 0
    _refuse_existing_tables(args.out, ANALYSIS_TABLES[args.analysis], args.overwrite)
    start = time.perf_counter()
    model, attack = _model_and_attack(args, need_attack=True)
    samples = _eval_samples(args)
    common = {"model": model, "attack": attack, "seed": args.seed,
              "data": args.data, "model_source": args.model}
    written = []
    layers = args.layers
    if args.analysis == "stealing":
        settings = StealingSettings(text_keys=args.text_keys, layers=layers, batch_size=args.batch_size)
        table = stealing_tables(model, samples, attack, settings=settings, seed=args.seed)
        written.append(save_table(table, args.out, "stealing", settings=settings, fmt=args.format, **common))
        written.append(save_table(layer_separability(table, seed=args.seed), args.out, "separability_layers",
                                  settings=settings, fmt=args.format, **common))
        written.append(save_table(head_separability(table), args.out, "separability_heads", settings=settings,
                                  fmt=args.format, **common))
        thieves = thief_tokens(model, samples, attack, layers=layers, k=args.k, batch_size=args.batch_size,
                               seed=args.seed)
        written.append(save_table(thieves, args.out, "thief_tokens", settings={"k": args.k, "layers": layers},
                                  fmt=args.format, **common))
    elif args.analysis == "perturb":
        kinds = args.kinds.split(",")
        intensities = args.intensities
        extra = {"layers": layers} if layers is not None and "attn_uniform" in kinds else {}

        if any(k in PIXEL_KINDS for k in kinds):
            extra["seed"] = args.seed
        table = perturbation_sweep(model, samples, attack, kinds, intensities, batch_size=args.batch_size,
                                   max_new_tokens=args.max_new_tokens, **extra)
        written.append(save_table(table, args.out, "perturb", fmt=args.format,
                                  settings={"kinds": kinds, "intensities": intensities, **extra}, **common))
    elif args.analysis == "heads":
        table = head_sweep(model, samples, attack, kind=args.kind, method=args.method, layers=layers,
                           batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
        written.append(save_table(table, args.out, "heads", fmt=args.format,
                                  settings={"kind": args.kind, "method": args.method, "layers": layers}, **common))
        triggered = triggered_copy(samples, attack)
        patches = [patch_heads(model, samples, triggered, target=attack.target, layers=layers,
                               batch_size=args.batch_size),
                   patch_heads(model, triggered, samples, target=attack.target, layers=layers,
                               batch_size=args.batch_size)]
        import pandas as pd

        written.append(save_table(pd.concat(patches, ignore_index=True), args.out, "patching", fmt=args.format,
                                  settings={"layers": layers, "target": attack.target}, **common))
    else:  # logit-lens

        intervention = None
        if args.intervention:
            kind, _, eta = args.intervention.partition(":")
            extra = {"layers": layers} if layers is not None and kind == "attn_uniform" else {}
            try:
                strength = float(eta or 1.0)
            except ValueError:
                raise InputError(f"--intervention must be KIND[:INTENSITY] such as attn_uniform:1, "
                                 f"got {args.intervention!r}") from None
            intervention = get_perturbation(kind, strength, **extra)
        table = logit_lens(model, samples, attack, intervention=intervention, batch_size=args.batch_size,
                           progress=True)
        written.append(save_table(table, args.out, "logit_lens", fmt=args.format,
                                  settings={"intervention": intervention.to_dict() if intervention else None},
                                  **common))
    for path in written:
        print(f"wrote {path}")
    print(f"{args.analysis}: {len(samples)} samples in {time.perf_counter() - start:.1f} s")
    return 0
