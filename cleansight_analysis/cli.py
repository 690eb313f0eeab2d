"""The ``cleansight`` command line.

    cleansight info                         versions, threads, devices, registered models
    cleansight models list                  the model registry (with the shipped models' cards)
    cleansight inspect --model M --image I  per-layer token-group shares of the answer query
    cleansight figures [--smoke] [--recompute]  run the figure notebooks (what `make figures` calls)
    cleansight tiny build [--only NAME]     rebuild the shipped tiny LLaVA family in data/models
    cleansight analyze stealing|perturb|heads|logit-lens --model M --n N --out DIR
    cleansight backdoor --base M --attack A --mode adapter|lora --out DIR   plant a backdoor
    cleansight eval-backdoor --model M [--attack A] --n N --json FILE      clean acc / ASR / false triggers
    cleansight calibrate --model M --n 200 --out calib.json                fit CleanSight on clean samples, save it
    cleansight evaluate --model M --defense D --n 256 --val 200 --json F   ASR / CU / PU / TPR / FPR / AUROC / latency
    cleansight tables --out DIR                                            attacks x defenses over the tiny models
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``cleansight analyze: error: --n must be a positive integer, got '0'``
    (exit code 2, like every other bad-input error of the command line)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(minimum: int, what: str):
    """An argparse type: an integer >= ``minimum`` (sample counts, batch sizes, jobs, steps, layers)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_nonnegative_int = _int_at_least(0, "an integer >= 0")


def _int_csv(text: str) -> list[int]:
    """``"1,2,5"`` -> ``[1, 2, 5]`` (layer lists)."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,2,5, got {text!r}") from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"layer indices are >= 0, got {text!r}")
    return values


def _unit_csv(text: str) -> list[float]:
    """``"0,0.5,1"`` -> ``[0.0, 0.5, 1.0]`` (intensities in [0, 1])."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers in [0, 1] such as 0,0.5,1, got {text!r}") from None
    if not all(0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"intensities lie in [0, 1], got {text!r}")
    return values


def _finite_float(text: str) -> float:
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _fraction(text: str) -> float:
    """A number in [0, 1] (poison rate, blend strength)."""
    value = _finite_float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def _csv_names(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",")]
    if not text.strip() or any(not v for v in names):
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def _out_dir(text: str) -> str:
    """A results folder: may not exist yet (it is created), may not be a file."""
    from pathlib import Path

    if Path(text).exists() and not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a file, not a folder")
    return text


def _out_file(text: str) -> str:
    """An output file: its folder is created when missing; it may not be a folder."""
    from pathlib import Path

    if Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; give a file path")
    if not Path(text).name:
        raise argparse.ArgumentTypeError(f"{text!r} names no file")
    return text


def _prepare_out_file(path: str) -> "Path":
    from pathlib import Path

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _json_text(record: Any) -> str:
    """Strictly valid JSON: NaN / inf become ``null`` and each such key is listed under ``"undefined"``
    with the reason (a metric with no sample to measure it on, e.g. ASR without an attack)."""
    import json
    import math

    undefined: dict[str, str] = {}

    def clean(value: Any, key: str) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            undefined[key] = f"{value!r} in the computation: no sample defines it (e.g. no attack, or one class only)"
            return None
        if isinstance(value, dict):
            return {k: clean(v, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v, f"{key}[{i}]") for i, v in enumerate(value)]
        return value

    out = clean(record, "")
    if undefined and isinstance(out, dict):
        out["undefined"] = undefined
    return json.dumps(out, indent=2, default=str, allow_nan=False)


def _console():
    import sys

    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=140)


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from .manifest import build_manifest
    from .models import SUPPORTED_ARCHITECTURES, registered_models

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

    from .models import registered_models

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

    from . import GROUP_NAMES, load_lvlm

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
    from pathlib import Path

    from .errors import ModelSourceError
    from .models.registry import lookup, registered_models

    names = [m.name for m in registered_models()]
    if lookup(spec) is not None or any(n.startswith(f"{spec}/") for n in names) or Path(spec).is_dir():
        return
    families = sorted({n.split("/")[0] for n in names if "/" in n})
    raise ModelSourceError(f"--model {spec!r} is neither a registered model, a family ({', '.join(families)}) "
                           "nor a local folder")


def cmd_figures(args: argparse.Namespace) -> int:
    from .errors import InputError
    from .notebooks import find_notebooks, run_notebooks

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
    from .models.registry import MODELS_DIR
    from .training.family import build_family
    from .training.recipe import TinyRecipe

    build_family(args.out or MODELS_DIR, recipe=TinyRecipe(seed=args.seed), only=args.only, jobs=args.jobs,
                 force=args.force)
    return 0


def _attack_from_args(args: argparse.Namespace, card: dict | None = None, *, announce: bool = False):
    """The attack of ``--attack`` and the trigger flags.

    When the model's card names an attack of the same kind (or ``--attack`` is not given), the card's
    trigger is the starting point and only the flags given explicitly change it, so ``--location`` alone
    never swaps the model's own 4 px patch for a preset's default size. ``announce`` prints (to stderr)
    which trigger is used and where it came from.
    """
    import dataclasses

    from .attacks import attack_from_dict, get_attack
    from .attacks.base import _lookup
    from .errors import AttackError

    params = _trigger_params(args)
    card_attack = (card or {}).get("attack") if isinstance((card or {}).get("attack"), dict) else None
    if not args.attack and card_attack is None:
        if params:
            raise AttackError(f"trigger flags ({', '.join(sorted(params))}) need --attack NAME: the model's card "
                              "names no attack")
        return None
    name = _lookup(args.attack).name if args.attack else card_attack["name"]
    if card_attack is not None and _lookup(card_attack["name"]).name == name:
        attack = attack_from_dict(card_attack)
        accepted = {f.name for f in dataclasses.fields(attack) if f.init}
        unknown = sorted(set(params) - accepted)
        if unknown:
            raise AttackError(f"attack {name!r} has no parameter(s) {', '.join(unknown)}; accepted: "
                              f"{', '.join(sorted(accepted))}")
        attack = dataclasses.replace(attack, **params) if params else attack
        source = "the model card" + (f", with {', '.join(sorted(params))} from the command line" if params else "")
    else:
        attack = get_attack(name, **params)
        source = f"the {attack.preset!r} preset" + (f", with {', '.join(sorted(params))} from the command line"
                                                    if params else "")
    if announce:
        print(f"trigger: {attack.describe()} (from {source})", file=sys.stderr)
    return attack


def _trigger_params(args: argparse.Namespace) -> dict[str, Any]:
    """The trigger fields the user set explicitly on the command line."""
    params: dict[str, Any] = {}
    if getattr(args, "trigger_image", None):  # custom: the trigger picture; badnet / blended / ...: its pattern
        params["trigger" if (args.attack or "").lower() == "custom" else "pattern"] = args.trigger_image
    if getattr(args, "location", None):
        loc = args.location
        try:
            params["location"] = tuple(_int_or_float(v) for v in loc.split(",")) if "," in loc else loc
        except ValueError:
            from .errors import AttackError

            raise AttackError(f"--location must be a corner name, 'random' or X,Y numbers, got {loc!r}") from None
    if getattr(args, "alpha", None) is not None:
        params["alpha"] = args.alpha
    if getattr(args, "size", None) is not None:
        params["size"] = args.size
    if getattr(args, "target", None):
        params["target"] = args.target
    return params


def _training_samples(spec: str, n: int, seed: int):
    from .data.base import Sample  # noqa: F401
    from .errors import InputError

    if spec == "synthetic":
        from .data.synthetic import SyntheticWorld

        world = SyntheticWorld(seed)
        n_cap = n // 7
        return world.samples("train", n - n_cap) + world.samples("train", n_cap, start=10**6, task="caption")
    if ":" not in spec:
        raise InputError(f"--data must be 'synthetic' or NAME:FOLDER (coco, vqav2, okvqa, flickr8k), got {spec!r}")
    from .data.real import load_dataset_folder

    name, root = spec.split(":", 1)
    return load_dataset_folder(name, root, limit=n, seed=seed)


def cmd_backdoor(args: argparse.Namespace) -> int:
    from .training.backdoor import BackdoorSettings, train_backdoor

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
    from .evaluation import evaluate_backdoor

    model, attack = _model_and_attack(args)
    samples = _eval_samples(args)
    report = evaluate_backdoor(model, samples, attack, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    out = {**report.to_dict(), "model": args.model, "attack": attack.to_dict() if attack else None, "data": args.data}
    text = _json_text(out)
    if args.json:
        _prepare_out_file(args.json).write_text(text + "\n")
    print(text)
    return 0


def _defense_settings(text: str | None) -> dict[str, Any]:
    """``--defense-settings`` JSON (``'{"quantile": 0.95}'``) as a dict."""
    import json

    from .errors import InputError

    if not text:
        return {}
    try:
        out = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"--defense-settings must be a JSON object, got {text!r} ({exc})") from None
    if not isinstance(out, dict):
        raise InputError(f"--defense-settings must be a JSON object, got {text!r}")
    return out


def cmd_calibrate(args: argparse.Namespace) -> int:
    """``cleansight calibrate``: fit CleanSight on ``--n`` clean calibration samples and save it."""
    from . import load_lvlm
    from .defenses import get_defense
    from .evaluation.runner import synthetic_samples

    from pathlib import Path

    from .errors import OutputExistsError

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
    defense.fit(model, synthetic_samples("calibration", args.n, args.seed))
    defense.save(_prepare_out_file(args.out))
    print(f"wrote {args.out} (CleanSight calibrated on {args.n} clean samples of {args.model})")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``cleansight evaluate``: one row of Tables 1-4 as JSON."""
    from .defenses import get_defense
    from .errors import InputError
    from .evaluation.runner import evaluate

    model, attack = _model_and_attack(args, need_attack=True)
    fit = True
    if args.calibration:
        from .defenses.cleansight import CleanSight

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
    text = _json_text(row)
    if args.json:
        _prepare_out_file(args.json).write_text(text + "\n")
    print(text)
    return 0


#: Shipped backdoored tiny models used by ``cleansight tables`` (one per attack).
TABLE_MODELS = ("badnet", "blended", "sig", "wanet", "trojvlm", "vlood")
TABLE_DEFENSES = ("none", "cleansight", "blur", "st", "jpeg", "strip")


def cmd_tables(args: argparse.Namespace) -> int:
    """``cleansight tables``: attacks x defenses over the shipped tiny models, saved with manifests."""
    import importlib
    import time

    from .defenses.registry import _DEFENSES
    from .evaluation.grid import attack_defense_table
    from .models.registry import lookup
    from .results import save_table

    start = time.perf_counter()
    models = {}
    for name in args.models:
        source = name if lookup(name) is not None or "/" in name else f"tiny-llava/{name}"
        models[name] = source
    defenses = []
    for name in args.defenses:
        module = _DEFENSES.get(name, ("base",))[0]
        try:
            importlib.import_module(f"cleansight_analysis.defenses.{module}")
        except ImportError as exc:
            print(f"skipping defense {name!r}: {exc}", file=sys.stderr)
            continue
        defenses.append(name)
    settings = {"n_test": args.n, "n_val": args.val, "seed": args.seed, "max_new_tokens": args.max_new_tokens,
                "batch_size": args.batch_size}
    tidy = attack_defense_table(models, defenses, layout="long", device=args.device, **settings)
    from .evaluation.grid import wide_table

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


def _model_and_attack(args: argparse.Namespace, *, need_attack: bool = False):
    """The model named by ``--model`` and the attack from the flags or, failing that, the model's card."""
    from pathlib import Path

    from . import load_lvlm
    from .errors import InputError, ModelSourceError
    from .models.loading import read_card
    from .models.registry import lookup, registered_models

    entry = lookup(args.model)
    if entry is None and not Path(args.model).is_dir():
        known = ", ".join(m.name for m in registered_models())
        raise ModelSourceError(f"--model {args.model!r} is neither a registered model nor a local folder "
                               f"(registered: {known})")
    card = entry.card if entry is not None else read_card(Path(args.model))
    attack = _attack_from_args(args, card, announce=True)
    if need_attack and attack is None:
        raise InputError(f"{args.model} has no attack in its card: pass --attack NAME")
    return load_lvlm(args.model, device=args.device), attack


def _eval_samples(args: argparse.Namespace):
    """``--n`` held-out samples: the synthetic test split, or a real dataset folder (``NAME:FOLDER``)."""
    if args.data == "synthetic":
        from .data.synthetic import SyntheticWorld

        return SyntheticWorld(args.seed).samples("test", args.n)
    return _training_samples(args.data, args.n, args.seed)


def cmd_analyze(args: argparse.Namespace) -> int:
    """``cleansight analyze {stealing,perturb,heads,logit-lens}``: tables + manifests under ``--out``."""
    import time

    from .attacks import triggered_copy
    from .errors import InputError
    from .results import save_table

    start = time.perf_counter()
    model, attack = _model_and_attack(args, need_attack=True)
    samples = _eval_samples(args)
    common = {"model": model, "attack": attack, "seed": args.seed,
              "data": args.data, "model_source": args.model}
    written = []
    layers = args.layers
    if args.analysis == "stealing":
        from .attention import StealingSettings, head_separability, layer_separability, stealing_tables, thief_tokens

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
        from .evaluation.intervention_sweeps import perturbation_sweep

        kinds = args.kinds.split(",")
        intensities = args.intensities
        extra = {"layers": layers} if layers is not None and "attn_uniform" in kinds else {}
        from .interventions.perturbations import PIXEL_KINDS

        if any(k in PIXEL_KINDS for k in kinds):
            extra["seed"] = args.seed
        table = perturbation_sweep(model, samples, attack, kinds, intensities, batch_size=args.batch_size,
                                   max_new_tokens=args.max_new_tokens, **extra)
        written.append(save_table(table, args.out, "perturb", fmt=args.format,
                                  settings={"kinds": kinds, "intensities": intensities, **extra}, **common))
    elif args.analysis == "heads":
        from .evaluation.intervention_sweeps import head_sweep
        from .interventions import patch_heads

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
        from .interventions import get_perturbation, logit_lens

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


def _int_or_float(text: str) -> int | float:
    """``"4"`` -> 4 (pixels), ``"0.09"`` -> 0.09 (a fraction)."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def _add_attack_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--attack", default=None, help="badnet, blended, sig, wanet, trojvlm, vlood or custom")
    p.add_argument("--trigger-image", default=None, help="trigger image file (custom attack / BadNet pattern)")
    p.add_argument("--location", default=None, help="corner name (top-left, ...), 'random', or X,Y")
    p.add_argument("--alpha", type=_fraction, default=None, help="blend strength (blended / custom blend)")
    p.add_argument("--size", type=_int_or_float, default=None,
                   help="patch side: pixels (an integer) or a fraction of the short side (e.g. 0.09)")
    p.add_argument("--target", default=None, help="target phrase (default 'you have been hacked lol')")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cleansight", description="Attention stealing in backdoored LVLMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, threads, devices, registered models").set_defaults(fn=cmd_info)
    models = sub.add_parser("models", help="the model registry")
    msub = models.add_subparsers(dest="models_command", required=True)
    msub.add_parser("list", help="list registered models").set_defaults(fn=cmd_models_list)
    ins = sub.add_parser("inspect", help="token-group attention shares of one image + prompt")
    ins.add_argument("--model", default="tiny-random-llava", help="registry name or local model folder")
    ins.add_argument("--image", required=True, help="image file")
    ins.add_argument("--prompt", default="What is in the image?")
    ins.add_argument("--layers", type=_nonnegative_int, nargs="*", default=None, help="LM layers (default all)")
    ins.add_argument("--device", default=None)
    ins.add_argument("--csv", type=_out_file, default=None, help="also write the tidy table to this CSV file")
    ins.set_defaults(fn=cmd_inspect)
    fig = sub.add_parser("figures", help="run the figure notebooks with papermill")
    fig.add_argument("--smoke", action="store_true", help="tiny sample counts; figures go to build/figures-smoke")
    fig.add_argument("--only", nargs="*", default=None, help="run notebooks whose name contains one of these")
    fig.add_argument("--notebooks", default="notebooks")
    fig.add_argument("--output", default="build/notebooks", help="where executed notebooks are written")
    fig.add_argument("--figures-dir", default=None)
    fig.add_argument("--results-dir", default=None,
                     help="root of the cached result tables (default data/results; smoke: build/results-smoke)")
    fig.add_argument("--jobs", type=_positive_int, default=1, help="notebooks run at once (default 1; smoke runs: 2)")
    fig.add_argument("--recompute", action="store_true",
                     help="ignore cached result tables and compute every experiment again")
    fig.add_argument("--model", default=None, help="override every notebook's `model` parameter")
    fig.add_argument("--device", default=None, help="override every notebook's `device` parameter")
    fig.set_defaults(fn=cmd_figures)

    tiny = sub.add_parser("tiny", help="the embedded tiny LLaVA family")
    tsub = tiny.add_subparsers(dest="tiny_command", required=True)
    tb = tsub.add_parser("build", help="(re)build the shipped tiny models (about 80 min on 2 CPU cores: clean model 27, backdoors 51)")
    tb.add_argument("--only", nargs="*", default=None, help="names to build (clean, badnet, blended, ...)")
    tb.add_argument("--out", default=None, help="models folder (default data/models)")
    tb.add_argument("--jobs", type=_positive_int, default=2, help="backdoors trained in parallel (one thread each)")
    tb.add_argument("--seed", type=int, default=0)
    tb.add_argument("--force", action="store_true", help="retrain models that already exist")
    tb.set_defaults(fn=cmd_tiny_build)

    bd = sub.add_parser("backdoor", help="plant a backdoor (vision frozen; projector or projector + LoRA)")
    bd.add_argument("--base", required=True, help="clean model: registry name or local folder")
    _add_attack_args(bd)
    bd.add_argument("--mode", choices=("adapter", "lora"), default="adapter")
    bd.add_argument("--poison-rate", type=_fraction, default=0.1)
    bd.add_argument("--clean-twin", action="store_true", help="also keep each poisoned sample's clean original")
    bd.add_argument("--steps", type=_positive_int, default=400)
    bd.add_argument("--batch-size", type=_positive_int, default=32)
    bd.add_argument("--lr", type=_finite_float, default=2e-3)
    bd.add_argument("--lora-r", type=_positive_int, default=16)
    bd.add_argument("--lora-alpha", type=_positive_int, default=None, help="default 2 x lora-r")
    bd.add_argument("--data", default="synthetic", help="'synthetic' or NAME:FOLDER (coco, vqav2, okvqa, flickr8k)")
    bd.add_argument("--n", type=_positive_int, default=3000, help="training samples (the paper: 3000)")
    bd.add_argument("--seed", type=int, default=0)
    bd.add_argument("--device", default=None)
    bd.add_argument("--out", required=True, type=_out_dir, help="output folder (must be new or empty)")
    bd.add_argument("--overwrite", action="store_true", help="replace what an existing --out folder holds")
    bd.add_argument("--resume", action="store_true",
                    help="continue an interrupted run in --out (every training setting must match its checkpoint)")
    bd.set_defaults(fn=cmd_backdoor)

    an = sub.add_parser("analyze", help="attention-stealing analyses; tables + manifests under --out")
    an.add_argument("analysis", choices=("stealing", "perturb", "heads", "logit-lens"))
    an.add_argument("--model", required=True, help="registry name or local model folder")
    _add_attack_args(an)
    an.add_argument("--data", default="synthetic", help="'synthetic' (test split) or NAME:FOLDER")
    an.add_argument("--n", type=_positive_int, default=300, help="samples (each also run with its trigger)")
    an.add_argument("--out", required=True, type=_out_dir, help="results folder")
    an.add_argument("--layers", type=_int_csv, default=None, help="comma-separated LM layers (default all; for perturb and "
                    "logit-lens: the layers attn_uniform edits)")
    an.add_argument("--text-keys", default="post_image", choices=("post_image", "instruction"),
                    help="stealing-ratio denominator: every token after the image block, or the instruction")
    an.add_argument("--k", type=_positive_int, default=5, help="thief tokens: top-k")
    an.add_argument("--kinds", default="st,shrinkpad,blur,jpeg,noise,attn_uniform", help="perturb: kinds")
    an.add_argument("--intensities", type=_unit_csv, default=_unit_csv("0,0.25,0.5,0.75,1"),
                    help="perturb: intensities in [0, 1]")
    an.add_argument("--kind", default="ablate", choices=("ablate", "flatten"), help="heads: what to do per head")
    an.add_argument("--method", default="zero", choices=("zero", "mean"), help="heads: ablation method")
    an.add_argument("--intervention", default=None, help="logit-lens: KIND[:INTENSITY], e.g. attn_uniform:1")
    an.add_argument("--format", default="auto", choices=("auto", "parquet", "csv"),
                    help="table format (auto: parquet when pyarrow is installed, else csv)")
    an.add_argument("--batch-size", type=_positive_int, default=32)
    an.add_argument("--max-new-tokens", type=_positive_int, default=12)
    an.add_argument("--seed", type=int, default=0)
    an.add_argument("--device", default=None)
    an.set_defaults(fn=cmd_analyze)

    ev = sub.add_parser("eval-backdoor", help="clean accuracy, ASR and false-trigger rate of a model")
    ev.add_argument("--model", required=True)
    _add_attack_args(ev)
    ev.add_argument("--data", default="synthetic", help="'synthetic' (test split) or NAME:FOLDER")
    ev.add_argument("--n", type=_positive_int, default=1000)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--batch-size", type=_positive_int, default=64)
    ev.add_argument("--max-new-tokens", type=_positive_int, default=12)
    ev.add_argument("--device", default=None)
    ev.add_argument("--json", type=_out_file, default=None, help="also write the report to this file")
    ev.set_defaults(fn=cmd_eval_backdoor)

    cal = sub.add_parser("calibrate", help="fit CleanSight on clean calibration samples and save it")
    cal.add_argument("--model", required=True, help="registry name or local model folder")
    cal.add_argument("--n", type=_positive_int, default=200, help="clean calibration samples (|D_val|)")
    cal.add_argument("--layers", type=_int_csv, default=None, help="comma-separated detection layers (default: CleanSight's)")
    cal.add_argument("--quantile", type=_fraction, default=None, help="threshold quantile (default: CleanSight's)")
    cal.add_argument("--tau", type=_fraction, default=None, help="pruning threshold (default: CleanSight's)")
    cal.add_argument("--defense-settings", default=None, help="other CleanSight settings as a JSON object")
    cal.add_argument("--seed", type=int, default=0)
    cal.add_argument("--device", default=None)
    cal.add_argument("--out", required=True, type=_out_file, help="calibration file (JSON or YAML)")
    cal.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    cal.set_defaults(fn=cmd_calibrate)

    de = sub.add_parser("evaluate", help="ASR, clean / poisoned utility, TPR / FPR / AUROC, latency of a defense")
    de.add_argument("--model", required=True)
    _add_attack_args(de)
    de.add_argument("--defense", default="cleansight", help="none, cleansight, blur, st, shrinkpad, jpeg, strip, "
                    "attention_entropy, scale_up")
    de.add_argument("--defense-settings", default=None, help="defense settings as a JSON object")
    de.add_argument("--calibration", default=None, help="a saved CleanSight (from `cleansight calibrate`): no refit")
    de.add_argument("--data", default="synthetic", help="'synthetic' (test split) or NAME:FOLDER")
    de.add_argument("--n", type=_positive_int, default=256, help="test samples (each also run with its trigger)")
    de.add_argument("--val", type=_positive_int, default=200, help="clean calibration samples")
    de.add_argument("--seed", type=int, default=0)
    de.add_argument("--batch-size", type=_positive_int, default=32)
    de.add_argument("--max-new-tokens", type=_positive_int, default=12)
    de.add_argument("--device", default=None)
    de.add_argument("--json", type=_out_file, default=None, help="also write the row to this file")
    de.set_defaults(fn=cmd_evaluate)

    tb2 = sub.add_parser("tables", help="attacks x defenses over the shipped tiny models (tables + manifests)")
    tb2.add_argument("--out", required=True, type=_out_dir, help="results folder")
    tb2.add_argument("--models", type=_csv_names, default=list(TABLE_MODELS),
                     help="comma-separated attack models (tiny-llava/NAME or registry names)")
    tb2.add_argument("--defenses", type=_csv_names, default=list(TABLE_DEFENSES), help="comma-separated defense names")
    tb2.add_argument("--n", type=_positive_int, default=32, help="test samples per model (small default for CPU)")
    tb2.add_argument("--val", type=_positive_int, default=50, help="clean calibration samples")
    tb2.add_argument("--seed", type=int, default=0)
    tb2.add_argument("--batch-size", type=_positive_int, default=32)
    tb2.add_argument("--max-new-tokens", type=_positive_int, default=12)
    tb2.add_argument("--format", default="auto", choices=("auto", "parquet", "csv"))
    tb2.add_argument("--device", default=None)
    tb2.set_defaults(fn=cmd_tables)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Bad input (a value the parser refuses, a :class:`CleanSightError`, a path that
    cannot be read or written) prints one line ``cleansight <command>: error: ...`` and returns 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from .errors import CleanSightError

    prog = f"cleansight {args.command}"
    try:
        return int(args.fn(args) or 0)
    except CleanSightError as exc:
        message = " ".join(str(exc).split())   # one line, whatever the message held
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
    except OSError as exc:  # a user-supplied path that cannot be read or written (missing, a folder, no permission)
        print(f"{prog}: error: {exc.strerror or exc}: {exc.filename!r}" if exc.filename else f"{prog}: error: {exc}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
