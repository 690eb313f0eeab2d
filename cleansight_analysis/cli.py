"""The ``cleansight`` command line.

    cleansight info                         versions, threads, devices, registered models
    cleansight models list                  the model registry (with the shipped models' cards)
    cleansight inspect --model M --image I  per-layer token-group shares of the answer query
    cleansight figures [--smoke]            run the figure notebooks (what `make figures` calls)
    cleansight tiny build [--only NAME]     rebuild the shipped tiny LLaVA family in data/models
    cleansight backdoor --base M --attack A --mode adapter|lora --out DIR   plant a backdoor
    cleansight eval-backdoor --model M [--attack A] --n N --json FILE      clean acc / ASR / false triggers
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence


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
        return f"{value:.3f}" if isinstance(value, (int, float)) else "-"

    for entry in registered_models():
        card = entry.card or {}
        metrics = card.get("metrics") or {}
        attack = (card.get("attack") or {}).get("name", "none" if card else "-")
        source = "built from config" if entry.builder else str(entry.path)
        table.add_row(entry.name, attack, str(card.get("mode", "-")), fmt(metrics.get("clean_acc")),
                      fmt(metrics.get("asr")), fmt(metrics.get("false_trigger_rate")), source)
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
        frame.to_csv(args.csv, index=False)
    table = Table(title=f"{model.name}: share of the answer query's attention (mean over heads)")
    table.add_column("layer", justify="right")
    for g in GROUP_NAMES:
        table.add_column(g, justify="right")
    pivot = frame.pivot_table(index="layer", columns="group", values="mass", aggfunc="mean", observed=True)
    for layer, row in pivot.iterrows():
        table.add_row(str(layer), *(f"{row[g]:.3f}" for g in GROUP_NAMES))
    _console().print(table)
    return 0


def cmd_figures(args: argparse.Namespace) -> int:
    from .notebooks import run_notebooks

    params = {}
    if args.model:
        params["model"] = args.model
    if args.device:
        params["device"] = args.device
    records = run_notebooks(args.notebooks, args.output, smoke=args.smoke, only=args.only, parameters=params,
                            figures_dir=args.figures_dir)
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


def _attack_from_args(args: argparse.Namespace, card: dict | None = None):
    from .attacks import attack_from_dict, get_attack

    if not args.attack:
        if card and card.get("attack"):
            return attack_from_dict(card["attack"])
        return None
    params: dict[str, Any] = {}
    if getattr(args, "trigger_image", None):
        params["image"] = args.trigger_image
    if getattr(args, "location", None):
        loc = args.location
        params["location"] = tuple(float(v) if "." in v else int(v) for v in loc.split(",")) if "," in loc else loc
    if getattr(args, "alpha", None) is not None:
        params["alpha"] = args.alpha
    if getattr(args, "size", None) is not None:
        params["size"] = args.size
    if getattr(args, "target", None):
        params["target"] = args.target
    if card and card.get("attack", {}).get("name") == args.attack and not params:
        return attack_from_dict(card["attack"])
    return get_attack(args.attack, **params)


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

    attack = _attack_from_args(args)
    if attack is None:
        raise SystemExit("--attack is required")
    samples = _training_samples(args.data, args.n, args.seed)
    settings = BackdoorSettings(mode=args.mode, poison_rate=args.poison_rate, steps=args.steps,
                                batch_size=args.batch_size, lr=args.lr, lora_r=args.lora_r,
                                lora_alpha=args.lora_alpha or 2 * args.lora_r, seed=args.seed,
                                clean_twin=args.clean_twin)
    card = train_backdoor(args.base, samples, attack, settings, args.out, device=args.device)
    print(f"wrote {args.out} (load with cleansight_analysis.load_lvlm({str(args.out)!r})); "
          f"final loss {card['training']['final_loss']:.3f}")
    return 0


def cmd_eval_backdoor(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from . import load_lvlm
    from .evaluation import evaluate_backdoor
    from .models.loading import read_card
    from .models.registry import lookup

    entry = lookup(args.model)
    card = entry.card if entry is not None else (read_card(Path(args.model)) if Path(args.model).is_dir() else None)
    attack = _attack_from_args(args, card)
    model = load_lvlm(args.model, device=args.device)
    if args.data == "synthetic":
        from .data.synthetic import SyntheticWorld

        samples = SyntheticWorld(args.seed).samples("test", args.n)
    else:
        samples = _training_samples(args.data, args.n, args.seed)
    report = evaluate_backdoor(model, samples, attack, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    out = {**report.to_dict(), "model": args.model, "attack": attack.to_dict() if attack else None, "data": args.data}
    text = json.dumps(out, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)
    return 0


def _add_attack_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--attack", default=None, help="badnet, blended, sig, wanet, trojvlm, vlood or custom")
    p.add_argument("--trigger-image", default=None, help="trigger image file (custom attack / BadNet pattern)")
    p.add_argument("--location", default=None, help="corner name (top-left, ...), 'random', or X,Y")
    p.add_argument("--alpha", type=float, default=None, help="blend strength (blended / custom blend)")
    p.add_argument("--size", type=float, default=None, help="patch side: pixels (>= 1) or a fraction of the short side")
    p.add_argument("--target", default=None, help="target phrase (default 'you have been hacked lol')")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cleansight", description="Attention stealing in backdoored LVLMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, threads, devices, registered models").set_defaults(fn=cmd_info)
    models = sub.add_parser("models", help="the model registry")
    msub = models.add_subparsers(dest="models_command", required=True)
    msub.add_parser("list", help="list registered models").set_defaults(fn=cmd_models_list)
    ins = sub.add_parser("inspect", help="token-group attention shares of one image + prompt")
    ins.add_argument("--model", default="tiny-random-llava", help="registry name or local model folder")
    ins.add_argument("--image", required=True, help="image file")
    ins.add_argument("--prompt", default="What is in the image?")
    ins.add_argument("--layers", type=int, nargs="*", default=None, help="LM layers (default all)")
    ins.add_argument("--device", default=None)
    ins.add_argument("--csv", default=None, help="also write the tidy table to this CSV file")
    ins.set_defaults(fn=cmd_inspect)
    fig = sub.add_parser("figures", help="run the figure notebooks with papermill")
    fig.add_argument("--smoke", action="store_true", help="tiny sample counts; figures go to build/figures-smoke")
    fig.add_argument("--only", nargs="*", default=None, help="run notebooks whose name contains one of these")
    fig.add_argument("--notebooks", default="notebooks")
    fig.add_argument("--output", default="build/notebooks", help="where executed notebooks are written")
    fig.add_argument("--figures-dir", default=None)
    fig.add_argument("--model", default=None, help="override every notebook's `model` parameter")
    fig.add_argument("--device", default=None, help="override every notebook's `device` parameter")
    fig.set_defaults(fn=cmd_figures)

    tiny = sub.add_parser("tiny", help="the embedded tiny LLaVA family")
    tsub = tiny.add_subparsers(dest="tiny_command", required=True)
    tb = tsub.add_parser("build", help="(re)build the shipped tiny models (about 60 min on 2 CPU cores)")
    tb.add_argument("--only", nargs="*", default=None, help="names to build (clean, badnet, blended, ...)")
    tb.add_argument("--out", default=None, help="models folder (default data/models)")
    tb.add_argument("--jobs", type=int, default=2, help="backdoors trained in parallel (one thread each)")
    tb.add_argument("--seed", type=int, default=0)
    tb.add_argument("--force", action="store_true", help="retrain models that already exist")
    tb.set_defaults(fn=cmd_tiny_build)

    bd = sub.add_parser("backdoor", help="plant a backdoor (vision frozen; projector or projector + LoRA)")
    bd.add_argument("--base", required=True, help="clean model: registry name or local folder")
    _add_attack_args(bd)
    bd.add_argument("--mode", choices=("adapter", "lora"), default="adapter")
    bd.add_argument("--poison-rate", type=float, default=0.1)
    bd.add_argument("--clean-twin", action="store_true", help="also keep each poisoned sample's clean original")
    bd.add_argument("--steps", type=int, default=400)
    bd.add_argument("--batch-size", type=int, default=32)
    bd.add_argument("--lr", type=float, default=2e-3)
    bd.add_argument("--lora-r", type=int, default=16)
    bd.add_argument("--lora-alpha", type=int, default=None, help="default 2 x lora-r")
    bd.add_argument("--data", default="synthetic", help="'synthetic' or NAME:FOLDER (coco, vqav2, okvqa, flickr8k)")
    bd.add_argument("--n", type=int, default=3000, help="training samples (the paper: 3000)")
    bd.add_argument("--seed", type=int, default=0)
    bd.add_argument("--device", default=None)
    bd.add_argument("--out", required=True)
    bd.set_defaults(fn=cmd_backdoor)

    ev = sub.add_parser("eval-backdoor", help="clean accuracy, ASR and false-trigger rate of a model")
    ev.add_argument("--model", required=True)
    _add_attack_args(ev)
    ev.add_argument("--data", default="synthetic", help="'synthetic' (test split) or NAME:FOLDER")
    ev.add_argument("--n", type=int, default=1000)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--max-new-tokens", type=int, default=12)
    ev.add_argument("--device", default=None)
    ev.add_argument("--json", default=None, help="also write the report to this file")
    ev.set_defaults(fn=cmd_eval_backdoor)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .errors import CleanSightError

    try:
        return int(args.fn(args) or 0)
    except CleanSightError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
